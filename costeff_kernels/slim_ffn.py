"""Triton slim FFN: GEMM + bias + exact GELU (tl.erf) epilogue, then GEMM + bias, for any
intermediate size (0: out_bias broadcast). fp32 accumulation for 16-bit inputs."""
from __future__ import annotations

import torch

from costeff.ops._checks import check_slim_ffn
from costeff_kernels import _common
from costeff_kernels._common import ACT_GELU, ACT_NONE, linear, rows_2d


@_common.on_tensor_device
def slim_ffn_triton(hidden: torch.Tensor, in_weight: torch.Tensor, in_bias: torch.Tensor,
                    out_weight: torch.Tensor, out_bias: torch.Tensor) -> torch.Tensor:
    """out = GELU(hidden @ in_weight.T + in_bias) @ out_weight.T + out_bias, shape and dtype of hidden.

    The intermediate is stored in hidden's dtype (fp32 accumulation inside each GEMM), so on a GPU
    the second GEMM feeds 16-bit operands to the tensor cores."""
    inter = check_slim_ffn(hidden, in_weight, in_bias, out_weight, out_bias)
    _common.require_triton_device("slim_ffn", "hidden", hidden)
    h = hidden.shape[-1]
    rows = hidden.numel() // h if h else 0
    if inter == 0 or rows == 0:
        # A fully pruned FFN contributes only its bias (a fresh tensor: outputs never alias inputs).
        return out_bias.expand(hidden.shape).clone(memory_format=torch.contiguous_format)
    x = rows_2d(hidden)
    mid = linear(x, in_weight, in_bias, act=ACT_GELU)
    return linear(mid, out_weight, out_bias, act=ACT_NONE).view(hidden.shape)
