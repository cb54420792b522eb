"""The GPU runner's exit head in one launch (costeff.inference.GpuRunner, on CUDA): the state the exit
reads (the mean of the real tokens, or the first token) -> activation -> classifier -> logits and
softmax entropy, one program per row. In plain PyTorch (costeff.models.modeling_costeff.exit_input +
costeff.ops.exit_head.exit_head_logits_entropy, the reference) these are ~11 launches. Exits with
a pooler dense layer keep the PyTorch path. Entropy online over class tiles, as in exit_head.py:
running max m, s = sum e^(z - m), t = sum (z - m) e^(z - m), H = log s - t / s.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from costeff_kernels import _common
from costeff_kernels._common import ACTIVATIONS, _activate


@triton.jit
def _exit_pool_head_kernel(
    h_ptr, key_ptr, w_ptr, b_ptr, logits_ptr, ent_ptr,
    S, H, C, stride_hb, stride_hs, stride_kb, stride_wc,
    MEAN: tl.constexpr, ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    if MEAN:
        acc = tl.zeros((BLOCK_H,), tl.float32)
        count = tl.zeros((BLOCK_S,), tl.float32)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_ok = offs_s < S
            k = tl.load(key_ptr + row * stride_kb + offs_s, mask=s_ok, other=0).to(tl.float32)
            x = tl.load(h_ptr + row * stride_hb + offs_s[:, None] * stride_hs + offs_h[None, :],
                        mask=s_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(x * k[:, None], axis=0)
            count += k
        x = acc / tl.maximum(tl.sum(count, axis=0), 1.0)
    else:
        x = tl.load(h_ptr + row * stride_hb + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    # NaN stays NaN through the activation (_tanh's clamp would turn it into +-1): the runner counts
    # non-finite entropies as the PyTorch path makes them
    x = tl.where(h_ok, tl.where(x == x, _activate(x, ACT), x), 0.0)
    offs_c = tl.arange(0, BLOCK_C)
    # 0-d tensors from the start: loop-carried values keep one type
    m = tl.max(tl.full((BLOCK_C,), float("-inf"), tl.float32), axis=0)
    s = tl.sum(tl.zeros((BLOCK_C,), tl.float32), axis=0)
    t = tl.sum(tl.zeros((BLOCK_C,), tl.float32), axis=0)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + offs_c
        c_ok = cls < C
        w = tl.load(w_ptr + cls[:, None] * stride_wc + offs_h[None, :], mask=c_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
        z = tl.sum(w * x[None, :], axis=1) + tl.load(b_ptr + cls, mask=c_ok, other=0.0).to(tl.float32)
        tl.store(logits_ptr + row * C + cls, z, mask=c_ok)
        m_new = tl.maximum(m, tl.max(tl.where(c_ok, z, float("-inf")), axis=0))
        delta = tl.where(s > 0, m - m_new, 0.0)  # the empty state (s = 0, m = -inf) moves by 0
        scale = tl.exp(delta)
        shifted = tl.where(c_ok, z - m_new, 0.0)
        p = tl.where(c_ok, tl.exp(shifted), 0.0)
        t = scale * (t + delta * s) + tl.sum(shifted * p, axis=0)
        s = scale * s + tl.sum(p, axis=0)
        m = m_new
    ent = tl.log(s) - t / s
    # rounding gives -1e-8 for a one-hot softmax; tl.maximum would also turn NaN into 0
    tl.store(ent_ptr + row, tl.where(ent == ent, tl.maximum(ent, 0.0), ent))


@_common.on_tensor_device
def exit_pool_head_triton(hidden: torch.Tensor, key: torch.Tensor, classifier_weight: torch.Tensor, classifier_bias: torch.Tensor,
                          activation: str, mean: bool):
    """hidden [B, S, H] (any float dtype), key [B, S] bool (real tokens), classifier [C, H] and [C]
    float32 -> (logits [B, C] float32, entropy [B] float32). ``mean``: average the real tokens, else
    read the first token."""
    _common.require_triton_device("exit_pool_head", "hidden", hidden)
    b, s, h = hidden.shape
    c = classifier_weight.shape[0]
    if key.shape != (b, s) or classifier_weight.shape != (c, h) or classifier_bias.shape != (c,) or activation not in ACTIVATIONS:
        raise ValueError(f"exit_pool_head: hidden {tuple(hidden.shape)}, key {tuple(key.shape)}, classifier {tuple(classifier_weight.shape)}"
                         f"/{tuple(classifier_bias.shape)}, activation {activation!r} do not fit")
    if classifier_weight.dtype != torch.float32 or classifier_bias.dtype != torch.float32 or key.dtype != torch.bool:
        raise TypeError("exit_pool_head: the classifier must be float32 and key bool")
    hidden, key = hidden.contiguous(), key.contiguous()
    weight, bias = classifier_weight.contiguous(), classifier_bias.contiguous()
    logits = torch.empty((b, c), dtype=torch.float32, device=hidden.device)
    entropy = torch.empty((b,), dtype=torch.float32, device=hidden.device)
    if b == 0:
        return logits, entropy
    block_h = triton.next_power_of_2(h)
    _exit_pool_head_kernel[(b,)](
        hidden, key.view(torch.uint8), weight, bias, logits, entropy,
        s, h, c, hidden.stride(0), hidden.stride(1), key.stride(0), weight.stride(0),
        MEAN=bool(mean), ACT=ACTIVATIONS[activation],
        BLOCK_S=max(1, min(triton.next_power_of_2(s), 8192 // block_h)), BLOCK_H=block_h,
        BLOCK_C=max(2, min(triton.next_power_of_2(c), 8192 // block_h)),
    )
    return logits, entropy
