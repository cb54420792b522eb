"""Slim FFN: linear + bias + exact (erf) GELU + linear + bias, for any intermediate size (0 allowed:
the output is ``out_bias``). Kernels: csrc/cpu/slim_ffn.cpp (CPU), costeff_kernels/slim_ffn.py
(Triton, CUDA). Reference: :func:`slim_ffn_reference`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from costeff._extension import extension_loaded
from costeff.ops._checks import check_slim_ffn
from costeff.ops._registry import follows_autocast, op_handle, register_autocast_policy, register_triton_cuda

NAME = "slim_ffn"


def slim_ffn(hidden, in_weight, in_bias, out_weight, out_bias):
    """Runs ``torch.ops.costeff.slim_ffn`` on ``hidden`` [..., hidden_size]."""
    return op_handle(NAME)(hidden, in_weight, in_bias, out_weight, out_bias)


@follows_autocast("lower")
def slim_ffn_reference(hidden, in_weight, in_bias, out_weight, out_bias):
    """Plain PyTorch composition (computes in fp32 for 16-bit inputs; under autocast, in the autocast
    dtype as the op)."""
    check_slim_ffn(hidden, in_weight, in_bias, out_weight, out_bias)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    mid = F.gelu(F.linear(hidden.to(acc), in_weight.to(acc), in_bias.to(acc)))
    return F.linear(mid, out_weight.to(acc), out_bias.to(acc)).to(hidden.dtype)


def _fake(hidden, in_weight, in_bias, out_weight, out_bias):
    check_slim_ffn(hidden, in_weight, in_bias, out_weight, out_bias)
    return hidden.new_empty(hidden.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    hidden, in_weight, in_bias, out_weight, out_bias = ctx.saved_tensors
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    shape = hidden.shape
    x = hidden.reshape(-1, shape[-1]).to(acc)
    g = grad_out.reshape(-1, shape[-1]).to(acc)
    pre = F.linear(x, in_weight.to(acc), in_bias.to(acc))
    cdf = 0.5 * (1 + torch.erf(pre * (1 / math.sqrt(2))))
    act = pre * cdf
    grad_out_weight = g.t() @ act
    grad_out_bias = g.sum(0)
    # d gelu(x)/dx = Phi(x) + x * phi(x)
    grad_pre = (g @ out_weight.to(acc)) * (cdf + pre * torch.exp(-0.5 * pre * pre) / math.sqrt(2 * math.pi))
    grad_in_weight = grad_pre.t() @ x
    grad_in_bias = grad_pre.sum(0)
    grad_hidden = (grad_pre @ in_weight.to(acc)).reshape(shape)
    return (
        grad_hidden.to(hidden.dtype),
        grad_in_weight.to(in_weight.dtype),
        grad_in_bias.to(in_bias.dtype),
        grad_out_weight.to(out_weight.dtype),
        grad_out_bias.to(out_bias.dtype),
    )


if extension_loaded():
    torch.library.register_fake(f"costeff::{NAME}")(_fake)
    torch.library.register_autograd(f"costeff::{NAME}", _backward, setup_context=_setup_context)
    register_autocast_policy(NAME, "lower")
    register_triton_cuda(NAME)
