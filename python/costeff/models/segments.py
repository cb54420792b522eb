"""The early-exit model cut into exportable pieces: the embeddings, then one segment per exit.

Segment k runs the layers after exit k-1 up to and including exit k's layer, then exit k:

    EmbeddingSegment(input_ids, token_type_ids, attention_mask) -> hidden
    ExitSegment(hidden, attention_mask) -> (logits, entropy, hidden)

A runner calls the segments in order and drops the rows whose entropy is under the threshold between
calls (:func:`costeff.models.modeling_costeff.run_exit_segments`), which is how the early exit survives
``torch.export`` and ONNX: each graph is static, the loop around them is the caller's. Segment k's
exit reads the state ``early_exit`` reads (CLS, or the mean of real tokens for ``exit_pooling="mean"``).

The segments run the layers' reference path (the ``costeff::*`` ops have no ONNX form) without the
eager entry points' input checks, so ``torch.export.export`` traces them with dynamic batch and
sequence sizes; check inputs with :func:`costeff.models.prepare_inputs` first. That path skips a block
with 0 heads or 0 FFN neurons (its output is the block's bias), so no zero-size weight is traced.
"""
from __future__ import annotations

import torch
from torch import nn

from costeff.models.modeling_costeff import exit_input, segment_spans
from costeff.ops.exit_head import exit_head_logits_entropy


class EmbeddingSegment(nn.Module):
    """input_ids, token_type_ids, attention_mask (int64 [batch, seq]) -> hidden [batch, seq, hidden_size].
    The mask is read only with RoBERTa-style positions (``position_offset``)."""

    def __init__(self, model):
        super().__init__()
        self.embeddings = model.costeff.embeddings

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids, token_type_ids, use_kernels=False, dropout=False, attention_mask=attention_mask)


class ExitSegment(nn.Module):
    """hidden [batch, seq, hidden_size], attention_mask (0/1 or bool [batch, seq]) ->
    (exit logits [batch, num_labels], entropy [batch] in nats, hidden after the exit's layer)."""

    def __init__(self, model, index: int):
        super().__init__()
        cfg = model.config
        spans = segment_spans(cfg)
        if not 0 <= index < len(spans):
            raise ValueError(f"ExitSegment: index must be in [0, {len(spans)}) (one segment per exit), got {index}")
        start, end = spans[index]
        self.layers = nn.ModuleList(model.costeff.layers[start:end])
        self.exit = model.exits[index]
        self.exit_layer = end
        self.last = end == cfg.num_hidden_layers
        self.config = cfg

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        for layer in self.layers:
            hidden = layer(hidden, attention_mask, use_kernels=False)
        state = exit_input(hidden, attention_mask, self.config, self.last)
        pooler = self.exit.pooler
        logits, entropy = exit_head_logits_entropy(
            state, self.exit.classifier.weight, self.exit.classifier.bias,
            pooler.weight if pooler is not None else None, pooler.bias if pooler is not None else None, self.exit.activation,
        )
        return logits, entropy, hidden


def exit_segments(model) -> list[ExitSegment]:
    """One :class:`ExitSegment` per exit of ``model`` (sharing its parameters), in layer order."""
    return [ExitSegment(model, k) for k in range(model.config.num_exits)]
