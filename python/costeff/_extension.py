"""Loads the compiled op library costeff._C (which registers torch.ops.costeff.*)."""
from __future__ import annotations

import importlib

_BUILD_HINT = (
    "costeff's compiled kernels (costeff._C) are not built. From the repository root run:\n"
    "    pip install torch==2.13.0 && pip install --no-build-isolation -e .\n"
    "(or `bash scripts/test.sh`, which sets everything up)."
)


from costeff._errors import ExtensionNotBuiltError, MissingDependencyError  # noqa: F401  (re-exported)

import torch  # noqa: E402,F401  (first: costeff._C links against torch's libraries, libc10 among them)

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
