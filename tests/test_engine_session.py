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


# -- SessionWorker: the session turned by a C++ thread of its own -------------------------------------


def _rows(ids, mask):
    return [ids[i, : int(mask[i].sum())].tolist() for i in range(ids.shape[0])]


def _collect(worker, want, timeout=30.0):
    """Takes from a threaded worker until ``want`` rows were delivered: {tag: (logits, layer, entropy, forced, queue_s, inference_s)}."""
    import time

    got, failed, errors = {}, [], []
    end = time.monotonic() + timeout
    while len(got) + len(failed) < want:
        assert time.monotonic() < end, f"only {len(got)} of {want} rows came back"
        d = worker.take(0.5)
        for i, tag in enumerate(d.tags.tolist()):
            got[tag] = (d.logits[i], int(d.exit_layer[i]), float(d.entropy[i]), bool(d.forced[i]), float(d.queue_s[i]), float(d.inference_s[i]))
        failed += d.failed.tolist()
        if d.error:
            errors.append(d.error)
    return got, failed, errors


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_worker_thread_answers_as_the_engine(precision):
    from costeff.inference.session import SessionWorker

    engine = InferenceEngine.from_model(_model(), precision)
    ids, mask = _batch(40, 12, seed=6)
    t = _threshold_between(engine, ids, mask)
    thresholds = [0.0, t, math.inf, t] * 10
    worker = SessionWorker(engine, max_batch_tokens=64)  # a few rows at a time: most wait in the queue
    rows = _rows(ids, mask)
    for k in range(0, 40, 8):  # five requests
        worker.submit(rows[k:k + 8], None, tags=range(k, k + 8), thresholds=thresholds[k:k + 8])
    got, failed, _ = _collect(worker, 40)
    assert not failed and sorted(got) == list(range(40))
    for i in range(40):
        want = engine(ids[i:i + 1], mask[i:i + 1], threshold=thresholds[i])
        logits, layer, entropy, forced, queue_s, inference_s = got[i]
        assert layer == int(want.exit_layer[0]) and not forced
        torch.testing.assert_close(logits, want.logits[0], atol=1e-5, rtol=1e-5)
        assert entropy == pytest.approx(float(want.entropy[0]), abs=1e-5)
        assert queue_s >= 0 and inference_s > 0
    assert max(v[4] for v in got.values()) > 0  # with a 64-token budget some rows waited for others to leave
    worker.stop()
    assert worker.take(1.0).tags.numel() == 0 and worker.finished()


def test_a_worker_turned_by_hand_admits_by_tokens_cancels_and_meets_deadlines():
    from costeff.inference.session import SessionWorker

    model = _model()
    engine = InferenceEngine.from_model(model, "fp32")
    ids, mask = _batch(6, 8, seed=7)
    rows = [r for r in _rows(ids, mask)]
    worker = SessionWorker(engine, max_batch_tokens=sum(map(len, rows[:2])), thread=False)
    worker.submit(rows, None, tags=range(6), thresholds=[0.0] * 6, deadlines_s=[None, None, None, None, 0.0, None])
    assert worker.queued_rows() == 6
    worker.turn()  # the budget holds the first two rows
    assert worker.queued_rows() == 4 and worker.rows_per_depth() == [0, 2, 0, 0, 0]
    worker.cancel([1, 3, 77])  # one in flight, one queued, one unknown
    turns = 0
    while worker.turn():
        turns += 1
        assert turns < 100
    d = worker.take()
    tags = d.tags.tolist()
    assert sorted(tags) == [0, 2, 4, 5] and worker.queued_rows() == 0 and worker.rows_per_depth() == [0] * 5
    with torch.no_grad():
        first_exit = model(ids, mask).exit_logits[0]
    for i, tag in enumerate(tags):
        if tag == 4:  # its deadline had passed when it was admitted: answered from the first exit
            assert bool(d.forced[i]) and int(d.exit_layer[i]) == 1
            torch.testing.assert_close(d.logits[i], first_exit[4], atol=1e-4, rtol=1e-4)
        else:
            assert not bool(d.forced[i]) and int(d.exit_layer[i]) == 5
    worker.stop()
    assert worker.finished()


def test_a_worker_refuses_bad_calls_whole_and_fails_bad_rows_without_hanging():
    from costeff.inference.session import SessionWorker

    engine = InferenceEngine.from_model(_model(), "fp32")
    worker = SessionWorker(engine, max_batch_tokens=100, thread=False)
    with pytest.raises(RuntimeError, match="without a thread"):
        SessionWorker(engine, max_batch_tokens=100).turn()
    with pytest.raises(ValueError, match="max_batch_tokens"):
        SessionWorker(engine, max_batch_tokens=0)
    with pytest.raises(ValueError, match="tag 1 is already held"):
        worker.submit([[1, 2], [3]], None, tags=[1, 1], thresholds=[0.0, 0.0])
    with pytest.raises(ValueError, match="threshold"):
        worker.submit([[1, 2]], None, tags=[2], thresholds=[-1.0])
    with pytest.raises(ValueError, match="at least one token"):
        worker.submit([[]], None, tags=[3], thresholds=[0.0])
    with pytest.raises(ValueError, match="one entry per tag"):
        worker._handle.submit([1, 2], [2], [], [4, 5], [0.0, 0.0], [-1.0, -1.0])
    with pytest.raises(ValueError, match="types must be empty or as long as ids"):
        worker.submit([[1, 2]], [[0]], tags=[6], thresholds=[0.0])
    assert worker.queued_rows() == 0
    worker.submit([[5, 6, 7], [5, 1000, 7]], None, tags=[8, 9], thresholds=[0.0, 0.0])  # 1000: outside the vocabulary
    worker.turn()
    d = worker.take()
    assert sorted(d.failed.tolist()) == [8, 9] and "input_ids must be in" in d.error  # the admission fails whole, with the engine's reason
    assert d.tags.numel() == 0 and worker.queued_rows() == 0 and worker.rows_per_depth() == [0] * 5
    worker.submit([[4, 4]], None, tags=[8], thresholds=[0.0])  # a failed tag is free again
    while worker.turn():
        pass
    d = worker.take()
    assert d.tags.tolist() == [8] and d.failed.numel() == 0 and d.error == ""
    worker.stop()
    assert worker.finished()
    with pytest.raises(ValueError, match="stopped"):
        worker.submit([[1]], None, tags=[11], thresholds=[0.0])


def test_a_stopped_worker_finishes_every_row_it_holds():
    from costeff.inference.session import SessionWorker

    engine = InferenceEngine.from_model(_model(), "int8")
    ids, mask = _batch(64, 10, seed=8)
    worker = SessionWorker(engine, max_batch_tokens=40)
    worker.submit(_rows(ids, mask), None, tags=range(64), thresholds=[0.0] * 64)
    worker.stop()
    got, failed, _ = _collect(worker, 64)
    assert sorted(got) == list(range(64)) and not failed and all(v[1] == 5 for v in got.values())
    worker.take(1.0)
    assert worker.finished()
