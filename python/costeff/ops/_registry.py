"""Shared plumbing for the op modules: the op handle, the Triton CUDA registration, the autocast policy."""
from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from costeff._extension import extension_loaded, require_extension

_IMPL_LIB = None


def op_handle(name: str):
    """torch.ops.costeff.<name>.default, with a clear error when the extension is not built."""
    require_extension()
    return getattr(torch.ops.costeff, name).default


def _impl_lib():
    global _IMPL_LIB
    if _IMPL_LIB is None:
        _IMPL_LIB = torch.library.Library("costeff", "IMPL")
    return _IMPL_LIB


# What an op computes in under torch.autocast, as torch's own lists decide for its ops: "lower" (the
# matmul ops, as torch.nn.functional.linear) takes the autocast dtype, "fp32" (normalization and
# softmax/entropy, as layer_norm and softmax) float32, so residual sums and exit decisions keep fp32.
AUTOCAST_POLICIES = ("lower", "fp32")
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)  # float64 is left alone, as autocast does


def _autocast_on(args) -> str | None:
    """The device type whose autocast applies to ``args`` (that of the first tensor), or None."""
    device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), None)
    return device_type if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type) else None


def _cast(policy: str, device_type: str, a):
    dtype = torch.get_autocast_dtype(device_type) if policy == "lower" else torch.float32
    return a.to(dtype) if isinstance(a, torch.Tensor) and a.dtype in _CASTABLE and a.device.type == device_type else a


def follows_autocast(policy: str):
    """Decorates a ``<op>_reference`` so that under autocast it does what the registered op does: its
    floating inputs cast per ``policy``, its body run with autocast off (the training forward calls the
    references under autocast directly)."""
    def wrap(fn):
        @functools.wraps(fn)
        def reference(*args, **kwargs):
            device_type = _autocast_on((*args, *kwargs.values()))
            if device_type is None:
                return fn(*args, **kwargs)
            args = [_cast(policy, device_type, a) for a in args]
            kwargs = {k: _cast(policy, device_type, v) for k, v in kwargs.items()}
            with torch.autocast(device_type, enabled=False):
                return fn(*args, **kwargs)
        return reference
    return wrap


def register_autocast_policy(name: str, policy: str) -> None:
    """Registers costeff::<name> for the AutocastCPU and AutocastCUDA keys: floating inputs cast per
    ``policy`` (the casts are recorded by autograd), then the op runs below autocast."""
    if policy not in AUTOCAST_POLICIES:
        raise ValueError(f"register_autocast_policy: policy must be one of {AUTOCAST_POLICIES}, got {policy!r}")
    op = op_handle(name)
    for key in ("AutocastCPU", "AutocastCUDA"):
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, keyset=keyset):
            device_type = _autocast_on(args)
            cast = args if device_type is None else [_cast(policy, device_type, a) for a in args]
            with torch._C._ExcludeDispatchKeyGuard(keyset):
                return op(*cast)

        _impl_lib().impl(name, kernel, key, with_keyset=True)


def has_compiled_kernel(name: str, dispatch_key: str) -> bool:
    return extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(f"costeff::{name}", dispatch_key)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


TRITON_CUDA_OPS: set = set()  # the ops whose CUDA kernel is the Triton one (register_triton_cuda)


def register_triton_cuda(name: str) -> bool:
    """Registers costeff_kernels.<name>.<name>_triton for the CUDA key unless a compiled CUDA kernel
    (csrc/cuda/<name>.cu) already serves it. The Triton module is imported on first call only."""
    if not extension_loaded() or has_compiled_kernel(name, "CUDA") or not triton_available():
        return False
    TRITON_CUDA_OPS.add(name)

    def launcher(*args):
        module = importlib.import_module(f"costeff_kernels.{name}")
        return getattr(module, f"{name}_triton")(*args)

    launcher.__name__ = f"{name}_triton_cuda"
    _impl_lib().impl(name, launcher, "CUDA")
    return True
