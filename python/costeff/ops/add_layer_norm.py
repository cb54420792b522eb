"""Residual add + LayerNorm: ``LayerNorm(x + residual)`` over the last dimension, any hidden size.
Kernels: csrc/cpu/add_layer_norm.cpp (CPU), csrc/cuda/add_layer_norm.cu (CUDA),
costeff_kernels/add_layer_norm.py (Triton). Reference: :func:`add_layer_norm_reference`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from costeff._extension import extension_loaded
from costeff.ops._checks import check_add_layer_norm
from costeff.ops._registry import follows_autocast, op_handle, register_autocast_policy, register_triton_cuda

NAME = "add_layer_norm"


def add_layer_norm(x, residual, weight, bias, eps: float = 1e-12):
    """Runs ``torch.ops.costeff.add_layer_norm`` (BERT's default eps is 1e-12)."""
    return op_handle(NAME)(x, residual, weight, bias, float(eps))


@follows_autocast("fp32")
def add_layer_norm_reference(x, residual, weight, bias, eps: float = 1e-12):
    """Plain PyTorch composition (computes in fp32 for 16-bit inputs; under autocast, float32 as the op)."""
    check_add_layer_norm(x, residual, weight, bias, eps)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = x.to(acc) + residual.to(acc)
    # weight.shape, not s.shape: the ONNX tracer needs a constant normalized shape
    return F.layer_norm(s, weight.shape, weight.to(acc), bias.to(acc), eps).to(x.dtype)


def _fake(x, residual, weight, bias, eps):
    check_add_layer_norm(x, residual, weight, bias, eps)
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    ctx.eps = eps
    ctx.save_for_backward(x, residual, weight, bias)


def _backward(ctx, grad_out):
    x, residual, weight, bias = ctx.saved_tensors
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = x.shape[-1]
    s = x.to(acc) + residual.to(acc)
    var, mean = torch.var_mean(s, dim=-1, keepdim=True, correction=0)
    rstd = torch.rsqrt(var + ctx.eps)
    grad_s, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
        grad_out.to(acc), s, [n], mean, rstd, weight.to(acc), bias.to(acc), [True, True, True]
    )
    grad_s = grad_s.to(x.dtype)
    return grad_s, grad_s.clone(), grad_w.to(weight.dtype), grad_b.to(bias.dtype), None


if extension_loaded():
    torch.library.register_fake(f"costeff::{NAME}")(_fake)
    torch.library.register_autograd(f"costeff::{NAME}", _backward, setup_context=_setup_context)
    register_autocast_policy(NAME, "fp32")
    register_triton_cuda(NAME)
