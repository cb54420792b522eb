"""costeff.models.from_pretrained_encoder on every supported BERT family, against the transformers
model it came from, on tiny random configs built here: last-exit logits and hidden states at
real-token positions on a right-padded batch, keep-all slenderize, threshold-0 early exit, the
kernels, the C++ engine; checkpoints without pooler weights; clear errors for what is not supported."""
from __future__ import annotations

import logging

import pytest
import torch
from transformers import (
    AlbertConfig,
    AlbertModel,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

import costeff
from costeff.models import count_parameters, flops_per_sample, from_bert, from_pretrained_encoder, parameter_count, slenderize

SMALL = dict(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def bert_pad1():
    # a BERT-architecture checkpoint with a RoBERTa-style tokenizer: pad id 1, one token type
    return BertForSequenceClassification(BertConfig(**SMALL, type_vocab_size=1, pad_token_id=1, num_labels=3))


def roberta():
    return RobertaForSequenceClassification(RobertaConfig(**SMALL, type_vocab_size=1, pad_token_id=1, num_labels=3))


def xlm_roberta():
    return XLMRobertaForSequenceClassification(XLMRobertaConfig(**SMALL, type_vocab_size=1, pad_token_id=1, num_labels=2))


def electra():
    # embedding_size < hidden_size: tables, LayerNorm, then embeddings_project
    return ElectraForSequenceClassification(ElectraConfig(**{**SMALL, "embedding_size": 16}, num_labels=3))


def distilbert(sinusoidal):
    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=60, dim=32, n_layers=3, n_heads=4, hidden_dim=37, max_position_embeddings=40, dropout=0.0,
        attention_dropout=0.0, sinusoidal_pos_embds=sinusoidal, num_labels=3, pad_token_id=0))


FAMILIES = {
    "bert_pad1": (bert_pad1, True),
    "roberta": (roberta, False),
    "xlm_roberta": (xlm_roberta, False),
    "distilbert_learned": (lambda: distilbert(False), False),
    "distilbert_sinusoidal": (lambda: distilbert(True), False),
    "electra": (electra, True),
}


def spread(model):
    """Random weights large enough that logits differ clearly between rows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            elif "bias" in name:
                p.normal_(0, 0.1)
    return model.eval()


def padded_batch(model, b=5, s=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    pad = model.config.pad_token_id
    ids = torch.randint(3, 60, (b, s), generator=g)
    lengths = torch.tensor([s, 7, 1, 4, s - 1])[:b]
    mask = (torch.arange(s)[None] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))  # HF RoBERTa reads padding from the ids
    return ids, mask


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_parity_with_transformers(name):
    build, token_types = FAMILIES[name]
    hf = spread(build())
    model = from_pretrained_encoder(hf).eval()
    ids, mask = padded_batch(hf)
    kw = {"token_type_ids": torch.zeros_like(ids)} if token_types else {}
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw)
        out = model(ids, mask, kw.get("token_type_ids"), output_hidden_states=True, use_kernels=False)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    real = mask.bool()
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(mine[real], theirs[real], atol=1e-5, rtol=1e-5)
    # the kernels, early exit at threshold 0, keep-all slenderize and the engine give the same logits
    if costeff.info()["cpu_kernels"]:
        with torch.no_grad():
            torch.testing.assert_close(model(ids, mask, use_kernels=True).logits, ref.logits, atol=1e-4, rtol=1e-4)
        from costeff.inference import InferenceEngine

        eng = InferenceEngine.from_model(model, "fp32")(ids, mask, threshold=0.0)
        torch.testing.assert_close(eng.logits, ref.logits, atol=1e-4, rtol=1e-4)
    ee = model.early_exit(ids, mask, threshold=0.0, use_kernels=False)
    torch.testing.assert_close(ee.logits, out.logits, atol=1e-6, rtol=1e-6)
    assert (ee.exit_layer == model.config.num_hidden_layers).all()
    slim = slenderize(model)
    with torch.no_grad():
        torch.testing.assert_close(slim(ids, mask, use_kernels=False).logits, out.logits, atol=1e-6, rtol=1e-6)


def test_family_specific_config():
    r = from_pretrained_encoder(roberta())
    assert r.config.position_offset == 2 and r.config.type_vocab_size == 1 and r.config.pooler_activation == "tanh"
    d = from_pretrained_encoder(distilbert(False))
    assert d.config.position_offset is None and d.config.pooler_activation == "relu" and d.config.type_vocab_size == 1
    assert d.costeff.embeddings.token_type_embeddings.weight.abs().sum() == 0
    e = from_pretrained_encoder(electra())
    assert e.config.embedding_size == 16 and e.config.pooler_activation == "gelu"
    # parameters and FLOPs count the projection; hidden pruning slices only its output side
    for model in (r, d, e):
        assert parameter_count(model.config) == count_parameters(model)
    slim = slenderize(e, heads_keep=[[0, 1]] * 3, ffn_keep=[list(range(8))] * 3, embedding_rank=8, hidden_keep=list(range(0, 32, 2)))
    assert slim.config.embedding_size == 16 and slim.costeff.embeddings.embedding_projection.weight.shape == (16, 16)
    assert slim.costeff.embeddings.word_projection.weight.shape == (16, 8)
    assert parameter_count(slim.config) == count_parameters(slim)
    plain = e.config.to_dict()
    plain["embedding_size"] = None
    assert flops_per_sample(e.config, 10) - flops_per_sample(type(e.config).from_dict(plain), 10) == 2 * 10 * 16 * 32
    # RoBERTa's last usable position is max_position_embeddings - padding_idx - 1
    ids = torch.full((1, 39), 5)
    with pytest.raises(ValueError, match="at most 38 tokens"):
        r.early_exit(ids)


def test_missing_pooler_is_detected_and_rebuilt(tmp_path, caplog):
    hf = spread(BertModel(BertConfig(**SMALL, pad_token_id=1), add_pooling_layer=False))
    hf.save_pretrained(tmp_path / "nopooler")
    with caplog.at_level(logging.INFO, logger="costeff"):
        model = from_pretrained_encoder(tmp_path / "nopooler", num_labels=2)
    assert "no pooler" in caplog.text
    ids, mask = padded_batch(hf)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask)
        out = model.costeff(ids, mask)
    torch.testing.assert_close(out.last_hidden_state[mask.bool()], ref.last_hidden_state[mask.bool()], atol=1e-5, rtol=1e-5)
    # from a path, the pooler that transformers made up for the missing weights is not taken over
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="costeff"):
        from_bert(tmp_path / "nopooler", num_labels=2)
    assert "no pooler" in caplog.text


def test_unsupported_families_say_what_is_missing():
    albert = AlbertModel(AlbertConfig(vocab_size=60, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=37))
    with pytest.raises(ValueError, match="ALBERT shares one set of layer weights"):
        from_pretrained_encoder(albert)
    with pytest.raises(TypeError, match="from_pretrained_encoder"):
        from_bert(roberta())
    with pytest.raises(FileNotFoundError, match="not a local model directory"):
        from_pretrained_encoder("/nonexistent/model")


def test_pruning_schedule_factorizes_electra_at_its_embedding_width():
    from costeff.pipeline.prune import PruneTarget, plan_events

    model = from_pretrained_encoder(electra())  # embedding_size 16 < hidden 32
    events = plan_events(model, PruneTarget(heads=1, ffn=8, embedding_rank=8))
    ranks = [e["embedding_rank"] for e in events]
    assert ranks == sorted(ranks, reverse=True) and ranks[-1] == 8 and max(ranks) < 16
    for e in events:  # every planned size is one slenderize accepts
        model = slenderize(model, embedding_rank=e["embedding_rank"])
    assert model.config.embedding_rank == 8
