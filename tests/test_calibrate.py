"""Threshold calibration (costeff.inference.calibrate): a constructed case checked against a brute-force
sweep of the exit rule, the latency criterion with an injected timer, and `costeff calibrate` on a
model directory (writes inference_threshold, which `costeff predict` then uses)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from costeff.inference.calibrate import apply_threshold, calibrate_directory, choose_for_target, choose_threshold

from test_predict import model_dir  # noqa: F401  (fixture)


def brute_force(ents, preds, labels, t):
    """The exit rule in plain Python: first exit with entropy < t, else the last."""
    correct, layers = 0, 0
    for e, p, y in zip(ents.tolist(), preds.tolist(), labels.tolist()):
        k = next((i for i, v in enumerate(e[:-1]) if v < t), len(e) - 1)
        correct += p[k] == y
        layers += k + 1
    return 100 * correct / len(labels), layers / len(labels)


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    n, exits = 300, 4
    labels = torch.randint(0, 3, (n,), generator=g)
    ents = torch.rand(n, exits, generator=g, dtype=torch.float64) * math.log(3)
    # early exits are right more often when confident, the last exit is right 90% of the time
    right = torch.rand(n, exits, generator=g) < (0.95 - 0.5 * ents / math.log(3)).float()
    right[:, -1] = torch.rand(n, generator=g) < 0.9
    preds = torch.where(right, labels[:, None], (labels[:, None] + 1) % 3)
    return ents, preds, labels


@pytest.mark.parametrize("drop", [0.0, 0.5, 3.0, 10.0])
def test_max_drop_is_the_largest_threshold_within_the_drop(case, drop):
    ents, preds, labels = case
    res = choose_threshold(ents, preds, labels, "accuracy", exit_start=1, max_drop=drop)
    full, _ = brute_force(ents, preds, labels, 0.0)
    assert res["full_depth_dev_metric"] == pytest.approx(full)
    acc, layer = brute_force(ents, preds, labels, res["threshold"])
    assert acc >= full - drop - 1e-9 and res["dev_metric"] == pytest.approx(acc) and res["avg_exit_layer"] == pytest.approx(layer)
    # a larger threshold on a fine grid either breaks the drop or makes exactly the same decisions
    _, chosen_exits = apply_threshold(ents, preds, res["threshold"])
    for t in torch.linspace(res["threshold"], math.log(3) + 0.01, 400, dtype=torch.float64).tolist()[1:]:
        if brute_force(ents, preds, labels, t)[0] >= full - drop - 1e-9:
            assert torch.equal(apply_threshold(ents, preds, t)[1], chosen_exits), t


def test_latency_budget_takes_the_most_accurate_measured_threshold(case):
    ents, preds, labels = case
    calls = []

    def fake_latency(t):  # ms per sample, as if each layer cost 0.1 ms
        calls.append(t)
        return 0.1 * brute_force(ents, preds, labels, t)[1]

    res = choose_threshold(ents, preds, labels, "accuracy", exit_start=1, latency_ms=0.25, measure=fake_latency)
    assert len(calls) == len(res["measured"]) >= 8
    within = [m for m in res["measured"] if m["latency_ms"] <= 0.25]
    assert res["latency_ms"] <= 0.25 and res["dev_metric"] == max(m["metric"] for m in within)
    with pytest.raises(ValueError, match="no threshold meets"):
        choose_threshold(ents, preds, labels, "accuracy", exit_start=1, latency_ms=0.01, measure=fake_latency)
    with pytest.raises(ValueError, match="exactly one of"):
        choose_threshold(ents, preds, labels, "accuracy", exit_start=1)


def test_apply_threshold_matches_the_rule(case):
    ents, preds, labels = case
    p, idx = apply_threshold(ents, preds, 0.4)
    for i in range(20):
        k = next((j for j, v in enumerate(ents[i, :-1].tolist()) if v < 0.4), ents.shape[1] - 1)
        assert idx[i] == k and p[i] == preds[i, k]


def test_calibrate_directory_writes_the_threshold(model_dir, tmp_path):  # noqa: F811
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    res = calibrate_directory(d, "rotten_tomatoes", max_drop=1.0, max_examples=64)
    cfg = json.loads((d / "config.json").read_text())
    cal = json.loads((d / "calibration.json").read_text())
    assert cfg["inference_threshold"] == res["threshold"] == cal["threshold"]
    assert cal["normalized_threshold"] == pytest.approx(res["threshold"] / math.log(2))
    assert cal["examples"] == 64 and cal["dev_metric"] >= cal["full_depth_dev_metric"] - 1.0
    ticks = iter(range(10**6))
    res2 = calibrate_directory(d, "rotten_tomatoes", latency_ms=1e9, max_examples=64, timer=lambda fn: (fn(), next(ticks) * 1e-3)[1])
    assert res2["latency_ms"] is not None and res2["batch_size"] == 1
    from costeff.inference.predict import Predictor

    assert Predictor(d).threshold == res2["threshold"]  # predict now uses the calibrated threshold
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text("text,label\n" + "".join(f"review number {i},{'pos' if i % 2 else 'neg'}\n" for i in range(60)))
    with pytest.raises(ValueError, match=r"its labels \['rotten', 'fresh'\] are not the task's \['neg', 'pos'\]"):
        calibrate_directory(d, "csv", data_dir=str(csv_path), max_drop=0.5)


def test_gflops_budget_takes_the_most_accurate_threshold_within_it(case):
    ents, preds, labels = case
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 40, (len(labels),), generator=g).double()
    gflops = lengths[:, None] * torch.arange(1, ents.shape[1] + 1, dtype=torch.float64)  # cost grows with length and depth
    full = float(gflops[:, -1].mean())
    res = choose_threshold(ents, preds, labels, "accuracy", exit_start=1, max_gflops=0.6 * full, gflops=gflops)
    assert res["full_depth_gflops"] == pytest.approx(full) and res["avg_gflops"] <= 0.6 * full
    assert res["criterion"] == {"max_gflops": 0.6 * full}

    def cost(t):
        _, idx = apply_threshold(ents, preds, t)
        return float(gflops[torch.arange(len(labels)), idx].mean())

    assert res["avg_gflops"] == pytest.approx(cost(res["threshold"]))
    # no threshold on a fine grid within the budget is more accurate
    for t in torch.linspace(0, math.log(3) + 0.01, 400, dtype=torch.float64).tolist():
        if cost(t) <= 0.6 * full:
            assert brute_force(ents, preds, labels, t)[0] <= res["dev_metric"] + 1e-9, t
    cheapest = float(gflops[:, 0].mean())
    with pytest.raises(ValueError, match="no threshold meets"):
        choose_threshold(ents, preds, labels, "accuracy", exit_start=1, max_gflops=0.9 * cheapest, gflops=gflops)
    with pytest.raises(ValueError, match="exactly one of"):
        choose_threshold(ents, preds, labels, "accuracy", exit_start=1, max_drop=0.5, max_gflops=1.0, gflops=gflops)


def _grid_curve(ents, preds, labels, gflops):
    """(threshold, accuracy points, mean GFLOPs) on a fine grid, from the plain-Python exit rule."""
    curve = []
    for t in torch.linspace(0, math.log(3) + 0.01, 600, dtype=torch.float64).tolist():
        acc, _ = brute_force(ents, preds, labels, t)
        k = [next((i for i, v in enumerate(e[:-1]) if v < t), len(e) - 1) for e in ents.tolist()]
        curve.append((t, acc, float(gflops[torch.arange(len(labels)), torch.tensor(k)].mean())))
    return curve


@pytest.mark.parametrize("teacher_acc, drop, speedup", [(90.0, 1.5, 1.6), (90.0, 3.0, None), (95.0, 1.0, 1.6), (80.0, 0.0, 100.0)])
def test_target_against_the_teacher_matches_a_brute_force_search(case, teacher_acc, drop, speedup):
    ents, preds, labels = case
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 40, (len(labels),), generator=g).double()
    gflops = lengths[:, None] * torch.arange(1, ents.shape[1] + 1, dtype=torch.float64)
    teacher_gflops = 1.2 * float(gflops[:, -1].mean())  # the teacher costs a little more than the student at full depth
    res = choose_for_target(ents, preds, labels, "accuracy", 1, gflops, teacher_acc, teacher_gflops, drop, speedup)
    acc, _ = brute_force(ents, preds, labels, res["threshold"])
    assert res["dev_metric"] == pytest.approx(acc) and res["target"]["drop"] == pytest.approx(teacher_acc - acc)
    assert res["target"]["speedup"] == pytest.approx(teacher_gflops / res["avg_gflops"])
    curve = _grid_curve(ents, preds, labels, gflops)
    ok_acc = [(a, c) for _, a, c in curve if a >= teacher_acc - drop - 1e-9]
    ok_speed = [(a, c) for _, a, c in curve if speedup is None or teacher_gflops / c >= speedup]
    both = [(a, c) for a, c in ok_acc if (a, c) in ok_speed]
    assert res["target"]["met"] == bool(both)
    if both and speedup is not None:  # the most accurate point meeting both; nothing on the grid beats it
        assert res["target"]["meets_speedup"] and acc >= max(a for a, _ in both) - 1e-9
    elif both:  # no speed-up asked: the cheapest within the drop
        assert res["avg_gflops"] <= min(c for _, c in both) + 1e-9
    else:
        closest = res["closest"]
        if ok_acc:  # the chosen point keeps the accuracy: the cheapest that does
            assert closest["meets_max_drop"]["threshold"] == res["threshold"]
            assert res["avg_gflops"] <= min(c for _, c in ok_acc) + 1e-9
        else:  # nothing keeps it: the most accurate point
            assert closest["meets_max_drop"] is None and acc >= max(a for _, a, _ in curve) - 1e-9
        if ok_speed:
            assert closest["meets_speedup"]["metric"] >= max(a for a, _ in ok_speed) - 1e-9
        else:
            assert closest["meets_speedup"] is None


def test_gflops_budget_on_a_model_directory_matches_the_models_own_flops_count(model_dir, tmp_path):  # noqa: F811
    import shutil

    from transformers import AutoTokenizer

    from costeff.data import load_task, make_loader, tokenize
    from costeff.inference.calibrate import calibrate_on_batches
    from costeff.models import CostEffForSequenceClassification

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    tok = AutoTokenizer.from_pretrained(d)
    dd, _, metric, _ = load_task("rotten_tomatoes")
    dev = type(dd)({"dev": dd["dev"].select(range(96))})
    loader = list(make_loader(tokenize(dev, tok, 64)["dev"], tok, 32, shuffle=False))
    full = calibrate_on_batches(d, loader, metric, max_drop=100.0)["full_depth_gflops"]
    res = calibrate_on_batches(d, loader, metric, max_gflops=0.7 * full, write=True)
    model = CostEffForSequenceClassification.from_pretrained(d).eval()
    ref = model.average_flops(loader, res["threshold"])  # the model's own early exit and FLOPs count
    assert ref["avg_full_flops"] / 1e9 == pytest.approx(full)
    assert ref["avg_flops"] / 1e9 == pytest.approx(res["avg_gflops"]) and res["avg_gflops"] <= 0.7 * full
    assert ref["avg_exit_layer"] == pytest.approx(res["avg_exit_layer"])
    assert model.config.inference_threshold == res["threshold"]


@pytest.mark.parametrize("teacher_acc, drop, latency", [(90.0, 3.0, 0.75), (90.0, 3.0, 0.2), (90.0, 0.0, 10.0), (99.0, 0.0, 0.75)])
def test_latency_target_against_the_teacher_takes_the_most_accurate_measured_point(case, teacher_acc, drop, latency):
    """choose_for_target with latency_ms: the latency is measured on a grid of thresholds spread over the
    exit layers; only measured points can meet it; among those meeting both halves, the most accurate."""
    ents, preds, labels = case
    gflops = torch.arange(1, ents.shape[1] + 1, dtype=torch.float64).expand(len(labels), -1).contiguous()
    calls = []

    def measure(t):  # a latency that follows the layers run, as the engine's does
        calls.append(t)
        return 0.1 + 0.2 * brute_force(ents, preds, labels, t)[1]

    res = choose_for_target(ents, preds, labels, "accuracy", 1, gflops, teacher_acc, 5.0, drop, latency_ms=latency, measure=measure,
                            latency_grid=8)
    assert 2 <= len(calls) <= 8 and [m["threshold"] for m in res["measured"]] == calls
    layers = [brute_force(ents, preds, labels, t)[1] for t in calls]
    assert max(layers) == pytest.approx(ents.shape[1])  # the grid reaches full depth
    for m in res["measured"]:
        assert m["latency_ms"] == pytest.approx(0.1 + 0.2 * m["avg_exit_layer"]) and m["metric"] == pytest.approx(
            brute_force(ents, preds, labels, m["threshold"])[0])
    both = [m for m in res["measured"] if m["latency_ms"] <= latency and m["metric"] >= teacher_acc - drop - 1e-9]
    assert res["target"]["met"] == bool(both) and res["criterion"]["latency_ms"] == latency
    if both:
        assert res["target"]["meets_latency"] and res["dev_metric"] >= max(m["metric"] for m in both) - 1e-9
        assert res["latency_ms"] <= latency and res["closest"] is None
    else:
        fast = [m for m in res["measured"] if m["latency_ms"] <= latency]
        best = res["closest"]["meets_latency"]
        assert (best is None) == (not fast) and (best is None or best["metric"] >= max(m["metric"] for m in fast) - 1e-9)
        assert "meets_speedup" not in res["closest"]
    with pytest.raises(ValueError, match="latency_ms must be"):
        choose_for_target(ents, preds, labels, "accuracy", 1, gflops, teacher_acc, 5.0, drop, latency_ms=-1.0, measure=measure)
    with pytest.raises(ValueError, match="needs a timer"):
        choose_for_target(ents, preds, labels, "accuracy", 1, gflops, teacher_acc, 5.0, drop, latency_ms=1.0)
