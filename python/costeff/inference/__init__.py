"""What a deployer touches: the one-call early-exit engine (:class:`InferenceEngine`).

Uses :mod:`costeff.models` and the compiled library, never the pipeline."""
from costeff.inference.engine import PRECISIONS, InferenceEngine

__all__ = ["InferenceEngine", "PRECISIONS"]
