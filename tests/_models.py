"""Models and batches built in the tests for the early-exit runners (engine, ONNX): random weights
scaled up so that exits disagree and entropies spread, layers with 0 heads / 0 FFN neurons, left and
right padding."""
from __future__ import annotations

import math

import torch

from costeff.models import CostEffConfig, CostEffForSequenceClassification

VOCAB, MAXPOS = 97, 40


def make_model(seed=0, scale=6.0, **overrides) -> CostEffForSequenceClassification:
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=4, num_attention_heads=[2, 0, 1, 3],
        attention_head_size=[16, 16, 24, 8], intermediate_size=[40, 0, 17, 64], embedding_rank=12,
        max_position_embeddings=MAXPOS, num_labels=3, type_vocab_size=2,
    )
    kw.update(overrides)
    model = CostEffForSequenceClassification(CostEffConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.mul_(scale)
            elif "bias" in name:
                p.normal_(0, 0.5)
            else:  # LayerNorm gains
                p.uniform_(0.5, 1.5)
        token_id_map = model.costeff.embeddings.token_id_map
        if token_id_map is not None:  # a pruned vocabulary: many ids share a row, as [UNK]'s would
            token_id_map.copy_(torch.randint(0, model.config.pruned_vocab_size, token_id_map.shape))
    return model


def make_batch(b=33, s=23, seed=1, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    types = torch.randint(0, 2, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    if pad:
        lengths = torch.randint(1, s + 1, (b,), generator=g)
        mask = (torch.arange(s)[None] < lengths[:, None]).long()
        if b > 3:
            mask[2] = 0  # left padding: position 0 is padding, the CLS exit still reads it
            mask[2, 3:9] = 1
            mask[3, :] = 1  # a full row keeps the batch at s columns
    return ids, mask, types


def exit_entropies(model, ids, mask, types):
    """Entropy of every exit for every row (reference forward): [batch, exits]."""
    with torch.no_grad():
        out = model(ids, mask, types, use_kernels=False)
    ents = []
    for lg in out.exit_logits:
        logp = torch.log_softmax(lg.double(), -1)
        ents.append(-(logp.exp() * logp).sum(-1))
    return torch.stack(ents, 1)


def assert_matches_reference(model, engine, ids, mask, types, threshold, atol=1e-5):
    """``engine`` (any early-exit runner) against early_exit on the reference path, on the rows whose
    exit decision is not within rounding of the threshold."""
    ref = model.early_exit(ids, mask, types, threshold=threshold, use_kernels=False)
    out = engine(ids, mask, types, threshold=threshold)
    assert out.logits.dtype == torch.float32 and out.exit_layer.dtype == torch.int64 and out.entropy.dtype == torch.float32
    ents = exit_entropies(model, ids, mask, types)
    near = ((ents - threshold).abs() < 1e-4).any(1)  # rows whose decision is a rounding coin-flip
    clear = ~near
    assert clear.sum() >= 0.9 * len(clear)
    assert torch.equal(out.exit_layer[clear], ref.exit_layer[clear])
    torch.testing.assert_close(out.logits[clear], ref.logits[clear].float(), atol=atol, rtol=1e-5)
    torch.testing.assert_close(out.entropy[clear], ref.entropy[clear].float(), atol=atol, rtol=1e-5)
    return out, ref


def spread_thresholds(model, ids, mask, types):
    """Thresholds at which some rows leave at each of several exits: quantiles of the entropies."""
    ents = exit_entropies(model, ids, mask, types).flatten().float()
    return [0.0] + [float(torch.quantile(ents, q)) + 1e-3 for q in (0.2, 0.5, 0.8)] + [math.inf]


CONFIGS = {
    "factorized_mean_projected": dict(exit_pooling="mean", embedding_size=24),
    "factorized_cls_roberta_positions": dict(exit_pooling="cls", position_offset=2, pad_token_id=1),
    "plain_embedding_cls_gelu_head": dict(embedding_rank=None, pooler_activation="gelu"),
    "hidden131_one_head": dict(hidden_size=131, num_attention_heads=[1, 1, 0, 2], attention_head_size=[40, 7, 5, 24],
                               intermediate_size=[0, 1, 33, 131], embedding_rank=None, exit_pooling="mean"),
    "dense_relu_exits_start3": dict(exit_pooler_dense=True, exit_start=3, num_labels=5, pooler_activation="relu"),
    "all_pruned": dict(num_attention_heads=0, intermediate_size=0, num_labels=2),
    "pruned_vocabulary_roberta_positions": dict(pruned_vocab_size=31, position_offset=2, pad_token_id=1),
}


def save_text_model_dir(path, tokenizer_path, **config) -> None:
    """A self-contained model directory with a real tokenizer (3 layers, hidden 32, mean-pooled exits,
    exits scaled so that entropies spread): what `costeff predict` and the HF pipeline read."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_path))
    tok.model_max_length = 64
    cfg = CostEffConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, attention_head_size=16,
                        intermediate_size=24, max_position_embeddings=128, num_labels=2, exit_pooling="mean", **config)
    model = CostEffForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for ex in model.exits:
            ex.classifier.weight.normal_(0, 2.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
