"""Shared plumbing for the op modules: the op handle, the Triton CUDA registration."""
from __future__ import annotations

import importlib
import importlib.util

import torch

from costeff._extension import extension_loaded, require_extension

_IMPL_LIB = None


def op_handle(name: str):
    """torch.ops.costeff.<name>.default, with a clear error when the extension is not built."""
    require_extension()
    return getattr(torch.ops.costeff, name).default


def has_compiled_kernel(name: str, dispatch_key: str) -> bool:
    return extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(f"costeff::{name}", dispatch_key)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def register_triton_cuda(name: str) -> bool:
    """Registers costeff_kernels.<name>.<name>_triton for the CUDA key unless a compiled CUDA kernel
    (csrc/cuda/<name>.cu) already serves it. The Triton module is imported on first call only."""
    global _IMPL_LIB
    if not extension_loaded() or has_compiled_kernel(name, "CUDA") or not triton_available():
        return False
    if _IMPL_LIB is None:
        _IMPL_LIB = torch.library.Library("costeff", "IMPL")

    def launcher(*args):
        module = importlib.import_module(f"costeff_kernels.{name}")
        return getattr(module, f"{name}_triton")(*args)

    launcher.__name__ = f"{name}_triton_cuda"
    _IMPL_LIB.impl(name, launcher, "CUDA")
    return True
