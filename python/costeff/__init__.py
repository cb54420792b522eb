"""costeff: slenderized multi-exit BERT classifiers (COST-EFF) with fused CPU/CUDA/Triton kernels.

Ops live in ``torch.ops.costeff`` (wrappers with docs in :mod:`costeff.ops`); ``costeff.info()``
reports what was built.
"""
from __future__ import annotations

import importlib

from costeff._errors import ExtensionNotBuiltError, MissingDependencyError

__version__ = "0.1.0"

# `import costeff` stays light (no torch, no transformers: `costeff --help` answers at once). The
# submodules load on first use of their name, and with them what they register: costeff.ops (which
# loads costeff._C) registers torch.ops.costeff.* and their fakes/autograd, costeff.models the Auto
# classes of model_type costeff_bert and the "costeff-text-classification" pipeline task.
_SUBMODULES = ("ops", "models", "inference")
_FROM_EXTENSION = ("built_with_cuda", "extension_loaded")


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"costeff.{name}")
        globals()[name] = module
        return module
    if name in _FROM_EXTENSION:
        return getattr(importlib.import_module("costeff._extension"), name)
    raise AttributeError(f"module 'costeff' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES) + list(_FROM_EXTENSION))


def info() -> dict:
    """What this install can run: compiled CPU/CUDA kernels, Triton, and the torch it was built for."""
    import importlib.util
    import os

    import torch

    from costeff import ops
    from costeff._extension import built_with_cuda, extension_loaded
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


__all__ = ["ExtensionNotBuiltError", "MissingDependencyError", "inference", "info", "models", "ops", "__version__"]
