"""Task metrics on integer predictions (accuracy, binary F1 with positive class 1, Matthews corr.)."""
from __future__ import annotations

import math

import torch


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return (pred == labels).double().mean().item() if labels.numel() else float("nan")


def f1_binary(pred: torch.Tensor, labels: torch.Tensor) -> float:
    tp = ((pred == 1) & (labels == 1)).sum().item()
    fp = ((pred == 1) & (labels == 0)).sum().item()
    fn = ((pred == 0) & (labels == 1)).sum().item()
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews(pred: torch.Tensor, labels: torch.Tensor) -> float:
    tp = ((pred == 1) & (labels == 1)).sum().item()
    tn = ((pred == 0) & (labels == 0)).sum().item()
    fp = ((pred == 1) & (labels == 0)).sum().item()
    fn = ((pred == 0) & (labels == 1)).sum().item()
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


METRICS = {"accuracy": accuracy, "f1": f1_binary, "matthews": matthews}


def compute(metric: str, pred: torch.Tensor, labels: torch.Tensor) -> dict:
    """{'accuracy': ..., <metric>: ...}."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
    out = {"accuracy": accuracy(pred, labels)}
    out[metric] = METRICS[metric](pred, labels)
    return out
