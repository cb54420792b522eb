"""COST-EFF's distillation losses (as the official run_glue_costeff.py computes them)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """CE(student / T, softmax(teacher / T)), mean over the batch."""
    t = temperature
    target = torch.softmax(teacher_logits.detach() / t, dim=-1)
    return -(target * torch.log_softmax(student_logits / t, dim=-1)).sum(-1).mean()


def exitwise_soft_cross_entropy(student_exits: Sequence[torch.Tensor], teacher_exits: Sequence[torch.Tensor],
                                temperature: float = 1.0) -> torch.Tensor:
    """Sum over exits of soft_cross_entropy(student exit i, teacher exit i). A single-exit teacher (a
    fine-tuned HF classifier, the "no TA" ablation) is every student exit's target."""
    if len(teacher_exits) == 1:
        teacher_exits = list(teacher_exits) * len(student_exits)
    if len(student_exits) != len(teacher_exits):
        raise ValueError(f"the student has {len(student_exits)} exits but the teacher {len(teacher_exits)}; use the same exit_start")
    return sum(soft_cross_entropy(s, t, temperature) for s, t in zip(student_exits, teacher_exits))


def hidden_mse(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    projections: Sequence[torch.nn.Module] | None = None,
) -> torch.Tensor:
    """Per layer: MSE over the hidden dim, summed over real tokens, / real tokens, mean over the
    batch; summed over layers. Optional per-layer projections map student width to teacher width."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"hidden_mse: {len(student_hidden)} student layers vs {len(teacher_hidden)} teacher layers")
    mask = attention_mask.to(student_hidden[0].dtype)
    tokens = mask.sum(1).clamp_min(1)
    total = student_hidden[0].new_zeros(())
    for i, (s, t) in enumerate(zip(student_hidden, teacher_hidden)):
        if projections is not None:
            s = projections[i](s)
        per_token = (s - t.detach()).pow(2).mean(-1)
        total = total + ((per_token * mask).sum(1) / tokens).mean()
    return total


def hard_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)
