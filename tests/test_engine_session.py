"""Continuous batching at layer granularity (EngineSession) against the one-call engine: the same
answers whenever rows are admitted, finished rows returned by the step that finished them, deadlines
answered from the last exit passed, dropped rows forgotten, bad calls refused."""
import math

import pytest
import torch

pytest.importorskip("costeff._C")

from costeff.inference import InferenceEngine  # noqa: E402
from costeff.models import CostEffConfig, CostEffForSequenceClassification  # noqa: E402


def _model(exit_start=1, seed=0):
    torch.manual_seed(seed)
    cfg = CostEffConfig(vocab_size=80, hidden_size=32, num_hidden_layers=5, num_attention_heads=[2, 2, 0, 1, 2], attention_head_size=16,
                        intermediate_size=[24, 0, 24, 16, 24], max_position_embeddings=40, num_labels=3, exit_pooling="mean",
                        exit_start=exit_start, embedding_rank=12)
    model = CostEffForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for ex in model.exits:
            ex.classifier.weight.mul_(15)
    return model


def _batch(b, s, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, s + 1, (b,), generator=g)
    mask = (torch.arange(s)[None] < lengths[:, None]).long()
    return torch.randint(0, 80, (b, s), generator=g) * mask, mask


def _drain(session, limit=100):
    done = {}
    steps = 0
    while session.rows:
        out = session.step()
        steps += 1
        for i, tag in enumerate(out.tags.tolist()):
            done[tag] = (out.logits[i], int(out.exit_layer[i]), float(out.entropy[i]), bool(out.forced[i]), steps)
        assert steps < limit
    return done


def _threshold_between(engine, ids, mask):
    """A threshold that sends rows to different exits (the median of the first exit's entropies)."""
    out = engine(ids, mask, threshold=math.inf)
    return float(out.entropy.median())


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_one_admission_equals_the_engine(precision):
    engine = InferenceEngine.from_model(_model(), precision)
    ids, mask = _batch(13, 11, seed=1)
    for t in (0.0, _threshold_between(engine, ids, mask), math.inf):
        want = engine(ids, mask, threshold=t)
        session = engine.session()
        session.admit(ids, mask, tags=range(100, 113), thresholds=t)
        assert session.rows == 13 and session.rows_per_depth() == [13, 0, 0, 0, 0]
        done = _drain(session)
        assert sorted(done) == list(range(100, 113))
        for i in range(13):
            logits, layer, entropy, forced, steps = done[100 + i]
            assert layer == int(want.exit_layer[i]) and not forced and steps == layer  # one layer per step
            torch.testing.assert_close(logits, want.logits[i], atol=1e-5, rtol=1e-5)
            assert entropy == pytest.approx(float(want.entropy[i]), abs=1e-5)


def test_rows_admitted_later_join_at_layer_one_and_leave_on_their_own():
    engine = InferenceEngine.from_model(_model(), "fp32")
    a_ids, a_mask = _batch(6, 9, seed=2)
    b_ids, b_mask = _batch(5, 14, seed=3)
    t = _threshold_between(engine, torch.cat([a_ids, torch.zeros(6, 5, dtype=torch.long)], 1), torch.cat([a_mask, torch.zeros(6, 5, dtype=torch.long)], 1))
    per_row = [0.0] * 3 + [t] * 3  # thresholds per row
    session = engine.session()
    session.admit(a_ids, a_mask, tags=range(6), thresholds=per_row)
    first = session.step()
    second = session.step()
    assert session.rows_per_depth()[0] == 0
    session.admit(b_ids, b_mask, tags=range(10, 15), thresholds=math.inf)  # these all leave at their first exit
    assert session.rows_per_depth()[0] == 5
    third = session.step()
    assert set(third.tags.tolist()) >= set(range(10, 15))  # answered after one layer, while rows of A are deeper
    assert (third.exit_layer[torch.isin(third.tags, torch.arange(10, 15))] == 1).all()
    rest = _drain(session)
    got = {}
    for out in (first, second, third):
        for i, tag in enumerate(out.tags.tolist()):
            got[tag] = (out.logits[i], int(out.exit_layer[i]))
    got.update({k: (v[0], v[1]) for k, v in rest.items()})
    want_a = [engine(a_ids[i:i + 1], a_mask[i:i + 1], threshold=per_row[i]) for i in range(6)]
    want_b = engine(b_ids, b_mask, threshold=math.inf)
    for i in range(6):
        assert got[i][1] == int(want_a[i].exit_layer[0])
        torch.testing.assert_close(got[i][0], want_a[i].logits[0], atol=1e-5, rtol=1e-5)
    for i in range(5):
        torch.testing.assert_close(got[10 + i][0], want_b.logits[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("exit_start", [1, 3])
def test_finish_answers_from_the_last_exit_passed(exit_start):
    model = _model(exit_start)
    engine = InferenceEngine.from_model(model, "fp32")
    ids, mask = _batch(4, 8, seed=4)
    session = engine.session()
    session.admit(ids, mask, tags=[1, 2, 3, 4], thresholds=0.0)  # nobody leaves early
    session.step()
    session.step()  # every row has done 2 layers
    out = session.finish([2, 4, 99])  # 99: unknown, ignored
    assert sorted(out.tags.tolist()) == [2, 4] and out.forced.all()
    with torch.no_grad():
        exits = model(ids, mask).exit_logits
    layer = 2 if exit_start == 1 else 3  # with exit_start 3 they run on to the first exit
    assert (out.exit_layer == layer).all()
    for i, tag in enumerate(out.tags.tolist()):
        torch.testing.assert_close(out.logits[i], exits[layer - exit_start][tag - 1], atol=1e-4, rtol=1e-4)
    assert session.rows == 2
    rest = _drain(session)
    assert sorted(rest) == [1, 3] and all(v[1] == 5 and not v[3] for v in rest.values())


def test_drop_forgets_rows_and_bad_calls_change_nothing():
    engine = InferenceEngine.from_model(_model(), "fp32")
    ids, mask = _batch(5, 7, seed=5)
    session = engine.session()
    session.admit(ids, mask, tags=range(5), thresholds=0.0)
    session.step()
    tokens = session.tokens
    assert session.drop([1, 3, 42]) == 2 and session.rows == 3 and session.tokens < tokens
    with pytest.raises(ValueError, match="tag 0 is already in flight"):
        session.admit(ids[:1], mask[:1], tags=[0], thresholds=0.0)
    with pytest.raises(ValueError, match="one tag per input row"):
        session.admit(ids[:2], mask[:2], tags=[7], thresholds=0.0)
    with pytest.raises(ValueError, match="threshold"):
        session.admit(ids[:1], mask[:1], tags=[7], thresholds=-1.0)
    with pytest.raises(ValueError, match="input_ids must be in"):
        session.admit(ids[:1] + 1000, mask[:1], tags=[7], thresholds=0.0)
    with pytest.raises(ValueError, match="no real token"):
        session.admit(ids[:1], torch.zeros_like(mask[:1]), tags=[7], thresholds=0.0)
    assert session.rows == 3  # nothing half-admitted
    assert sorted(_drain(session)) == [0, 2, 4]
    session.admit(ids[:1], mask[:1], tags=[0], thresholds=0.0)  # a finished tag can be used again
    assert session.rows == 1
