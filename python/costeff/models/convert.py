"""Conversion from Hugging Face BERT (``from_bert``) and physical width pruning (``slenderize``)."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from costeff.models.configuration_costeff import CostEffConfig
from costeff.models.modeling_costeff import CostEffForSequenceClassification, CostEffModel


def _load_bert(path):
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return transformers.AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
    return transformers.AutoModel.from_pretrained(path, use_safetensors=True)


def from_bert(
    bert,
    num_labels: Optional[int] = None,
    exit_start: int = 1,
    exit_pooler_dense: bool = False,
    **config_overrides,
) -> CostEffForSequenceClassification:
    """Converts a transformers ``BertModel`` / ``BertForSequenceClassification`` (or a local path to
    one) into a full-width :class:`CostEffForSequenceClassification`. The last exit takes BERT's
    pooler and, for a classifier, its classification layer; intermediate exits (and the classifier of
    a bare encoder) are freshly initialized. ``num_labels`` defaults to the BERT config's."""
    if isinstance(bert, (str, os.PathLike)):
        bert = _load_bert(bert)
    from transformers import BertModel

    encoder = bert if isinstance(bert, BertModel) else getattr(bert, "bert", None)
    if not isinstance(encoder, BertModel):
        raise TypeError(f"from_bert: expected a transformers BertModel or a model with a .bert BertModel, got {type(bert).__name__}")
    bc = encoder.config
    if bc.hidden_act != "gelu":
        raise ValueError(f"from_bert: hidden_act {bc.hidden_act!r} is not supported (the kernels use exact 'gelu')")
    if getattr(bc, "position_embedding_type", "absolute") != "absolute":
        raise ValueError("from_bert: only absolute position embeddings are supported")
    if bc.is_decoder:
        raise ValueError("from_bert: decoder BERTs are not supported")
    classifier = getattr(bert, "classifier", None)
    labels = num_labels if num_labels is not None else bc.num_labels
    if classifier is not None and classifier.out_features != labels:
        raise ValueError(f"from_bert: num_labels {labels} differs from the BERT classifier's {classifier.out_features}")
    kw = dict(
        vocab_size=bc.vocab_size,
        hidden_size=bc.hidden_size,
        num_hidden_layers=bc.num_hidden_layers,
        num_attention_heads=bc.num_attention_heads,
        attention_head_size=bc.hidden_size // bc.num_attention_heads,
        intermediate_size=bc.intermediate_size,
        embedding_rank=None,
        hidden_dropout_prob=bc.hidden_dropout_prob,
        attention_probs_dropout_prob=bc.attention_probs_dropout_prob,
        classifier_dropout=getattr(bc, "classifier_dropout", None),
        max_position_embeddings=bc.max_position_embeddings,
        type_vocab_size=bc.type_vocab_size,
        initializer_range=bc.initializer_range,
        layer_norm_eps=bc.layer_norm_eps,
        pad_token_id=bc.pad_token_id,
        exit_start=exit_start,
        exit_pooler_dense=exit_pooler_dense,
        num_labels=labels,
    )
    if classifier is not None and bc.id2label:
        kw["id2label"] = dict(bc.id2label)
        kw["label2id"] = dict(bc.label2id)
    if getattr(bc, "problem_type", None):
        kw["problem_type"] = bc.problem_type
    kw.update(config_overrides)
    model = CostEffForSequenceClassification(CostEffConfig(**kw))
    dtype = next(encoder.parameters()).dtype
    model.to(dtype)
    with torch.no_grad():
        e, be = model.costeff.embeddings, encoder.embeddings
        e.word_embeddings.weight.copy_(be.word_embeddings.weight)
        e.position_embeddings.weight.copy_(be.position_embeddings.weight)
        e.token_type_embeddings.weight.copy_(be.token_type_embeddings.weight)
        e.LayerNorm.load_state_dict(be.LayerNorm.state_dict())
        for layer, bl in zip(model.costeff.layers, encoder.encoder.layer):
            sa = bl.attention.self
            layer.attention.qkv_weight.copy_(torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]))
            layer.attention.qkv_bias.copy_(torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]))
            layer.attention.out_weight.copy_(bl.attention.output.dense.weight)
            layer.attention.out_bias.copy_(bl.attention.output.dense.bias)
            layer.attention_norm.load_state_dict(bl.attention.output.LayerNorm.state_dict())
            layer.ffn.in_weight.copy_(bl.intermediate.dense.weight)
            layer.ffn.in_bias.copy_(bl.intermediate.dense.bias)
            layer.ffn.out_weight.copy_(bl.output.dense.weight)
            layer.ffn.out_bias.copy_(bl.output.dense.bias)
            layer.ffn_norm.load_state_dict(bl.output.LayerNorm.state_dict())
        last = model.exits[-1]
        if encoder.pooler is not None:
            last.pooler.load_state_dict(encoder.pooler.dense.state_dict())
        if classifier is not None:
            last.classifier.load_state_dict(classifier.state_dict())
    model.train(bert.training)
    return model


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
    if rank is not None and not 1 <= rank <= min(cfg.vocab_size, new_hidden):
        raise ValueError(f"slenderize: embedding_rank must be in [1, {min(cfg.vocab_size, new_hidden)}], got {rank}")
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

    with torch.no_grad():
        new_enc = new.costeff if isinstance(new, CostEffForSequenceClassification) else new
        e, ne = encoder.embeddings, new_enc.embeddings
        if embedding_rank is None and cfg.embedding_rank is not None:
            # keep the factors; only the hidden side of the r x hidden factor is sliced
            ne.word_embeddings.weight.copy_(e.word_embeddings.weight)
            ne.word_projection.weight.copy_(hsel(e.word_projection.weight, 0))
        elif rank is None:
            ne.word_embeddings.weight.copy_(hsel(e.word_embeddings.weight, 1))
        else:
            a, b = factorize_embedding(hsel(e.word_matrix(), 1), rank)
            ne.word_embeddings.weight.copy_(a)
            ne.word_projection.weight.copy_(b.t())
        ne.position_embeddings.weight.copy_(hsel(e.position_embeddings.weight, 1))
        ne.token_type_embeddings.weight.copy_(hsel(e.token_type_embeddings.weight, 1))
        ne.LayerNorm.weight.copy_(hsel(e.LayerNorm.weight, 0))
        ne.LayerNorm.bias.copy_(hsel(e.LayerNorm.bias, 0))
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
