"""What a deployer touches: the one-call early-exit engine (:class:`InferenceEngine`).

Uses :mod:`costeff.models` and the compiled library, never the pipeline."""
from costeff.inference.engine import PRECISIONS, InferenceEngine
from costeff.inference.hf_pipeline import CostEffTextClassificationPipeline  # registers "costeff-text-classification"

__all__ = ["CostEffTextClassificationPipeline", "InferenceEngine", "PRECISIONS"]
