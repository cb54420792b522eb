"""Slim attention: fused QKV projection + masked scaled-dot-product attention + output projection
for a pruned BERT layer.

``qkv_weight`` is [3 * num_heads * head_size, hidden]: the query rows, then key rows, then value rows,
each head-major (the concatenation of a BERT layer's query/key/value weights). ``num_heads`` may be 0
(a fully pruned layer: the output is ``out_bias``) and the head size is arbitrary.
``key_padding_mask`` [batch, seq] is bool or integer, nonzero = real token; a query whose row has no
real key gets a zero context. Kernels: csrc/cpu/slim_attention.cpp (CPU),
costeff_kernels/slim_attention.py (Triton, CUDA). Reference: :func:`slim_attention_reference`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from costeff._extension import extension_loaded
from costeff.ops._checks import check_slim_attention
from costeff.ops._registry import follows_autocast, op_handle, register_autocast_policy, register_triton_cuda

NAME = "slim_attention"


def slim_attention(hidden, key_padding_mask, qkv_weight, qkv_bias, out_weight, out_bias, num_heads: int):
    """Runs ``torch.ops.costeff.slim_attention``; returns [batch, seq, hidden] (input dtype)."""
    return op_handle(NAME)(hidden, key_padding_mask, qkv_weight, qkv_bias, out_weight, out_bias, int(num_heads))


@follows_autocast("lower")
def slim_attention_reference(hidden, key_padding_mask, qkv_weight, qkv_bias, out_weight, out_bias, num_heads: int):
    """Plain PyTorch composition (explicit softmax, computes in fp32 for 16-bit inputs; under autocast,
    in the autocast dtype as the op)."""
    head_size = check_slim_attention(hidden, key_padding_mask, qkv_weight, qkv_bias, out_weight, out_bias, num_heads)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    b, s, h = hidden.shape
    if num_heads == 0:
        out = out_bias.to(acc).expand(b, s, h) + 0 * hidden.to(acc)  # keeps hidden in the autograd graph
        return out.to(hidden.dtype)
    qkv = F.linear(hidden.to(acc), qkv_weight.to(acc), qkv_bias.to(acc))
    q, k, v = qkv.view(b, s, 3, num_heads, head_size).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_size)
    keep = key_padding_mask.bool()[:, None, None, :]
    # finfo.min (not -inf) keeps all-padding rows NaN-free; multiplying by keep zeroes them.
    probs = torch.softmax(scores.masked_fill(~keep, torch.finfo(acc).min), dim=-1) * keep
    context = (probs @ v).transpose(1, 2).reshape(b, s, num_heads * head_size)
    return F.linear(context, out_weight.to(acc), out_bias.to(acc)).to(hidden.dtype)


def _fake(hidden, key_padding_mask, qkv_weight, qkv_bias, out_weight, out_bias, num_heads):
    check_slim_attention(hidden, key_padding_mask, qkv_weight, qkv_bias, out_weight, out_bias, num_heads)
    return hidden.new_empty(hidden.shape)


def _setup_context(ctx, inputs, output):
    hidden, key_padding_mask, qkv_weight, qkv_bias, out_weight, out_bias, num_heads = inputs
    ctx.num_heads = num_heads
    ctx.save_for_backward(hidden, key_padding_mask, qkv_weight, qkv_bias, out_weight, out_bias)


def _backward(ctx, grad_out):
    # Recomputes the reference forward and takes its vector-Jacobian product (attention probabilities
    # are not stored by the forward kernel).
    hidden, mask, qkv_weight, qkv_bias, out_weight, out_bias = ctx.saved_tensors
    inputs = [t.detach().requires_grad_(True) for t in (hidden, qkv_weight, qkv_bias, out_weight, out_bias)]
    with torch.enable_grad():
        out = slim_attention_reference(inputs[0], mask, *inputs[1:], ctx.num_heads)
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    return grads[0], None, grads[1], grads[2], grads[3], grads[4], None


if extension_loaded():
    torch.library.register_fake(f"costeff::{NAME}")(_fake)
    torch.library.register_autograd(f"costeff::{NAME}", _backward, setup_context=_setup_context)
    register_autocast_policy(NAME, "lower")
    register_triton_cuda(NAME)
