"""Multi-exit slenderized BERT (COST-EFF) as transformers PreTrainedModels.

One layer's math lives in :class:`CostEffLayer`: the kernel path calls costeff.ops.slim_attention /
add_layer_norm / slim_ffn, the reference path the matching ``<op>_reference`` functions, and a training
forward with dropout composes the reference math with dropout (the kernels have no dropout).
Exits: :class:`CostEffExit` (costeff.ops.exit_head or exit_head_reference).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput

from costeff._extension import extension_loaded
from costeff.outputs import EarlyExitOutput  # noqa: F401  (defined apart: the engine returns it without importing this module)
from costeff.models.configuration_costeff import CostEffConfig
from costeff.ops import (
    add_layer_norm,
    add_layer_norm_reference,
    exit_head,
    exit_head_reference,
    slim_attention,
    slim_attention_reference,
    slim_ffn,
    slim_ffn_reference,
)
from costeff.ops._checks import check_threshold
from costeff.ops.exit_head import ExitHeadOutput, activate


# ----------------------------------------------------------------------------------------------
# Input checks


def check_input_shape(config: CostEffConfig, input_ids) -> tuple[int, int]:
    """The rules of ``prepare_inputs`` that read no values (type, rank, dtype, length), so a GPU caller
    checks them without a device sync; returns (batch, seq_len)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D [batch, seq_len], got shape {list(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    b, s = input_ids.shape
    if s == 0:
        raise ValueError("input_ids has seq_len 0: every row needs at least one token ([CLS])")
    max_len = config.max_position_embeddings - (config.position_offset or 0)
    if s > max_len:
        offset = f" from position_offset={config.position_offset} (RoBERTa-style)" if config.position_offset else ""
        raise ValueError(
            f"input_ids has seq_len {s} but the position table holds max_position_embeddings="
            f"{config.max_position_embeddings}{offset}: at most {max_len} tokens; truncate the input"
        )
    return b, s


def prepare_inputs(config: CostEffConfig, input_ids, attention_mask=None, token_type_ids=None):
    """Validates inputs and returns (input_ids, bool key mask, token_type_ids). Refuses inputs longer
    than the position table and rows with no real token (HF would attend uniformly to padding there,
    our attention gives such a query a zero context: the two would silently disagree). The C++ engine
    applies the same rules (csrc/engine/run.cpp); tests/test_input_rules.py pins both to one table."""
    b, s = check_input_shape(config, input_ids)
    if b and (int(input_ids.min()) < 0 or int(input_ids.max()) >= config.vocab_size):
        raise ValueError(f"input_ids must be in [0, vocab_size={config.vocab_size}), got values in [{int(input_ids.min())}, {int(input_ids.max())}]")
    if attention_mask is None:
        mask = torch.ones(b, s, dtype=torch.bool, device=input_ids.device)
    else:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            got = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must have the shape of input_ids {list(input_ids.shape)}, got {got}")
        if attention_mask.is_complex():
            raise TypeError(f"attention_mask must be bool, integer or float, got {attention_mask.dtype}")
        if attention_mask.dtype != torch.bool and not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise ValueError("attention_mask must hold 0/1 (1 = real token); additive masks are not accepted")
        mask = attention_mask.bool()
        if b:
            empty = (~mask.any(1)).nonzero().flatten()
            if empty.numel():
                raise ValueError(
                    f"attention_mask rows {empty.tolist()[:8]} have no real token (all padding); remove them "
                    "from the batch"
                )
    if token_type_ids is None:
        types = torch.zeros(b, s, dtype=torch.long, device=input_ids.device)
    else:
        if not isinstance(token_type_ids, torch.Tensor) or token_type_ids.shape != input_ids.shape:
            raise ValueError(f"token_type_ids must have the shape of input_ids {list(input_ids.shape)}")
        if token_type_ids.dtype.is_floating_point or token_type_ids.is_complex() or token_type_ids.dtype == torch.bool:
            raise TypeError(f"token_type_ids must be an integer tensor, got {token_type_ids.dtype}")
        types = token_type_ids.long()
        if b and (int(types.min()) < 0 or int(types.max()) >= config.type_vocab_size):
            raise ValueError(f"token_type_ids must be in [0, type_vocab_size={config.type_vocab_size})")
    return input_ids.long(), mask, types


def _resolve_kernels(use_kernels: Optional[bool]) -> bool:
    if use_kernels is None:
        return extension_loaded()
    return bool(use_kernels)


# ----------------------------------------------------------------------------------------------
# Modules


class CostEffEmbeddings(nn.Module):
    """Word (optionally factorized: vocab x r then r x hidden), position and token-type embeddings,
    summed and layer-normalized. Positions are column indices, or with ``position_offset`` counted
    over the real tokens of the attention mask (RoBERTa). With ``embedding_size`` the tables are that
    wide and ``embedding_projection`` maps the normalized sum to hidden_size (ELECTRA)."""

    def __init__(self, config: CostEffConfig):
        super().__init__()
        h, r = config.embedding_width, config.embedding_rank
        self.word_embeddings = nn.Embedding(config.word_rows, r if r is not None else h)
        # a pruned vocabulary: token id -> row (int32: the ONNX/engine-friendly index type)
        self.register_buffer("token_id_map", torch.zeros(config.vocab_size, dtype=torch.int32) if config.pruned_vocab_size else None)
        # Linear(r, width) without bias: weight [width, r] (the r x width factor, transposed)
        self.word_projection = nn.Linear(r, h, bias=False) if r is not None else None
        self.embedding_projection = nn.Linear(h, config.hidden_size) if config.embedding_size is not None else None
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.position_offset = config.position_offset

    def word_matrix(self) -> torch.Tensor:
        """The full vocab x width word-embedding matrix (the product when factorized)."""
        w = self.word_embeddings.weight
        return w if self.word_projection is None else w @ self.word_projection.weight.t()

    def forward(self, input_ids, token_type_ids, use_kernels: bool, dropout: bool, attention_mask=None):
        words = self.word_embeddings(input_ids if self.token_id_map is None else self.token_id_map[input_ids])
        if self.word_projection is not None:
            words = self.word_projection(words)
        # the position add materializes [batch, seq, hidden] once; token types are the residual
        if self.position_offset is None:
            x = words + self.position_embeddings.weight[: input_ids.shape[1]]
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            real = attention_mask.long()
            x = words + self.position_embeddings(real.cumsum(1) * real + (self.position_offset - 1))
        ln = add_layer_norm if use_kernels else add_layer_norm_reference
        out = ln(x, self.token_type_embeddings(token_type_ids), self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps)
        out = self.dropout(out) if dropout else out
        return self.embedding_projection(out) if self.embedding_projection is not None else out


class CostEffAttention(nn.Module):
    """Weights of one slim self-attention block. ``qkv_weight`` is the kernel's fused layout
    [3 * heads * head_size, hidden]: query rows, key rows, value rows, each head-major."""

    def __init__(self, hidden_size: int, num_heads: int, head_size: int):
        super().__init__()
        self.num_heads, self.head_size = num_heads, head_size
        inner = num_heads * head_size
        self.qkv_weight = nn.Parameter(torch.empty(3 * inner, hidden_size))
        self.qkv_bias = nn.Parameter(torch.zeros(3 * inner))
        self.out_weight = nn.Parameter(torch.empty(hidden_size, inner))
        self.out_bias = nn.Parameter(torch.zeros(hidden_size))

    def args(self):
        return self.qkv_weight, self.qkv_bias, self.out_weight, self.out_bias, self.num_heads

    def forward_with_dropout(self, hidden, mask, p: float):
        """Training attention with dropout on the attention probabilities (SDPA; rows have >= 1 key)."""
        b, s, _ = hidden.shape
        if self.num_heads == 0:
            return self.out_bias.expand_as(hidden) + 0 * hidden
        qkv = F.linear(hidden, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.view(b, s, 3, self.num_heads, self.head_size).permute(2, 0, 3, 1, 4)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], dropout_p=p)
        ctx = ctx.transpose(1, 2).reshape(b, s, self.num_heads * self.head_size)
        return F.linear(ctx, self.out_weight, self.out_bias)


class CostEffFFN(nn.Module):
    """Weights of one slim FFN: in [intermediate, hidden], out [hidden, intermediate]."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.in_weight = nn.Parameter(torch.empty(intermediate_size, hidden_size))
        self.in_bias = nn.Parameter(torch.zeros(intermediate_size))
        self.out_weight = nn.Parameter(torch.empty(hidden_size, intermediate_size))
        self.out_bias = nn.Parameter(torch.zeros(hidden_size))

    def args(self):
        return self.in_weight, self.in_bias, self.out_weight, self.out_bias


class CostEffLayer(nn.Module):
    """attention -> add+LN -> FFN -> add+LN, on the kernels or the references."""

    def __init__(self, config: CostEffConfig, index: int):
        super().__init__()
        h = config.hidden_size
        self.attention = CostEffAttention(h, config.num_attention_heads[index], config.attention_head_size[index])
        self.attention_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.ffn = CostEffFFN(h, config.intermediate_size[index])
        self.ffn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.hidden_dropout = config.hidden_dropout_prob
        self.attention_dropout = config.attention_probs_dropout_prob

    def forward(self, hidden, mask, use_kernels: bool, dropout: bool = False):
        an, fn = self.attention_norm, self.ffn_norm
        if dropout and (self.hidden_dropout > 0 or self.attention_dropout > 0):
            a = self.attention.forward_with_dropout(hidden, mask, self.attention_dropout)
            h1 = add_layer_norm_reference(F.dropout(a, self.hidden_dropout), hidden, an.weight, an.bias, an.eps)
            f = F.dropout(slim_ffn_reference(h1, *self.ffn.args()), self.hidden_dropout)
            return add_layer_norm_reference(f, h1, fn.weight, fn.bias, fn.eps)
        if use_kernels:
            h1 = add_layer_norm(slim_attention(hidden, mask, *self.attention.args()), hidden, an.weight, an.bias, an.eps)
            return add_layer_norm(slim_ffn(h1, *self.ffn.args()), h1, fn.weight, fn.bias, fn.eps)
        # the reference path skips a removed block (its output is its bias), so that torch.export and the
        # ONNX tracer (costeff.models.segments) see no zero-size weight
        att = self.attention
        a = slim_attention_reference(hidden, mask, *att.args()) if att.num_heads else att.out_bias.expand_as(hidden)
        h1 = add_layer_norm_reference(a, hidden, an.weight, an.bias, an.eps)
        f = slim_ffn_reference(h1, *self.ffn.args()) if self.ffn.in_weight.shape[0] else self.ffn.out_bias.expand_as(h1)
        return add_layer_norm_reference(f, h1, fn.weight, fn.bias, fn.eps)


class CostEffExit(nn.Module):
    """Exit on the CLS state: [dense -> activation | tanh] -> dropout -> classifier."""

    def __init__(self, hidden_size: int, num_labels: int, dense: bool, dropout: float, activation: str = "tanh"):
        super().__init__()
        self.pooler = nn.Linear(hidden_size, hidden_size) if dense else None
        self.activation = activation if dense else "tanh"
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, cls_state, use_kernels: bool, threshold: float = 0.0, dropout: bool = False) -> ExitHeadOutput:
        pw = self.pooler.weight if self.pooler is not None else None
        pb = self.pooler.bias if self.pooler is not None else None
        cw, cb = self.classifier.weight, self.classifier.bias
        if dropout and self.dropout.p > 0:
            x = cls_state if self.pooler is None else self.pooler(cls_state)
            logits = self.classifier(self.dropout(activate(x, self.activation)))
            log_p = torch.log_softmax(logits.float(), -1)
            entropy = -(log_p.exp() * log_p).sum(-1)
            return ExitHeadOutput(logits, entropy, entropy < threshold)
        fn = exit_head if use_kernels else exit_head_reference
        return fn(cls_state, cw, cb, threshold, pw, pb, self.activation)


class _GradRescale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def gradient_rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward, gradient multiplied by ``scale`` (COST-EFF's gradient equilibrium)."""
    return _GradRescale.apply(x, scale)


# ----------------------------------------------------------------------------------------------
# Outputs


@dataclass
class CostEffSequenceClassifierOutput(ModelOutput):
    """Training forward output. ``logits`` is the last exit's; ``exit_logits`` holds every exit's
    logits in layer order (layers ``exit_layers``); ``hidden_states`` = embeddings + every layer."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    exit_logits: Optional[tuple] = None
    hidden_states: Optional[tuple] = None
    exit_layers: Optional[tuple] = None


# ----------------------------------------------------------------------------------------------
# Checkpoint checks (run before transformers loads anything)


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / s for s in shards]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"costeff checkpoint {path}: shard {f.name} listed in {index.name} is missing")
        return files
    pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    hint = f" (found {pickles}: pickled weights are never loaded)" if pickles else ""
    raise FileNotFoundError(f"costeff checkpoint {path}: no model.safetensors (or sharded index) found{hint}")


def check_checkpoint(path, model_class) -> CostEffConfig:
    """Checks that ``path`` holds config.json + safetensors whose tensor names and shapes are exactly
    those the config implies; raises FileNotFoundError / ValueError naming the problem."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"costeff checkpoint directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"costeff checkpoint {path}: config.json is missing")
    config = CostEffConfig.from_pretrained(path)
    with torch.device("meta"):
        expected_model = model_class(config)
    expected = {k: tuple(v.shape) for k, v in expected_model.state_dict().items()}
    found: dict[str, tuple] = {}
    for f in _checkpoint_files(path):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    found[k] = tuple(fh.get_slice(k).get_shape())
        except SafetensorError as exc:
            raise ValueError(f"costeff checkpoint {f} is not a readable safetensors file ({exc}): corrupt or truncated") from None
    prefix = model_class.base_model_prefix + "."
    if not any(k.startswith(prefix) for k in expected) and any(k.startswith(prefix) for k in found):
        # loading the encoder alone from a classifier checkpoint: only the encoder's tensors matter
        found = {k[len(prefix):]: v for k, v in found.items() if k.startswith(prefix)}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [f"{k}: checkpoint {list(found[k])} vs config {list(expected[k])}" for k in sorted(expected) if k in found and found[k] != expected[k]]
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:6]) + (" ..." if len(mismatched) > 6 else ""))
    if missing:
        problems.append(f"missing tensors: {missing[:6]}" + (" ..." if len(missing) > 6 else ""))
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected[:6]}" + (" ..." if len(unexpected) > 6 else ""))
    if problems:
        raise ValueError(f"costeff checkpoint {path} does not match its config.json: " + " | ".join(problems))
    if config.pruned_vocab_size:
        _check_token_id_map(path, config, prefix)
    return config


def _check_token_id_map(path: Path, config: CostEffConfig, prefix: str) -> None:
    """A pruned vocabulary's id map must be integers indexing the table's rows."""
    from safetensors import safe_open

    for f in _checkpoint_files(path):
        with safe_open(str(f), framework="pt") as fh:
            for name in (prefix + "embeddings.token_id_map", "embeddings.token_id_map"):
                if name in fh.keys():
                    m = fh.get_tensor(name)
                    if m.dtype.is_floating_point or m.dtype == torch.bool:
                        raise ValueError(f"costeff checkpoint {path}: {name} must hold integer rows, got {m.dtype}")
                    if m.numel() and (int(m.min()) < 0 or int(m.max()) >= config.pruned_vocab_size):
                        raise ValueError(f"costeff checkpoint {path}: {name} holds rows outside [0, pruned_vocab_size="
                                         f"{config.pruned_vocab_size}): corrupt or mismatched")


# ----------------------------------------------------------------------------------------------
# PreTrainedModels


class CostEffPreTrainedModel(PreTrainedModel):
    config_class = CostEffConfig
    base_model_prefix = "costeff"
    supports_gradient_checkpointing = False
    _no_split_modules = ["CostEffLayer", "CostEffEmbeddings"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, CostEffAttention):
            init.normal_(module.qkv_weight, mean=0.0, std=std)
            init.zeros_(module.qkv_bias)
            init.normal_(module.out_weight, mean=0.0, std=std)
            init.zeros_(module.out_bias)
        elif isinstance(module, CostEffFFN):
            init.normal_(module.in_weight, mean=0.0, std=std)
            init.zeros_(module.in_bias)
            init.normal_(module.out_weight, mean=0.0, std=std)
            init.zeros_(module.out_bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def resize_token_embeddings(self, new_num_tokens: Optional[int] = None, pad_to_multiple_of: Optional[int] = None, mean_resizing: bool = True):
        """transformers' resize, and with a pruned vocabulary (``token_id_map``) its equivalent: new
        token ids get new rows (at the rows' mean with mean_resizing, where transformers samples around it), cut
        ids drop the rows only they used."""
        emb = self.base_model.embeddings
        if emb.token_id_map is None:
            return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        if new_num_tokens is None:
            return self.get_input_embeddings()
        if pad_to_multiple_of is not None:
            new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        if new_num_tokens <= 0:
            raise ValueError(f"resize_token_embeddings: new_num_tokens must be positive, got {new_num_tokens}")
        old = emb.word_embeddings.weight.detach()
        token_map = emb.token_id_map.long()
        added = max(0, new_num_tokens - token_map.numel())
        if added:
            fresh = old.mean(0, keepdim=True).expand(added, -1) if mean_resizing else torch.randn(added, old.shape[1]) * self.config.initializer_range
            old = torch.cat([old, fresh.to(old)])
            token_map = torch.cat([token_map, torch.arange(self.config.word_rows, self.config.word_rows + added, device=token_map.device)])
        token_map = token_map[:new_num_tokens]
        used, new_map = torch.unique(token_map, return_inverse=True)  # rows still read by some id, in order
        table = nn.Embedding(len(used), old.shape[1], device=old.device, dtype=old.dtype)
        with torch.no_grad():
            table.weight.copy_(old[used])
        emb.word_embeddings = table
        emb.token_id_map = new_map.to(torch.int32)
        self.config.vocab_size, self.config.pruned_vocab_size = new_num_tokens, len(used)
        return table

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, strict: bool = True, **kwargs):
        """transformers' from_pretrained, safetensors only, after checking that every tensor in the
        checkpoint matches the config (``strict=False`` skips that check and the missing/unexpected
        key errors)."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError("costeff models load safetensors only (no pickle); do not pass use_safetensors=False")
        kwargs["use_safetensors"] = True
        path = Path(os.fspath(pretrained_model_name_or_path))
        local = path.exists() or str(pretrained_model_name_or_path).startswith((".", "/", "~"))
        if local and strict:
            check_checkpoint(path, cls)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
        if strict:
            bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
            if cls is CostEffModel and "unexpected_keys" in bad:
                # the encoder alone from a classifier checkpoint: the exits are not the encoder's
                rest = {k for k in bad["unexpected_keys"] if not k.startswith("exits.")}
                bad = {k: v for k, v in bad.items() if k != "unexpected_keys"} | ({"unexpected_keys": rest} if rest else {})
            if bad:
                raise ValueError(f"costeff: loading {pretrained_model_name_or_path} left {bad}")
        return (model, info) if want_info else model


class CostEffModel(CostEffPreTrainedModel):
    """The slenderized encoder: embeddings + layers."""

    def __init__(self, config: CostEffConfig):
        super().__init__(config)
        self.embeddings = CostEffEmbeddings(config)
        self.layers = nn.ModuleList(CostEffLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        output_hidden_states: bool = False,
        use_kernels: Optional[bool] = None,
        return_dict: bool = True,
        **kwargs,
    ):
        ids, mask, types = prepare_inputs(self.config, input_ids, attention_mask, token_type_ids)
        k = _resolve_kernels(use_kernels)
        h = self.embeddings(ids, types, k, self.training, mask)
        states = [h]
        for layer in self.layers:
            h = layer(h, mask, k, self.training)
            states.append(h)
        hidden_states = tuple(states) if output_hidden_states else None
        if not return_dict:
            return (h, hidden_states) if output_hidden_states else (h,)
        return BaseModelOutput(last_hidden_state=h, hidden_states=hidden_states)


class CostEffForSequenceClassification(CostEffPreTrainedModel):
    """Encoder + an exit after every layer from ``config.exit_start``; the last exit is BERT's pooler
    (dense + tanh) + classifier.

    ``forward`` is the training forward (every exit's logits, differentiable); ``early_exit`` is the
    inference forward with per-row entropy exits and batch compaction."""

    def __init__(self, config: CostEffConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.costeff = CostEffModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        n = config.num_exits
        self.exits = nn.ModuleList(
            CostEffExit(config.hidden_size, config.num_labels, dense=(i == n - 1) or config.exit_pooler_dense, dropout=p,
                        activation=config.pooler_activation)
            for i in range(n)
        )
        self.post_init()

    def get_input_embeddings(self):
        return self.costeff.embeddings.word_embeddings

    def exit_for_layer(self, layer: int) -> Optional[CostEffExit]:
        """The exit after 1-based ``layer`` (None when that layer has none)."""
        i = layer - self.config.exit_start
        return self.exits[i] if 0 <= i < len(self.exits) else None

    def _task_loss(self, logits, labels):
        if self.config.problem_type == "regression" or self.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1))
        if self.config.problem_type == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1))

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        labels=None,
        output_hidden_states: bool = False,
        gradient_equilibrium: Optional[bool] = None,
        use_kernels: Optional[bool] = None,
        return_dict: bool = True,
        **kwargs,
    ):
        """Every exit's logits (and the hidden states when asked). ``loss`` (with ``labels``) is the
        unweighted sum of the exits' task losses. With gradient equilibrium, after layer i (0-based,
        L layers) the state's gradient is scaled by 1/(L-i) before the exit reads it and by
        max(1, L-i-1) on the way to layer i+1 (the trunk thus gets (L-i-1)/(L-i) of its gradient)."""
        cfg = self.config
        ids, mask, types = prepare_inputs(cfg, input_ids, attention_mask, token_type_ids)
        k = _resolve_kernels(use_kernels)
        ge = cfg.gradient_equilibrium if gradient_equilibrium is None else gradient_equilibrium
        ge = ge and torch.is_grad_enabled()
        L = cfg.num_hidden_layers
        h = self.costeff.embeddings(ids, types, k, self.training, mask)
        states = [h]
        exit_logits = []
        for i, layer in enumerate(self.costeff.layers):
            h = layer(h, mask, k, self.training)
            states.append(h)
            ex = self.exit_for_layer(i + 1)
            if ex is None:
                continue
            read = gradient_rescale(h, 1.0 / (L - i)) if ge else h
            exit_logits.append(ex(exit_input(read, mask, cfg, i + 1 == L), k, dropout=self.training).logits)
            if ge:
                h = gradient_rescale(read, float(max(1, L - i - 1)))
        loss = None
        if labels is not None:
            loss = sum(self._task_loss(lg, labels) for lg in exit_logits)
        out = CostEffSequenceClassifierOutput(
            loss=loss,
            logits=exit_logits[-1],
            exit_logits=tuple(exit_logits),
            hidden_states=tuple(states) if output_hidden_states else None,
            exit_layers=tuple(cfg.exit_layers()),
        )
        return out if return_dict else out.to_tuple()

    @torch.no_grad()
    def early_exit(self, input_ids, attention_mask=None, token_type_ids=None, threshold: float = 0.0, use_kernels: Optional[bool] = None) -> EarlyExitOutput:
        """Entropy early exit: a row leaves at the first exit whose entropy < ``threshold``; the rest
        are gathered and go on (trailing all-padding columns are trimmed as rows leave). Threshold 0
        runs every row to the last layer; a huge threshold exits at layer ``exit_start``. Dropout is
        never applied here."""
        cfg = self.config
        threshold = check_threshold("early_exit", threshold)
        ids, mask, types = prepare_inputs(cfg, input_ids, attention_mask, token_type_ids)
        k = _resolve_kernels(use_kernels)
        b = ids.shape[0]
        dtype = self.exits[-1].classifier.weight.dtype
        logits_out = torch.zeros(b, cfg.num_labels, dtype=dtype, device=ids.device)
        entropy_out = torch.zeros(b, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=ids.device)
        layer_out = torch.zeros(b, dtype=torch.long, device=ids.device)
        if b == 0:
            return EarlyExitOutput(logits=logits_out, exit_layer=layer_out, entropy=entropy_out)
        ids, mask, types = trim_padding(ids, mask, types)
        h = self.costeff.embeddings(ids, types, k, False, mask)

        def step(index, start, end):
            ex, last = self.exits[index], end == cfg.num_hidden_layers

            def run(h, mask):
                for layer in self.costeff.layers[start:end]:
                    h = layer(h, mask, k, False)
                res = ex(exit_input(h, mask, cfg, last).contiguous(), k, threshold)
                return res.logits, res.entropy, h
            return run

        steps = [step(i, start, end) for i, (start, end) in enumerate(segment_spans(cfg))]
        run_exit_segments(steps, cfg.exit_layers(), h, mask, threshold, logits_out, entropy_out, layer_out)
        return EarlyExitOutput(logits=logits_out, exit_layer=layer_out, entropy=entropy_out)

    def average_flops(
        self,
        batches: Iterable[dict],
        threshold: float,
        seq_len: Optional[int] = None,
        use_kernels: Optional[bool] = None,
    ) -> dict:
        """Runs early exit over ``batches`` (dicts with input_ids and optionally attention_mask /
        token_type_ids) and returns the average analytic FLOPs per sample, the average exit layer and
        the full-depth FLOPs. A sample's length is its real-token count unless ``seq_len`` is given
        (e.g. 128 for inputs padded to 128, as COST-EFF reports)."""
        from costeff.models.flops import flops_per_sample

        total = full = 0
        layers_sum = n = 0
        for batch in batches:
            ids = batch["input_ids"]
            am = batch.get("attention_mask")
            out = self.early_exit(ids, am, batch.get("token_type_ids"), threshold=threshold, use_kernels=use_kernels)
            lengths = am.bool().sum(1).tolist() if am is not None else [ids.shape[1]] * ids.shape[0]
            for length, layer in zip(lengths, out.exit_layer.tolist()):
                s = seq_len if seq_len is not None else int(length)
                total += flops_per_sample(self.config, s, exit_layer=layer)
                full += flops_per_sample(self.config, s)
                layers_sum += layer
                n += 1
        if n == 0:
            raise ValueError("average_flops: the dataset is empty")
        return {
            "samples": n,
            "avg_flops": total / n,
            "avg_full_flops": full / n,
            "avg_exit_layer": layers_sum / n,
            "flops_reduction": full / total,
        }


def pools_mean(config: CostEffConfig, last: bool) -> bool:
    """Whether an exit reads the average of the real tokens (intermediate exits with
    exit_pooling="mean") rather than CLS."""
    return not last and config.exit_pooling != "cls"


def exit_input(h: torch.Tensor, mask: torch.Tensor, config: CostEffConfig, last: bool) -> torch.Tensor:
    """The state an exit reads: CLS, or the average of the real tokens where :func:`pools_mean`."""
    if not pools_mean(config, last):
        return h[:, 0]
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1)


def segment_spans(config: CostEffConfig) -> list[tuple[int, int]]:
    """Per exit, the 0-based half-open range of layers run before it: [0, exit_start), then one layer
    per later exit."""
    layers = config.exit_layers()
    return [(0 if k == 0 else layers[k - 1], layer) for k, layer in enumerate(layers)]


def run_exit_segments(steps, exit_layers, hidden, mask, threshold: float, logits_out, entropy_out, layer_out) -> None:
    """The early-exit loop around per-exit segments (``early_exit``'s and the ONNX runner's).

    ``steps[k](hidden, mask) -> (logits, entropy, hidden)`` runs segment k on the rows still active.
    A row leaves at the first exit whose entropy < ``threshold`` (the last exit takes the rest); its
    logits, entropy and ``exit_layers[k]`` go to its original row of the ``*_out`` tensors. The rows
    that stay are gathered and trailing all-padding columns trimmed before the next segment."""
    active = torch.arange(hidden.shape[0], device=hidden.device)
    for k, step in enumerate(steps):
        logits, entropy, hidden = step(hidden, mask)
        last = k == len(steps) - 1
        leave = None if last else entropy < threshold  # in entropy's dtype, as the exit_head kernels decide
        if last or bool(leave.all()):
            logits_out[active] = logits.to(logits_out.dtype)
            entropy_out[active] = entropy.to(entropy_out.dtype)
            layer_out[active] = exit_layers[k]
            return
        if bool(leave.any()):
            rows = active[leave]
            logits_out[rows] = logits[leave].to(logits_out.dtype)
            entropy_out[rows] = entropy[leave].to(entropy_out.dtype)
            layer_out[rows] = exit_layers[k]
            stay = ~leave
            active, hidden, mask = active[stay], hidden[stay], mask[stay]
            cols = _real_columns(mask)
            if cols < hidden.shape[1]:
                hidden, mask = hidden[:, :cols].contiguous(), mask[:, :cols].contiguous()


def _real_columns(mask: torch.Tensor) -> int:
    """1 + the last column holding a real token in any row."""
    cols = mask.any(0).nonzero()
    return int(cols[-1, 0]) + 1


def trim_padding(ids, mask, types):
    """Drops trailing columns that are padding in every row."""
    cols = _real_columns(mask)
    if cols < ids.shape[1]:
        return ids[:, :cols], mask[:, :cols], types[:, :cols]
    return ids, mask, types
