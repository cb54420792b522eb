"""Triton add + LayerNorm: y = LayerNorm(x + residual) over the last dimension, one program per row,
any hidden size, statistics in fp32 (fp64 for fp64 inputs)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from costeff.ops._checks import check_add_layer_norm
from costeff_kernels import _common
from costeff_kernels._common import acc_dtype, rows_2d

# Rows up to this width stay in registers (one read); wider rows loop over chunks (three reads).
_MAX_SINGLE_BLOCK = 8192
_CHUNK = 4096


@triton.jit
def _add_layer_norm_kernel(
    x_ptr, r_ptr, w_ptr, b_ptr, y_ptr,
    N, stride_x, stride_r, stride_y, eps,
    ACC: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    r_row = r_ptr + row * stride_r
    y_row = y_ptr + row * stride_y
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        mask = cols < N
        s = tl.load(x_row + cols, mask=mask, other=0.0).to(ACC) + tl.load(r_row + cols, mask=mask, other=0.0).to(ACC)
        mean = tl.sum(s, axis=0) / N
        diff = tl.where(mask, s - mean, 0.0)
        # Two-pass variance (mean first): no cancellation for rows with a large common offset.
        var = tl.sum(diff * diff, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(ACC)
        tl.store(y_row + cols, (diff * rstd * w + b).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        total = tl.zeros((BLOCK,), dtype=ACC)
        for start in range(0, N, BLOCK):
            c = start + cols
            m = c < N
            total += tl.load(x_row + c, mask=m, other=0.0).to(ACC) + tl.load(r_row + c, mask=m, other=0.0).to(ACC)
        mean = tl.sum(total, axis=0) / N
        sq = tl.zeros((BLOCK,), dtype=ACC)
        for start in range(0, N, BLOCK):
            c = start + cols
            m = c < N
            s = tl.load(x_row + c, mask=m, other=0.0).to(ACC) + tl.load(r_row + c, mask=m, other=0.0).to(ACC)
            d = tl.where(m, s - mean, 0.0)
            sq += d * d
        rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / N + eps)
        for start in range(0, N, BLOCK):
            c = start + cols
            m = c < N
            s = tl.load(x_row + c, mask=m, other=0.0).to(ACC) + tl.load(r_row + c, mask=m, other=0.0).to(ACC)
            w = tl.load(w_ptr + c, mask=m, other=0.0).to(ACC)
            b = tl.load(b_ptr + c, mask=m, other=0.0).to(ACC)
            tl.store(y_row + c, ((s - mean) * rstd * w + b).to(y_ptr.dtype.element_ty), mask=m)


@_common.on_tensor_device
def add_layer_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          eps: float) -> torch.Tensor:
    """LayerNorm(x + residual) over the last dimension; returns a new tensor of x's shape and dtype."""
    check_add_layer_norm(x, residual, weight, bias, eps)
    _common.require_triton_device("add_layer_norm", "x", x)
    n = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = out.numel() // n
    if rows == 0:
        return out
    x2, r2, y2 = rows_2d(x), rows_2d(residual), out.view(rows, n)
    w, b = weight.contiguous(), bias.contiguous()
    block = triton.next_power_of_2(n)
    single = block <= _MAX_SINGLE_BLOCK
    if not single:
        block = _CHUNK
    _add_layer_norm_kernel[(rows,)](
        x2, r2, w, b, y2, n, x2.stride(0), r2.stride(0), y2.stride(0), float(eps),
        ACC=acc_dtype(x.dtype), BLOCK=block, SINGLE=single,
    )
    return out
