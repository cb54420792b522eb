"""Analytic FLOPs / MACs and parameter counts of a COST-EFF model, from its config.

Convention: matrix multiplications only (one multiply-add = 1 MAC = 2 FLOPs); embedding lookups,
LayerNorm, softmax, GELU and tanh are not counted (they are O(seq x hidden), under 1% for BERT-base).
BERT-base at 128 tokens: 11.17 GMACs = 22.35 GFLOPs for the encoder, plus the pooler and classifier.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from costeff.models.configuration_costeff import CostEffConfig


def layer_macs(config: CostEffConfig, layer: int, seq_len: int) -> dict:
    """MACs of 0-based ``layer`` for one sample of ``seq_len`` tokens, by part."""
    s, h = int(seq_len), config.hidden_size
    inner = config.num_attention_heads[layer] * config.attention_head_size[layer]
    inter = config.intermediate_size[layer]
    return {
        "qkv": s * h * 3 * inner,
        "scores": s * s * inner,  # Q K^T over all heads
        "context": s * s * inner,  # P V over all heads
        "attention_out": s * inner * h,
        "ffn": 2 * s * h * inter,
    }


def exit_macs(config: CostEffConfig, layer: int) -> int:
    """MACs of the exit after 1-based ``layer`` (0 when that layer has none)."""
    if not config.exit_start <= layer <= config.num_hidden_layers:
        return 0
    h = config.hidden_size
    dense = layer == config.num_hidden_layers or config.exit_pooler_dense
    return (h * h if dense else 0) + h * config.num_labels


def embedding_macs(config: CostEffConfig, seq_len: int) -> int:
    """The factorized word embedding's r x width projection and ELECTRA's width x hidden projection
    (lookups are free)."""
    w = config.embedding_width
    macs = config.embedding_rank * w if config.embedding_rank else 0
    macs += w * config.hidden_size if config.embedding_size is not None else 0
    return int(seq_len) * macs


def macs_per_sample(config: CostEffConfig, seq_len: int, exit_layer: Optional[int] = None, include_exits: bool = True) -> int:
    """MACs for one sample of ``seq_len`` tokens leaving at 1-based ``exit_layer`` (default: the last
    layer): embeddings, layers 1..exit_layer, and every exit evaluated on the way."""
    n = config.num_hidden_layers
    exit_layer = n if exit_layer is None else int(exit_layer)
    if not 1 <= exit_layer <= n:
        raise ValueError(f"exit_layer must be in [1, {n}], got {exit_layer}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    total = embedding_macs(config, seq_len)
    for i in range(exit_layer):
        total += sum(layer_macs(config, i, seq_len).values())
        if include_exits:
            total += exit_macs(config, i + 1)
    return total


def flops_per_sample(config: CostEffConfig, seq_len: int, exit_layer: Optional[int] = None, include_exits: bool = True) -> int:
    """2 x :func:`macs_per_sample`."""
    return 2 * macs_per_sample(config, seq_len, exit_layer, include_exits)


def parameter_count(config: CostEffConfig, include_embeddings: bool = True, include_exits: bool = True) -> int:
    """Parameters implied by the config (equals the model's numel). Embeddings = word factor(s),
    position and token-type tables, the embedding LayerNorm and ELECTRA's projection."""
    h, w = config.hidden_size, config.embedding_width
    total = 0
    if include_embeddings:
        r = config.embedding_rank
        total += config.word_rows * (r if r else w) + (r * w if r else 0)
        total += (config.max_position_embeddings + config.type_vocab_size) * w + 2 * w
        total += w * h + h if config.embedding_size is not None else 0
    for i in range(config.num_hidden_layers):
        inner = config.num_attention_heads[i] * config.attention_head_size[i]
        inter = config.intermediate_size[i]
        total += 3 * inner * (h + 1) + inner * h + h  # qkv + attention out
        total += inter * (h + 1) + h * inter + h  # ffn
        total += 4 * h  # two LayerNorms
    if include_exits:
        for layer in config.exit_layers():
            dense = layer == config.num_hidden_layers or config.exit_pooler_dense
            total += (h * h + h if dense else 0) + config.num_labels * (h + 1)
    return total


def count_parameters(model: nn.Module, include_embeddings: bool = True) -> int:
    """Counts a model's parameters (numel), optionally without the embedding module."""
    total = 0
    for name, p in model.named_parameters():
        if not include_embeddings and ".embeddings." in f".{name}":
            continue
        total += p.numel()
    return total
