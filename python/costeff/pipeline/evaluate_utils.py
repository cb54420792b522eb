"""Batch, prediction and metric helpers shared by the stages."""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader

from costeff.data import metrics as M


INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict) -> dict:
    """The model's keyword inputs from a collated batch (drops labels)."""
    return {k: batch[k] for k in INPUT_KEYS if k in batch}


@torch.no_grad()
def predict_logits(forward: Callable[[dict], torch.Tensor], loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs forward(batch) -> logits over a loader; returns (logits, labels) on CPU."""
    outs, labels = [], []
    for batch in loader:
        outs.append(forward(batch).float().cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(outs), torch.cat(labels)


def score_logits(logits: torch.Tensor, labels: torch.Tensor, metric: str) -> dict:
    res = M.compute(metric, logits.argmax(-1), labels)
    res["score"] = res[metric]
    return res
