"""Tolerances relative to PyTorch's own error (as flash-attention's tests do): a kernel's deviation
from a float64 reference may be at most `factor` times that of the plain-PyTorch reference run in the
kernel's dtype, plus a small absolute floor."""
from __future__ import annotations

import torch


def to64(t):
    return t.to(torch.float64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.to(torch.float64) - b.to(torch.float64)).abs().max().item()


def assert_close_rel_torch(out, ref_same_dtype, ref64, factor: float = 4.0, atol: float = 1e-6, what: str = "output"):
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == ref_same_dtype.dtype, f"{what}: dtype {out.dtype} != {ref_same_dtype.dtype}"
    err_out = max_err(out, ref64)
    err_torch = max_err(ref_same_dtype, ref64)
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    bound = factor * err_torch + atol * scale
    assert err_out <= bound, f"{what}: max error {err_out:.3g} > {bound:.3g} (torch's own error {err_torch:.3g})"
