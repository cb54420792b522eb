"""Triton exit head: [pooler dense] + activation (tanh / ReLU / GELU) -> classifier -> logits, softmax entropy (online over class
tiles) and the early-exit decision entropy < threshold.

The optional pooler is the shared tiled linear kernel with the activation as epilogue (output kept in the
accumulation dtype); the classifier kernel then takes a block of rows, walks the classes tile by tile
and keeps per row a running max m, s = sum e^(z - m) and t = sum (z - m) e^(z - m), so any number of
classes (1 .. thousands) costs one pass and registers of one tile: H = log s - t / s.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from costeff.ops._checks import check_exit_head
from costeff_kernels import _common
from costeff_kernels._common import ACT_NONE, ACTIVATIONS, _activate, acc_dtype, dot_precision, linear, pow2_block


@triton.jit
def _exit_head_kernel(
    x_ptr, w_ptr, b_ptr, logits_ptr, ent_ptr, exit_ptr, bad_ptr,
    B, C, K, threshold,
    stride_xb, stride_xk, stride_wc, stride_wk, stride_bias, stride_lb, stride_lc,
    ACT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_C)
    m = tl.full((BLOCK_B,), float("-inf"), ACC)
    s = tl.zeros((BLOCK_B,), ACC)
    t = tl.zeros((BLOCK_B,), ACC)
    bad = tl.zeros((BLOCK_B,), tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + offs_c
        cls_ok = cls < C
        z = tl.zeros((BLOCK_B, BLOCK_C), ACC)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < K
            x = tl.load(x_ptr + rows[:, None] * stride_xb + kk[None, :] * stride_xk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(ACC)
            x = _activate(x, ACT)  # ACT_NONE when the pooler's epilogue applied it
            w = tl.load(w_ptr + cls[None, :] * stride_wc + kk[:, None] * stride_wk,
                        mask=k_ok[:, None] & cls_ok[None, :], other=0.0).to(ACC)
            z = tl.dot(x, w, z, input_precision=PRECISION, out_dtype=ACC)
        z += tl.load(b_ptr + cls * stride_bias, mask=cls_ok, other=0.0).to(ACC)[None, :]
        valid = row_ok[:, None] & cls_ok[None, :]
        tl.store(logits_ptr + rows[:, None] * stride_lb + cls[None, :] * stride_lc,
                 z.to(logits_ptr.dtype.element_ty), mask=valid)
        finite = (z == z) & (tl.abs(z) != float("inf"))
        bad += tl.sum((valid & ~finite).to(tl.int32), axis=1)
        # Online entropy state update; every tile holds >= 1 real class, so m_new is finite for
        # finite rows (rows with a non-finite logit are reported through `bad`, not used).
        zm = tl.where(cls_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=1))
        # Move the state to the new max: t' = e^d (t + d s), s' = e^d s with d = m - m_new; the empty
        # state (s = 0, m = -inf) uses d = 0 to avoid -inf * 0.
        delta = tl.where(s > 0, m - m_new, 0.0)
        scale = tl.exp(delta)
        shifted = tl.where(cls_ok[None, :], z - m_new[:, None], 0.0)
        p = tl.where(cls_ok[None, :], tl.exp(shifted), 0.0)
        tile_t = tl.sum(shifted * p, axis=1)
        t = scale * (t + delta * s) + tile_t
        s = scale * s + tl.sum(p, axis=1)
        m = m_new
    ent = tl.log(s) - t / s
    ent = tl.maximum(ent, 0.0)  # rounding gives -1e-8 for a one-hot softmax
    tl.store(ent_ptr + rows, ent.to(ent_ptr.dtype.element_ty), mask=row_ok)
    tl.store(exit_ptr + rows, ent < threshold, mask=row_ok)
    tl.store(bad_ptr + rows, bad, mask=row_ok)


@_common.on_tensor_device
def exit_head_triton(
    hidden: torch.Tensor,
    pooler_weight: Optional[torch.Tensor],
    pooler_bias: Optional[torch.Tensor],
    classifier_weight: torch.Tensor,
    classifier_bias: torch.Tensor,
    threshold: float,
    activation: str = "tanh",
):
    """(logits [B, C] in hidden's dtype, entropy [B] float32 (float64 for float64), exit_mask [B] bool).
    Raises ValueError naming the first row whose logits are not finite."""
    c = check_exit_head(hidden, pooler_weight, pooler_bias, classifier_weight, classifier_bias, threshold, activation)
    _common.require_triton_device("exit_head", "hidden", hidden)
    b, k = hidden.shape
    dtype = hidden.dtype
    ent_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    logits = torch.empty((b, c), dtype=dtype, device=hidden.device)
    entropy = torch.empty((b,), dtype=ent_dtype, device=hidden.device)
    exit_mask = torch.empty((b,), dtype=torch.bool, device=hidden.device)
    if b == 0:
        return logits, entropy, exit_mask
    x = hidden
    if pooler_weight is not None:
        # Pooled states stay in the accumulation dtype: the entropy decides exits, keep it precise.
        x = linear(hidden, pooler_weight, pooler_bias, act=ACTIVATIONS[activation], out_dtype=ent_dtype)
    bad = torch.empty((b,), dtype=torch.int32, device=hidden.device)
    block_b = pow2_block(b, hi=32)
    block_c = pow2_block(c, hi=64)
    block_k = pow2_block(k, hi=64)
    _exit_head_kernel[(triton.cdiv(b, block_b),)](
        x, classifier_weight, classifier_bias, logits, entropy, exit_mask, bad,
        b, c, k, float(threshold),
        x.stride(0), x.stride(1), classifier_weight.stride(0), classifier_weight.stride(1), classifier_bias.stride(0),
        logits.stride(0), logits.stride(1),
        ACT=ACTIVATIONS[activation] if pooler_weight is None else ACT_NONE, ACC=acc_dtype(dtype), PRECISION=dot_precision(ent_dtype),
        BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_K=block_k,
    )
    if dtype == torch.float64:
        # Triton passes Python floats as fp32: compare fp64 entropies against the exact threshold.
        torch.lt(entropy, float(threshold), out=exit_mask)
    bad_rows = bad.nonzero()
    if bad_rows.numel():
        row = int(bad_rows[0, 0])
        raise ValueError(
            f"costeff::exit_head: non-finite logits (NaN/Inf) in row {row}: check hidden and the "
            "pooler/classifier weights for NaN/Inf")
    return logits, entropy, exit_mask
