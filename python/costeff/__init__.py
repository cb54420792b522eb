"""costeff: slenderized multi-exit BERT classifiers (COST-EFF) with fused CPU/CUDA/Triton kernels.

Ops live in ``torch.ops.costeff`` (wrappers with docs in :mod:`costeff.ops`); ``costeff.info()``
reports what was built.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from costeff._extension import ExtensionNotBuiltError, built_with_cuda, extension_loaded

__version__ = "0.1.0"

from costeff import ops  # noqa: E402  (registers fakes/autograd once the extension is loaded)
from costeff import models  # noqa: E402  (registers the Auto classes: model_type costeff_bert)
from costeff import inference  # noqa: E402  (registers the "costeff-text-classification" pipeline)


def info() -> dict:
    """What this install can run: compiled CPU/CUDA kernels, Triton, and the torch it was built for."""
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        try:
            import triton

            triton_version = triton.__version__
        except Exception:  # a broken triton install must not break costeff.info()
            triton_version = None
    engine_isa = None
    if extension_loaded():
        from costeff.inference.engine import engine_isas

        engine_isa = engine_isas()
    return {
        "costeff": __version__,
        "torch": torch.__version__,
        "cpu_kernels": extension_loaded(),
        "cuda_kernels": built_with_cuda(),
        "cuda_available": torch.cuda.is_available(),
        "triton": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "ops": sorted(ops.OP_NAMES),
        # the CPU engine's kernels: the instruction set a new engine takes, and all this CPU runs
        "engine_isa": engine_isa["selected"] if engine_isa else None,
        "engine_isas": engine_isa["supported"] if engine_isa else [],
    }


__all__ = ["ExtensionNotBuiltError", "inference", "info", "models", "ops", "__version__"]
