"""Triton slim attention: QKV projection (tiled linear kernel), a flash-attention-style kernel for
the key-masked softmax(Q K^T / sqrt(d)) V over any head size, then the output projection.

The attention kernel runs one program per (batch * head, query block), streams key/value blocks with
an online softmax (running max and sum, fp32), pads the head dimension to max(16, next_pow2(d)) with
masked loads, and writes a zero context for a query whose row has no real key.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from costeff.ops._checks import check_slim_attention
from costeff_kernels import _common
from costeff_kernels._common import ACT_NONE, acc_dtype, dot_precision, linear, pow2_block, upcast_operands

# Largest query / key blocks (sequences up to these lengths take one block).
_MAX_BLOCK_Q = 64
_MAX_BLOCK_KV = 64


@triton.jit
def _attention_kernel(
    qkv_ptr, mask_ptr, ctx_ptr,
    S, NH, D,
    stride_qkv_row, stride_mask_b, stride_mask_s, stride_ctx_row,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, SUM_DOT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)  # batch * heads on axis 0: its limit is 2^31 - 1, axis 1's only 65535
    pid_q = tl.program_id(1).to(tl.int64)
    b = bh // NH
    h = bh % NH
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_kv = tl.arange(0, BLOCK_KV).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_ok = offs_q < S
    # qkv rows are tokens (b * S + s); columns: [q heads | k heads | v heads], each head D wide.
    base = qkv_ptr + b * S * stride_qkv_row + h * D
    q = tl.load(base + offs_q[:, None] * stride_qkv_row + offs_d[None, :],
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(ACC)
    k_base = base + NH * D
    v_base = base + 2 * NH * D
    # 1/sqrt(D) in the accumulation dtype (a host float would arrive as fp32 even for fp64 inputs).
    scale = 1.0 / tl.sqrt(tl.sum(d_ok.to(ACC), axis=0))
    m_i = tl.full((BLOCK_Q,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_Q,), ACC)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), ACC)
    for start in range(0, S, BLOCK_KV):
        keys = start + offs_kv
        key_in = keys < S
        real = tl.load(mask_ptr + b * stride_mask_b + keys * stride_mask_s, mask=key_in, other=0) != 0
        kv_mask = key_in[:, None] & d_ok[None, :]
        k = tl.load(k_base + keys[:, None] * stride_qkv_row + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_qkv_row + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(ACC)
            v = v.to(ACC)
        if SUM_DOT:
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
        else:
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * scale
        scores = tl.where(real[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # A row that has seen no real key yet keeps m = -inf: use 0 as its reference so that
        # exp(-inf - ref) = 0 instead of NaN.
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - ref)
        p = tl.exp(scores - ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if SUM_DOT:
            pv = tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        elif UPCAST:
            pv = tl.dot(p, v, input_precision=PRECISION, out_dtype=ACC)
        else:
            pv = tl.dot(p.to(v.dtype), v, out_dtype=ACC)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    # No real key in the row: l = 0 -> zero context (as the reference's masked softmax).
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(ctx_ptr + (b * S + offs_q)[:, None] * stride_ctx_row + h * D + offs_d[None, :],
             out.to(ctx_ptr.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])


@_common.on_tensor_device
def slim_attention_triton(hidden: torch.Tensor, key_padding_mask: torch.Tensor, qkv_weight: torch.Tensor,
                          qkv_bias: torch.Tensor, out_weight: torch.Tensor, out_bias: torch.Tensor,
                          num_heads: int) -> torch.Tensor:
    """[batch, seq, hidden] -> [batch, seq, hidden] in hidden's dtype; num_heads may be 0."""
    head_size = check_slim_attention(hidden, key_padding_mask, qkv_weight, qkv_bias, out_weight, out_bias, num_heads)
    _common.require_triton_device("slim_attention", "hidden", hidden)
    b, s, h = hidden.shape
    if num_heads == 0 or b * s == 0:
        # A fully pruned layer contributes only its output bias (a fresh tensor, never an alias).
        return out_bias.expand(b, s, h).clone(memory_format=torch.contiguous_format)
    dtype = hidden.dtype
    x = hidden.reshape(b * s, h)
    qkv = linear(x, qkv_weight, qkv_bias, act=ACT_NONE)  # [b * s, 3 * nh * d], contiguous
    width = num_heads * head_size
    ctx = torch.empty((b * s, width), dtype=dtype, device=hidden.device)
    block_q = pow2_block(s, hi=_MAX_BLOCK_Q)
    block_kv = pow2_block(s, hi=_MAX_BLOCK_KV)
    block_d = max(16, triton.next_power_of_2(head_size))
    grid = (b * num_heads, triton.cdiv(s, block_q))
    _attention_kernel[grid](
        qkv, key_padding_mask, ctx,
        s, num_heads, head_size,
        qkv.stride(0), key_padding_mask.stride(0), key_padding_mask.stride(1), ctx.stride(0),
        ACC=acc_dtype(dtype), UPCAST=upcast_operands(dtype), PRECISION=dot_precision(dtype),
        # float64 products as sums of broadcast products: Triton 3.6's fp64 MMA lowering failed on an
        # H200 ("fp64 don't support largeK MMA", head size 1); the attention tiles are small
        SUM_DOT=dtype == torch.float64,
        BLOCK_Q=block_q, BLOCK_KV=block_kv, BLOCK_D=block_d,
    )
    return linear(ctx, out_weight, out_bias, act=ACT_NONE).view(b, s, h)
