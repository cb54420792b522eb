"""Loads the compiled op library costeff._C (which registers torch.ops.costeff.*)."""
from __future__ import annotations

import importlib

_BUILD_HINT = (
    "costeff's compiled kernels (costeff._C) are not built. From the repository root run:\n"
    "    pip install torch==2.13.0 && pip install --no-build-isolation -e .\n"
    "(or `bash scripts/test.sh`, which sets everything up)."
)


class ExtensionNotBuiltError(ImportError):
    """Raised when an op is called but costeff._C was never compiled."""


class MissingDependencyError(ImportError):
    """Raised when a feature needs an optional package (e.g. onnxruntime) that is not installed."""


try:
    _C = importlib.import_module("costeff._C")
    LOAD_ERROR: Exception | None = None
except ImportError as exc:  # the package stays importable; ops raise a clear error when used
    _C = None
    LOAD_ERROR = exc


def extension_loaded() -> bool:
    return _C is not None


def require_extension() -> None:
    if _C is None:
        raise ExtensionNotBuiltError(f"{_BUILD_HINT}\n(import error: {LOAD_ERROR})")


def built_with_cuda() -> bool:
    return bool(_C is not None and getattr(_C, "WITH_CUDA", 0))
