"""Fused exit head: CLS state -> [pooler dense] -> activation -> classifier -> logits, softmax entropy
and the early-exit decision ``entropy < threshold``. The activation is "tanh" (BERT's pooler, RoBERTa's
head; the default), "relu" (DistilBERT's head) or "gelu" (exact erf GELU: ELECTRA's head).

Kernels: csrc/cpu/exit_head.cpp (CPU), csrc/cuda/exit_head.cu (CUDA), costeff_kernels/exit_head.py
(Triton). Reference: :func:`exit_head_reference`. Entropy is in nats, float32 (float64 for float64
inputs); logits keep the input dtype. Non-finite logits raise instead of producing a silent NaN exit.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from costeff._extension import extension_loaded
from costeff.ops._checks import check_exit_head, check_threshold
from costeff.ops._registry import follows_autocast, op_handle, register_autocast_policy, register_triton_cuda

NAME = "exit_head"


class ExitHeadOutput(NamedTuple):
    logits: torch.Tensor
    entropy: torch.Tensor
    exit_mask: torch.Tensor


def exit_head(
    hidden: torch.Tensor,
    classifier_weight: torch.Tensor,
    classifier_bias: torch.Tensor,
    threshold: float,
    pooler_weight: Optional[torch.Tensor] = None,
    pooler_bias: Optional[torch.Tensor] = None,
    activation: str = "tanh",
) -> ExitHeadOutput:
    """Runs ``torch.ops.costeff.exit_head`` on ``hidden`` [batch, hidden_size] (the CLS states).

    Differentiable in ``hidden`` and the weights through logits and entropy."""
    threshold = check_threshold(f"costeff::{NAME}", threshold)
    out = op_handle(NAME)(hidden, pooler_weight, pooler_bias, classifier_weight, classifier_bias, threshold, activation)
    return ExitHeadOutput(*out)


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(x)
    if activation == "gelu":
        return F.gelu(x)
    return torch.tanh(x)


def exit_head_logits_entropy(
    hidden: torch.Tensor,
    classifier_weight: torch.Tensor,
    classifier_bias: torch.Tensor,
    pooler_weight: Optional[torch.Tensor] = None,
    pooler_bias: Optional[torch.Tensor] = None,
    activation: str = "tanh",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exit head's math without checks (so ``torch.export`` / ONNX tracing see no data-dependent
    branch): logits (input dtype) and entropy (float32, float64 for float64 inputs)."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h = hidden.to(acc)
    if pooler_weight is not None:
        h = F.linear(h, pooler_weight.to(acc), pooler_bias.to(acc))
    logits = F.linear(activate(h, activation), classifier_weight.to(acc), classifier_bias.to(acc))
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = (-(log_p.exp() * log_p).sum(-1)).clamp_min(0)
    return logits.to(hidden.dtype), entropy


@follows_autocast("fp32")
def exit_head_reference(
    hidden: torch.Tensor,
    classifier_weight: torch.Tensor,
    classifier_bias: torch.Tensor,
    threshold: float,
    pooler_weight: Optional[torch.Tensor] = None,
    pooler_bias: Optional[torch.Tensor] = None,
    activation: str = "tanh",
) -> ExitHeadOutput:
    """Plain PyTorch composition of the exit head (computes in fp32 for 16-bit inputs; under autocast,
    float32 as the op)."""
    check_exit_head(hidden, pooler_weight, pooler_bias, classifier_weight, classifier_bias, threshold, activation)
    logits, entropy = exit_head_logits_entropy(hidden, classifier_weight, classifier_bias, pooler_weight, pooler_bias, activation)
    if not torch.isfinite(entropy).all():
        bad = int((~torch.isfinite(entropy)).nonzero()[0, 0])
        raise ValueError(f"costeff::exit_head: non-finite logits (NaN/Inf) in row {bad}: check hidden and the pooler/classifier weights for NaN/Inf")
    return ExitHeadOutput(logits, entropy, entropy < threshold)


def _fake(hidden, pooler_weight, pooler_bias, classifier_weight, classifier_bias, threshold, activation="tanh"):
    c = check_exit_head(hidden, pooler_weight, pooler_bias, classifier_weight, classifier_bias, threshold, activation)
    b = hidden.shape[0]
    ent_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return (
        hidden.new_empty((b, c)),
        hidden.new_empty((b,), dtype=ent_dtype),
        hidden.new_empty((b,), dtype=torch.bool),
    )


def _setup_context(ctx, inputs, output):
    hidden, pooler_weight, pooler_bias, classifier_weight, classifier_bias, _, activation = inputs
    logits, entropy, _ = output
    ctx.has_pooler = pooler_weight is not None
    ctx.activation = activation
    ctx.save_for_backward(hidden, pooler_weight, pooler_bias, classifier_weight, logits, entropy)


def _backward(ctx, grad_logits, grad_entropy, _grad_exit):
    hidden, pooler_weight, pooler_bias, classifier_weight, logits, entropy = ctx.saved_tensors
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h = hidden.to(acc)
    grad_z = torch.zeros(logits.shape, dtype=acc, device=logits.device)
    if grad_logits is not None:
        grad_z = grad_z + grad_logits.to(acc)
    if grad_entropy is not None:
        # dH/dz_i = -p_i (log p_i + H)
        log_p = torch.log_softmax(logits.to(acc), dim=-1)
        grad_z = grad_z - grad_entropy.to(acc)[:, None] * log_p.exp() * (log_p + entropy.to(acc)[:, None])
    pre = F.linear(h, pooler_weight.to(acc), pooler_bias.to(acc)) if ctx.has_pooler else h
    pooled = activate(pre, ctx.activation)
    grad_cw = grad_z.t() @ pooled
    grad_cb = grad_z.sum(0)
    grad_pre = (grad_z @ classifier_weight.to(acc)) * _activation_derivative(pre, pooled, ctx.activation)
    grad_pw = grad_pb = None
    if ctx.has_pooler:
        grad_pw = (grad_pre.t() @ h).to(pooler_weight.dtype)
        grad_pb = grad_pre.sum(0).to(pooler_bias.dtype)
        grad_hidden = grad_pre @ pooler_weight.to(acc)
    else:
        grad_hidden = grad_pre
    return (
        grad_hidden.to(hidden.dtype),
        grad_pw,
        grad_pb,
        grad_cw.to(classifier_weight.dtype),
        grad_cb.to(classifier_weight.dtype),
        None,
        None,
    )


def _activation_derivative(pre, out, activation: str):
    if activation == "relu":
        return (pre > 0).to(pre.dtype)
    if activation == "gelu":  # d/dx x Phi(x) = Phi(x) + x phi(x)
        return 0.5 * (1 + torch.erf(pre * 0.7071067811865476)) + pre * torch.exp(-0.5 * pre * pre) * 0.3989422804014327
    return 1 - out * out


if extension_loaded():
    torch.library.register_fake(f"costeff::{NAME}")(_fake)
    torch.library.register_autograd(f"costeff::{NAME}", _backward, setup_context=_setup_context)
    register_autocast_policy(NAME, "fp32")
    register_triton_cuda(NAME)
