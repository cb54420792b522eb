"""Conversion from Hugging Face BERT-family encoders (``from_pretrained_encoder``, ``from_bert``) and
physical width pruning (``slenderize``)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from costeff.models.configuration_costeff import CostEffConfig
from costeff.models.modeling_costeff import CostEffForSequenceClassification, CostEffModel


_log = logging.getLogger("costeff")

# model_type -> family; the families share one layer layout once their weights are named.
FAMILIES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "camembert": "roberta", "distilbert": "distilbert",
            "electra": "electra"}
_UNSUPPORTED = {
    "albert": "ALBERT shares one set of layer weights across all layers; costeff prunes every layer separately",
    "deberta": "DeBERTa's disentangled relative-position attention is not the absolute-position attention of costeff's kernels",
    "deberta-v2": "DeBERTa-v2's disentangled relative-position attention is not the absolute-position attention of costeff's kernels",
}


def _load_pretrained(model_or_path, who: str):
    """``(model, missing_pooler)``: a model passes through; a local path is loaded (a classifier when
    its config says so), noting whether the checkpoint lacked pooler weights (transformers then
    initializes them randomly, and the CLI silences its warning)."""
    if not isinstance(model_or_path, (str, os.PathLike)):
        return model_or_path, False
    path = model_or_path
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{who}: {path} is not a local model directory (config.json + weights)")
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    archs = getattr(config, "architectures", None) or []
    auto = transformers.AutoModelForSequenceClassification if any(a.endswith("ForSequenceClassification") for a in archs) else transformers.AutoModel
    model, info = auto.from_pretrained(path, use_safetensors=True, output_loading_info=True)
    missing_pooler = any(".pooler." in f".{k}" for k in info.get("missing_keys", ()))
    return model, missing_pooler


@dataclass
class _Parts:
    """One encoder's weights in costeff's layout (modules of the source model, copied later)."""

    config: dict
    word: torch.Tensor
    position: torch.Tensor
    token_type: Optional[torch.Tensor]  # None: the family has no token types (one zero row is made)
    embedding_norm: nn.LayerNorm
    layers: list  # per layer: (q, k, v, attn_out, attn_norm, ffn_in, ffn_out, ffn_norm)
    pooler: Optional[nn.Linear]  # the dense before the last exit's activation (None: fresh)
    classifier: Optional[nn.Linear]
    projection: Optional[nn.Linear] = None  # ELECTRA: embedding_size -> hidden after the embedding LayerNorm


def family_of(model) -> str:
    """The costeff family of a transformers model ("bert", "roberta", "distilbert", "electra"), or a
    ValueError that says why it cannot be converted."""
    return _check_family(model)


def _check_family(model):
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt in _UNSUPPORTED:
        raise ValueError(f"from_pretrained_encoder: {mt} is not supported: {_UNSUPPORTED[mt]}")
    if mt not in FAMILIES:
        raise ValueError(f"from_pretrained_encoder: model_type {mt!r} ({type(model).__name__}) is not supported; costeff converts "
                         f"{sorted(FAMILIES)}")
    return FAMILIES[mt]


def _bert_like_layers(encoder):
    return [
        (bl.attention.self.query, bl.attention.self.key, bl.attention.self.value, bl.attention.output.dense,
         bl.attention.output.LayerNorm, bl.intermediate.dense, bl.output.dense, bl.output.LayerNorm)
        for bl in encoder.encoder.layer
    ]


def _common_config(hc, encoder) -> dict:
    if getattr(hc, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise ValueError(f"from_pretrained_encoder: position_embedding_type {hc.position_embedding_type!r} is not supported "
                         "(only absolute position embeddings)")
    if getattr(hc, "is_decoder", False):
        raise ValueError("from_pretrained_encoder: decoder models are not supported")
    return dict(
        vocab_size=hc.vocab_size, hidden_size=hc.hidden_size, num_hidden_layers=hc.num_hidden_layers,
        num_attention_heads=hc.num_attention_heads, attention_head_size=hc.hidden_size // hc.num_attention_heads,
        intermediate_size=hc.intermediate_size, hidden_dropout_prob=hc.hidden_dropout_prob,
        attention_probs_dropout_prob=hc.attention_probs_dropout_prob, classifier_dropout=getattr(hc, "classifier_dropout", None),
        max_position_embeddings=hc.max_position_embeddings, type_vocab_size=hc.type_vocab_size,
        initializer_range=hc.initializer_range, layer_norm_eps=hc.layer_norm_eps, pad_token_id=hc.pad_token_id,
    )


def _bert_parts(model) -> _Parts:
    encoder = model.base_model
    hc = encoder.config
    if hc.hidden_act != "gelu":
        raise ValueError(f"from_pretrained_encoder: hidden_act {hc.hidden_act!r} is not supported (the kernels use exact 'gelu')")
    e = encoder.embeddings
    pooler = encoder.pooler.dense if getattr(encoder, "pooler", None) is not None else None
    return _Parts(_common_config(hc, encoder), e.word_embeddings.weight, e.position_embeddings.weight, e.token_type_embeddings.weight,
                  e.LayerNorm, _bert_like_layers(encoder), pooler, getattr(model, "classifier", None))


def _roberta_parts(model) -> _Parts:
    parts = _bert_parts(model)
    hc = model.config
    # RoBERTa/XLM-R: positions count the real tokens from padding_idx + 1; the classifier head is
    # dense -> tanh -> out_proj on <s> (our last exit's pooler + classifier).
    parts.config["position_offset"] = hc.pad_token_id + 1
    head = getattr(model, "classifier", None)
    if head is not None:
        parts.pooler, parts.classifier = head.dense, head.out_proj
    return parts


def _distilbert_parts(model) -> _Parts:
    encoder = model.base_model
    hc = encoder.config
    if hc.activation != "gelu":
        raise ValueError(f"from_pretrained_encoder: DistilBERT activation {hc.activation!r} is not supported (the kernels use exact 'gelu')")
    layers = [
        (tl.attention.q_lin, tl.attention.k_lin, tl.attention.v_lin, tl.attention.out_lin, tl.sa_layer_norm,
         tl.ffn.lin1, tl.ffn.lin2, tl.output_layer_norm)
        for tl in encoder.transformer.layer
    ]
    config = dict(
        vocab_size=hc.vocab_size, hidden_size=hc.dim, num_hidden_layers=hc.n_layers, num_attention_heads=hc.n_heads,
        attention_head_size=hc.dim // hc.n_heads, intermediate_size=hc.hidden_dim, hidden_dropout_prob=hc.dropout,
        attention_probs_dropout_prob=hc.attention_dropout, classifier_dropout=hc.seq_classif_dropout,
        max_position_embeddings=hc.max_position_embeddings, type_vocab_size=1, initializer_range=hc.initializer_range,
        layer_norm_eps=encoder.embeddings.LayerNorm.eps, pad_token_id=hc.pad_token_id, pooler_activation="relu",
    )
    e = encoder.embeddings
    # head: pre_classifier -> ReLU -> classifier on the first token
    return _Parts(config, e.word_embeddings.weight, e.position_embeddings.weight, None, e.LayerNorm, layers,
                  getattr(model, "pre_classifier", None), getattr(model, "classifier", None))


def _electra_parts(model) -> _Parts:
    encoder = model.base_model
    hc = encoder.config
    if hc.hidden_act != "gelu":
        raise ValueError(f"from_pretrained_encoder: hidden_act {hc.hidden_act!r} is not supported (the kernels use exact 'gelu')")
    e = encoder.embeddings
    projection = getattr(encoder, "embeddings_project", None)  # only when embedding_size != hidden_size
    config = dict(_common_config(hc, encoder), pooler_activation="gelu", embedding_size=hc.embedding_size if projection is not None else None)
    head = getattr(model, "classifier", None)  # dense -> GELU -> out_proj on the first token
    return _Parts(config, e.word_embeddings.weight, e.position_embeddings.weight, e.token_type_embeddings.weight, e.LayerNorm,
                  _bert_like_layers(encoder), head.dense if head is not None else None, head.out_proj if head is not None else None,
                  projection)


_PARTS = {"bert": _bert_parts, "roberta": _roberta_parts, "distilbert": _distilbert_parts, "electra": _electra_parts}


def _convert(model, family: str, num_labels, exit_start, exit_pooler_dense, missing_pooler: bool, config_overrides) -> CostEffForSequenceClassification:
    parts = _PARTS[family](model)
    if missing_pooler:
        parts.pooler = None
    classifier = parts.classifier
    labels = num_labels if num_labels is not None else model.config.num_labels
    if classifier is not None and classifier.out_features != labels:
        raise ValueError(f"from_pretrained_encoder: num_labels {labels} differs from the source classifier's {classifier.out_features}")
    kw = dict(parts.config, embedding_rank=None, exit_start=exit_start, exit_pooler_dense=exit_pooler_dense, num_labels=labels)
    hc = model.config
    if classifier is not None and hc.id2label:
        kw["id2label"] = dict(hc.id2label)
        kw["label2id"] = dict(hc.label2id)
    if getattr(hc, "problem_type", None):
        kw["problem_type"] = hc.problem_type
    kw.update(config_overrides)
    out = CostEffForSequenceClassification(CostEffConfig(**kw))
    out.to(parts.word.dtype)
    with torch.no_grad():
        e = out.costeff.embeddings
        e.word_embeddings.weight.copy_(parts.word)
        e.position_embeddings.weight.copy_(parts.position)
        if parts.token_type is None:
            e.token_type_embeddings.weight.zero_()
        else:
            e.token_type_embeddings.weight.copy_(parts.token_type)
        e.LayerNorm.load_state_dict(parts.embedding_norm.state_dict())
        if parts.projection is not None:
            e.embedding_projection.load_state_dict(parts.projection.state_dict())
        for layer, (q, k, v, o, n1, fi, fo, n2) in zip(out.costeff.layers, parts.layers):
            layer.attention.qkv_weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            layer.attention.qkv_bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
            layer.attention.out_weight.copy_(o.weight)
            layer.attention.out_bias.copy_(o.bias)
            layer.attention_norm.load_state_dict(n1.state_dict())
            layer.ffn.in_weight.copy_(fi.weight)
            layer.ffn.in_bias.copy_(fi.bias)
            layer.ffn.out_weight.copy_(fo.weight)
            layer.ffn.out_bias.copy_(fo.bias)
            layer.ffn_norm.load_state_dict(n2.state_dict())
        last = out.exits[-1]
        if parts.pooler is not None:
            last.pooler.load_state_dict(parts.pooler.state_dict())
        else:
            _log.info("from_pretrained_encoder: the %s checkpoint has no pooler / head dense weights: the last exit's dense is "
                      "freshly initialized (fine-tune before use)", hc.model_type)
        if classifier is not None:
            last.classifier.load_state_dict(classifier.state_dict())
    out.train(model.training)
    return out


def from_pretrained_encoder(
    model_or_path,
    num_labels: Optional[int] = None,
    exit_start: int = 1,
    exit_pooler_dense: bool = False,
    **config_overrides,
) -> CostEffForSequenceClassification:
    """Converts a transformers BERT-family encoder or sequence classifier (or a local path to one)
    into a full-width :class:`CostEffForSequenceClassification` with the same outputs.

    Families: BERT (also with a non-zero pad id or without pooler weights), RoBERTa / XLM-R /
    CamemBERT (positions counted over the mask from padding_idx + 1; head dense -> tanh -> out_proj),
    DistilBERT (no token types; head pre_classifier -> ReLU -> classifier), ELECTRA discriminators
    (embeddings at embedding_size, LayerNorm, then embeddings_project to hidden; head dense -> GELU ->
    out_proj). The last exit takes the
    source's pooler or classification head; intermediate exits (and the head of a bare encoder) are
    freshly initialized. ``num_labels`` defaults to the source config's."""
    model, missing_pooler = _load_pretrained(model_or_path, "from_pretrained_encoder")
    return _convert(model, _check_family(model), num_labels, exit_start, exit_pooler_dense, missing_pooler, config_overrides)


def converted_config(path: str, num_labels: Optional[int] = None, exit_start: Optional[int] = 1, **config_overrides) -> CostEffConfig:
    """The config :func:`from_pretrained_encoder` would give the model directory ``path``, read from its
    config alone (the model is built on the meta device: no weights are loaded). ``exit_start`` None:
    the last layer only, the source classifier's own cost (what a teacher's FLOPs are counted on)."""
    import transformers

    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"converted_config: {path} is not a local model directory (config.json + weights)")
    hc = transformers.AutoConfig.from_pretrained(path)
    archs = getattr(hc, "architectures", None) or []
    auto = transformers.AutoModelForSequenceClassification if any(a.endswith("ForSequenceClassification") for a in archs) else transformers.AutoModel
    with torch.device("meta"):
        model = auto.from_config(hc)
    parts = _PARTS[_check_family(model)](model)
    labels = num_labels if num_labels is not None else hc.num_labels
    if exit_start is None:  # the source as it is: one classifier, after the last layer
        exit_start = parts.config["num_hidden_layers"]
    return CostEffConfig(**{**parts.config, "embedding_rank": None, "exit_start": exit_start, "num_labels": labels, **config_overrides})


def from_bert(
    bert,
    num_labels: Optional[int] = None,
    exit_start: int = 1,
    exit_pooler_dense: bool = False,
    **config_overrides,
) -> CostEffForSequenceClassification:
    """Converts a transformers ``BertModel`` / ``BertForSequenceClassification`` (or a local path to
    one): :func:`from_pretrained_encoder` restricted to BERT."""
    bert, missing_pooler = _load_pretrained(bert, "from_bert")
    from transformers import BertModel

    encoder = bert if isinstance(bert, BertModel) else getattr(bert, "bert", None)
    if not isinstance(encoder, BertModel):
        raise TypeError(f"from_bert: expected a transformers BertModel or a model with a .bert BertModel, got {type(bert).__name__}; "
                        "use costeff.models.from_pretrained_encoder for other encoder families")
    return _convert(bert, "bert", num_labels, exit_start, exit_pooler_dense, missing_pooler, config_overrides)


def _keep_list(name: str, keep, size: int) -> list[int]:
    idx = sorted({int(i) for i in keep})
    if idx and (idx[0] < 0 or idx[-1] >= size):
        raise ValueError(f"slenderize: {name} indices must be in [0, {size}), got {idx}")
    return idx


def _per_layer_keep(name: str, keep, sizes: Sequence[int]) -> list[list[int]]:
    if keep is None:
        return [list(range(s)) for s in sizes]
    keep = list(keep)
    if len(keep) != len(sizes):
        raise ValueError(f"slenderize: {name} has {len(keep)} entries but the model has {len(sizes)} layers")
    return [list(range(s)) if k is None else _keep_list(f"{name}[{i}]", k, s) for i, (k, s) in enumerate(zip(keep, sizes))]


def factorize_embedding(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin truncated SVD: ``matrix`` [vocab, hidden] ~= A [vocab, rank] @ B [rank, hidden]."""
    if not 1 <= rank <= min(matrix.shape):
        raise ValueError(f"embedding rank must be in [1, {min(matrix.shape)}], got {rank}")
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).to(matrix.dtype), vh[:rank].to(matrix.dtype)


def slenderize(
    model,
    heads_keep=None,
    ffn_keep=None,
    embedding_rank: Optional[int] = None,
    hidden_keep: Optional[Sequence[int]] = None,
):
    """Returns a physically smaller copy of ``model`` (CostEffModel or CostEffForSequenceClassification).

    heads_keep / ffn_keep: per layer, the indices of the heads / FFN neurons to keep (None, or a None
    entry, keeps all of them; an empty list removes them). embedding_rank: factorize the word
    embedding to this rank by truncated SVD (None keeps the embedding as it is). hidden_keep: indices
    of residual dimensions to keep (None keeps all; this changes what LayerNorm normalizes over, so it
    is an approximation that needs recovery training)."""
    if not isinstance(model, (CostEffModel, CostEffForSequenceClassification)):
        raise TypeError(f"slenderize: expected a costeff model, got {type(model).__name__}")
    cfg = model.config
    encoder = model.costeff if isinstance(model, CostEffForSequenceClassification) else model
    n = cfg.num_hidden_layers
    heads = _per_layer_keep("heads_keep", heads_keep, cfg.num_attention_heads)
    ffn = _per_layer_keep("ffn_keep", ffn_keep, cfg.intermediate_size)
    hk = None if hidden_keep is None else _keep_list("hidden_keep", hidden_keep, cfg.hidden_size)
    if hk is not None and not hk:
        raise ValueError("slenderize: hidden_keep must keep at least one dimension")
    new_hidden = cfg.hidden_size if hk is None else len(hk)
    rank = embedding_rank if embedding_rank is not None else cfg.embedding_rank
    projected = cfg.embedding_size is not None  # tables stay embedding_size wide; only the projection's output is sliced
    width = cfg.embedding_size if projected else new_hidden
    # a new factorization needs rank <= rows; kept factors may have fewer rows than their rank (pruned vocabulary)
    most = min(cfg.word_rows, width) if embedding_rank is not None else width
    if rank is not None and not 1 <= rank <= most:
        raise ValueError(f"slenderize: embedding_rank must be in [1, {most}], got {rank}")
    new_cfg = CostEffConfig.from_dict(
        {
            **cfg.to_dict(),
            "hidden_size": new_hidden,
            "num_attention_heads": [len(k) for k in heads],
            "intermediate_size": [len(k) for k in ffn],
            "embedding_rank": rank,
        }
    )
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    new = type(model)(new_cfg).to(device=device, dtype=dtype)
    hsel = (lambda t, dim: t) if hk is None else (lambda t, dim: t.index_select(dim, torch.tensor(hk, device=t.device)))
    esel = (lambda t, dim: t) if projected else hsel  # the embedding side of the residual

    with torch.no_grad():
        new_enc = new.costeff if isinstance(new, CostEffForSequenceClassification) else new
        e, ne = encoder.embeddings, new_enc.embeddings
        if embedding_rank is None and cfg.embedding_rank is not None:
            # keep the factors; only the hidden side of the r x hidden factor is sliced
            ne.word_embeddings.weight.copy_(e.word_embeddings.weight)
            ne.word_projection.weight.copy_(esel(e.word_projection.weight, 0))
        elif rank is None:
            ne.word_embeddings.weight.copy_(esel(e.word_embeddings.weight, 1))
        else:
            a, b = factorize_embedding(esel(e.word_matrix(), 1), rank)
            ne.word_embeddings.weight.copy_(a)
            ne.word_projection.weight.copy_(b.t())
        if e.token_id_map is not None:
            ne.token_id_map.copy_(e.token_id_map)
        ne.position_embeddings.weight.copy_(esel(e.position_embeddings.weight, 1))
        ne.token_type_embeddings.weight.copy_(esel(e.token_type_embeddings.weight, 1))
        ne.LayerNorm.weight.copy_(esel(e.LayerNorm.weight, 0))
        ne.LayerNorm.bias.copy_(esel(e.LayerNorm.bias, 0))
        if projected:
            ne.embedding_projection.weight.copy_(hsel(e.embedding_projection.weight, 0))
            ne.embedding_projection.bias.copy_(hsel(e.embedding_projection.bias, 0))
        for i in range(n):
            old, nl = encoder.layers[i], new_enc.layers[i]
            nh, d = cfg.num_attention_heads[i], cfg.attention_head_size[i]
            head_cols = [hh * d + j for hh in heads[i] for j in range(d)]
            rows = torch.tensor([part * nh * d + c for part in range(3) for c in head_cols], dtype=torch.long, device=device)
            cols = torch.tensor(head_cols, dtype=torch.long, device=device)
            nl.attention.qkv_weight.copy_(hsel(old.attention.qkv_weight.index_select(0, rows), 1))
            nl.attention.qkv_bias.copy_(old.attention.qkv_bias.index_select(0, rows))
            nl.attention.out_weight.copy_(hsel(old.attention.out_weight.index_select(1, cols), 0))
            nl.attention.out_bias.copy_(hsel(old.attention.out_bias, 0))
            neurons = torch.tensor(ffn[i], dtype=torch.long, device=device)
            nl.ffn.in_weight.copy_(hsel(old.ffn.in_weight.index_select(0, neurons), 1))
            nl.ffn.in_bias.copy_(old.ffn.in_bias.index_select(0, neurons))
            nl.ffn.out_weight.copy_(hsel(old.ffn.out_weight.index_select(1, neurons), 0))
            nl.ffn.out_bias.copy_(hsel(old.ffn.out_bias, 0))
            for norm in ("attention_norm", "ffn_norm"):
                getattr(nl, norm).weight.copy_(hsel(getattr(old, norm).weight, 0))
                getattr(nl, norm).bias.copy_(hsel(getattr(old, norm).bias, 0))
        if isinstance(model, CostEffForSequenceClassification):
            for old, nx in zip(model.exits, new.exits):
                if old.pooler is not None:
                    nx.pooler.weight.copy_(hsel(hsel(old.pooler.weight, 0), 1))
                    nx.pooler.bias.copy_(hsel(old.pooler.bias, 0))
                nx.classifier.weight.copy_(hsel(old.classifier.weight, 1))
                nx.classifier.bias.copy_(old.classifier.bias)
    new.train(model.training)
    return new


def prune_vocabulary(model, keep_token_ids, unk_token_id: int, max_position_embeddings: Optional[int] = None):
    """Returns a copy of ``model`` whose word embedding keeps only the rows of ``keep_token_ids`` (e.g.
    the tokens of the training split plus the tokenizer's special tokens) and of ``unk_token_id``;
    every other token id is mapped to [UNK]'s row by the ``token_id_map`` buffer, so the tokenizer and
    input ids stay as they are. Kept tokens embed exactly as before. ``max_position_embeddings``
    (optional) also truncates the position table, e.g. to the length the model was trained at."""
    if not isinstance(model, (CostEffModel, CostEffForSequenceClassification)):
        raise TypeError(f"prune_vocabulary: expected a costeff model, got {type(model).__name__}")
    cfg = model.config
    keep = _keep_list("keep_token_ids", list(keep_token_ids) + [unk_token_id], cfg.vocab_size)
    positions = cfg.max_position_embeddings if max_position_embeddings is None else int(max_position_embeddings)
    if not (cfg.position_offset or 0) < positions <= cfg.max_position_embeddings:
        raise ValueError(f"prune_vocabulary: max_position_embeddings must be in ({cfg.position_offset or 0}, "
                         f"{cfg.max_position_embeddings}], got {positions}")
    encoder = model.costeff if isinstance(model, CostEffForSequenceClassification) else model
    e = encoder.embeddings
    device = e.word_embeddings.weight.device
    old_map = e.token_id_map.long() if e.token_id_map is not None else torch.arange(cfg.vocab_size, device=device)
    kept = torch.tensor(keep, dtype=torch.long, device=device)
    rows = torch.unique(old_map[kept])  # the old table's rows still used, in order (kept ids may share [UNK]'s row)
    new_row = torch.full((cfg.word_rows,), -1, dtype=torch.long, device=device)
    new_row[rows] = torch.arange(len(rows), device=device)
    token_id_map = new_row[old_map[unk_token_id]].repeat(cfg.vocab_size)
    token_id_map[kept] = new_row[old_map[kept]]
    new_cfg = CostEffConfig.from_dict({**cfg.to_dict(), "pruned_vocab_size": len(rows), "max_position_embeddings": positions})
    prefix = "costeff.embeddings." if isinstance(model, CostEffForSequenceClassification) else "embeddings."
    state = dict(model.state_dict())
    state[prefix + "word_embeddings.weight"] = e.word_embeddings.weight.detach()[rows]
    state[prefix + "token_id_map"] = token_id_map.to(torch.int32)
    state[prefix + "position_embeddings.weight"] = e.position_embeddings.weight.detach()[:positions]
    new = type(model)(new_cfg).to(device=device, dtype=e.word_embeddings.weight.dtype)
    new.load_state_dict(state)
    new.train(model.training)
    return new
