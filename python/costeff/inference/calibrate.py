"""Pick the entropy threshold of a model directory on the dev split: `costeff calibrate`.

One full-depth pass gives every exit's entropy and prediction for every dev example; the exit rule
(first exit whose entropy is below the threshold, else the last) then gives the exact predictions and
exit layers at *any* threshold without running the model again, so the search tries every threshold at
which some decision changes (fine-grained, not a grid). Three criteria:

  max_drop=0.5     the largest threshold whose dev metric is within 0.5 points of full depth;
  latency_ms=X     the most accurate threshold whose measured latency (ms per sample at `batch_size`)
                   is within X, timed here on a grid of candidates (the timer is injectable);
  max_gflops=G     the most accurate threshold whose average analytic GFLOPs per dev example (at each
                   example's real length and exit layer) is within G: a budget that, unlike latency, is
                   the same on every machine.

The pipeline calibrates against a target instead (:func:`choose_for_target`): at most ``max_drop``
points below the *teacher* on dev and, optionally, ``speedup`` x fewer GFLOPs than the teacher.

The choice is written into the directory's config.json (``inference_threshold``, nats) and, with the
dev numbers, into calibration.json; thresholds stay in nats, ``normalized_threshold`` = threshold / ln C.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from costeff.data import load_task, make_loader, tokenize
from costeff.data.tasks import head_label_names, head_label_order, renumber_labels
from costeff.data import metrics as M


def exit_table(model, loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entropies [n, exits] float64, predictions [n, exits], labels [n], real lengths [n]) from one
    full-depth pass."""
    from costeff.device import module_device, to_device

    ents, preds, labels, lengths = [], [], [], []
    model.eval()
    device = module_device(model)
    with torch.inference_mode():
        for b in loader:
            b = to_device(b, device)
            out = model(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
            lg = torch.stack([x.double() for x in out.exit_logits], 1)  # [batch, exits, classes]
            logp = torch.log_softmax(lg, -1)
            ents.append(-(logp.exp() * logp).sum(-1).cpu())
            preds.append(lg.argmax(-1).cpu())
            labels.append(b["labels"].cpu())
            lengths.append(b["attention_mask"].sum(1).cpu())
    return torch.cat(ents), torch.cat(preds), torch.cat(labels), torch.cat(lengths)


def exit_gflops_table(config, lengths: torch.Tensor) -> torch.Tensor:
    """[n, exits] float64: analytic GFLOPs of each example (at its real length) when it leaves at each exit."""
    from costeff.models.flops import flops_per_sample

    layers = config.exit_layers()
    per_length = {n: [flops_per_sample(config, n, layer) / 1e9 for layer in layers] for n in sorted(set(lengths.tolist()))}
    return torch.tensor([per_length[n] for n in lengths.tolist()], dtype=torch.float64).reshape(len(lengths), len(layers))


def apply_threshold(ents: torch.Tensor, preds: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and exit indices (0-based among the exits) of the entropy exit rule."""
    leave = ents < threshold
    leave[:, -1] = True
    idx = leave.int().argmax(1)
    return preds.gather(1, idx[:, None])[:, 0], idx


def candidate_thresholds(ents: torch.Tensor, limit: int = 4000) -> list[float]:
    """0 and one threshold per set of exit decisions: midway between consecutive distinct
    intermediate-exit entropies (thinned evenly to `limit`), and just above the largest. Midway, not
    just above an entropy, so the float32 entropies of the engine and kernels make the same decisions
    as these float64 ones."""
    vals = torch.unique(ents[:, :-1].flatten())
    if len(vals) > limit:
        vals = vals[torch.linspace(0, len(vals) - 1, limit).long()]
    if len(vals) == 0:
        return [0.0]
    mids = ((vals[:-1] + vals[1:]) / 2).tolist()
    return [0.0] + mids + [float(vals[-1]) * (1 + 1e-6) + 1e-6]


def grid_by_exit_layer(items: list, layer_of: Callable, grid: int) -> list:
    """Up to ``grid`` of ``items`` spread evenly over their distinct average exit layers: the thresholds
    whose latency is measured (latency follows the layers run; timing every candidate would take long).
    Of items at the same layer (to 0.01) the first is kept: threshold 0, full depth, is always in."""
    first: dict = {}
    for x in items:
        first.setdefault(round(layer_of(x), 2), x)
    by_layer = sorted(first.items())
    return [by_layer[round(i * (len(by_layer) - 1) / max(1, grid - 1))][1] for i in range(min(grid, len(by_layer)))]


def choose_threshold(ents, preds, labels, metric: str, exit_start: int, max_drop: Optional[float] = None,
                     latency_ms: Optional[float] = None, measure: Optional[Callable[[float], float]] = None,
                     latency_grid: int = 12, max_gflops: Optional[float] = None, gflops: Optional[torch.Tensor] = None) -> dict:
    """The calibration decision (see the module doc). `measure(threshold) -> ms per sample` is called
    for the latency criterion only; `gflops` ([n, exits], :func:`exit_gflops_table`) serves the GFLOPs budget."""
    if sum(x is not None for x in (max_drop, latency_ms, max_gflops)) != 1:
        raise ValueError("calibrate: give exactly one of max_drop (points), latency_ms and max_gflops")
    if len(labels) == 0:
        raise ValueError("calibrate: the dev split is empty")
    if gflops is not None and gflops.shape != ents.shape:
        raise ValueError(f"calibrate: gflops has shape {tuple(gflops.shape)}, the entropies {tuple(ents.shape)}")

    def score(t):
        p, idx = apply_threshold(ents, preds, t)
        return 100 * M.compute(metric, p, labels)[metric], float(idx.double().mean()) + exit_start

    def mean_gflops(t):
        return float(gflops.gather(1, apply_threshold(ents, preds, t)[1][:, None]).mean()) if gflops is not None else None

    full_metric, _ = score(0.0)
    cands = candidate_thresholds(ents)
    measured = []
    latency = None
    if max_gflops is not None:
        if not (max_gflops > 0):
            raise ValueError(f"calibrate: max_gflops must be > 0, got {max_gflops}")
        if gflops is None:
            raise ValueError("calibrate: the GFLOPs criterion needs the examples' GFLOPs by exit")
        costs = {t: mean_gflops(t) for t in cands}
        within = [t for t in cands if costs[t] <= max_gflops]
        if not within:
            cheapest = min(cands, key=costs.get)
            raise ValueError(f"calibrate: no threshold meets {max_gflops} GFLOPs per example; the cheapest is "
                             f"{costs[cheapest]:.4f} at threshold {cheapest:.4f} (full depth {costs[0.0]:.4f})")
        chosen = max(within, key=lambda t: (score(t)[0], -costs[t]))
    elif max_drop is not None:
        if not (max_drop >= 0):
            raise ValueError(f"calibrate: max_drop must be >= 0 points, got {max_drop}")
        best = 0.0
        for t in cands:
            if score(t)[0] >= full_metric - max_drop - 1e-9:
                best = max(best, t)
        chosen = best
    else:
        if not (latency_ms > 0):
            raise ValueError(f"calibrate: latency_ms must be > 0, got {latency_ms}")
        if measure is None:
            raise ValueError("calibrate: the latency criterion needs a timer")
        measured = [{"threshold": t, "latency_ms": float(measure(t)), "metric": score(t)[0], "avg_exit_layer": score(t)[1]}
                    for t in grid_by_exit_layer(cands, lambda t: score(t)[1], latency_grid)]
        within = [m for m in measured if m["latency_ms"] <= latency_ms]
        if not within:
            fastest = min(measured, key=lambda m: m["latency_ms"])
            raise ValueError(f"calibrate: no threshold meets {latency_ms} ms per sample here; the fastest measured is "
                             f"{fastest['latency_ms']:.3f} ms at threshold {fastest['threshold']:.4f}")
        best = max(within, key=lambda m: (m["metric"], -m["latency_ms"]))
        chosen, latency = best["threshold"], best["latency_ms"]
    metric_at, layer_at = score(chosen)
    criterion = {k: v for k, v in (("max_drop", max_drop), ("latency_ms", latency_ms), ("max_gflops", max_gflops)) if v is not None}
    return {"threshold": chosen, "metric": metric, "dev_metric": metric_at, "full_depth_dev_metric": full_metric,
            "avg_exit_layer": layer_at, "latency_ms": latency, "avg_gflops": mean_gflops(chosen), "full_depth_gflops": mean_gflops(0.0),
            "measured": measured, "examples": len(labels), "criterion": criterion}


def threshold_points(ents, preds, labels, metric: str, exit_start: int, gflops: torch.Tensor, thresholds=None) -> list[dict]:
    """The dev (or test) curve: for each threshold (default: every candidate), the metric in points,
    the average exit layer and the average GFLOPs per example."""
    points = []
    for t in candidate_thresholds(ents) if thresholds is None else thresholds:
        p, idx = apply_threshold(ents, preds, t)
        points.append({"threshold": float(t), "metric": 100 * M.compute(metric, p, labels)[metric],
                       "avg_exit_layer": float(idx.double().mean()) + exit_start,
                       "avg_gflops": float(gflops.gather(1, idx[:, None]).mean())})
    return points


def target_verdict(point: dict, teacher_metric: float, teacher_gflops: float, max_drop: float, speedup: Optional[float],
                   latency_ms: Optional[float] = None) -> dict:
    """One point of a curve against the target: its drop below the teacher (points), its speed-up in
    analytic FLOPs, and which parts of the target it meets. With ``latency_ms``, a point meets the
    latency part only when its latency was measured (``point["latency_ms"]``) and is within it."""
    drop = teacher_metric - point["metric"]
    x = teacher_gflops / point["avg_gflops"]
    meets_drop = drop <= max_drop + 1e-9
    meets_speedup = speedup is None or x >= speedup * (1 - 1e-9)
    measured = point.get("latency_ms")
    meets_latency = latency_ms is None or (measured is not None and measured <= latency_ms)
    return {**point, "latency_ms": measured, "drop": drop, "speedup": x, "meets_max_drop": meets_drop, "meets_speedup": meets_speedup,
            "meets_latency": meets_latency, "met": meets_drop and meets_speedup and meets_latency}


def _cost(p: dict) -> tuple:
    """Cheaper first: measured latency where there is one, then analytic GFLOPs."""
    return (p["latency_ms"] if p.get("latency_ms") is not None else math.inf, p["avg_gflops"])


def closest_points(points: list[dict], latency: bool = False) -> dict:
    """When no point meets the whole target: the cheapest that keeps the accuracy, the most accurate
    that reaches the speed-up (with a latency target: the speed-up and the latency; key
    ``meets_latency``); None where no point does."""
    acc = [p for p in points if p["meets_max_drop"]]
    fast = [p for p in points if p["meets_speedup"] and p["meets_latency"]]
    return {"meets_max_drop": min(acc, key=lambda p: (*_cost(p), -p["metric"])) if acc else None,
            "meets_latency" if latency else "meets_speedup": max(fast, key=lambda p: (p["metric"], *(-c for c in _cost(p)))) if fast else None}


def choose_for_target(ents, preds, labels, metric: str, exit_start: int, gflops: torch.Tensor, teacher_metric: float,
                      teacher_gflops: float, max_drop: float, speedup: Optional[float] = None, latency_ms: Optional[float] = None,
                      measure: Optional[Callable[[float], float]] = None, latency_grid: int = 12) -> dict:
    """The pipeline's calibration. Among the thresholds within ``max_drop`` points of the teacher's dev
    metric that reach ``speedup`` (teacher GFLOPs / the student's, when given) and, with
    ``latency_ms``, whose latency ``measure(threshold) -> ms per example`` is within it (measured on a
    grid of thresholds by exit layer; only measured ones can meet it): the most accurate when a
    speed-up or latency is asked (ties: the cheaper), else the cheapest (ties: the more accurate).
    When none meets all, the closest point on each side is reported and the one that keeps the
    accuracy is chosen (none does: the most accurate): a slower answer breaks no promise a wrong one would."""
    if not (max_drop >= 0):
        raise ValueError(f"calibrate: max_drop must be >= 0 points, got {max_drop}")
    if speedup is not None and not (speedup >= 1):
        raise ValueError(f"calibrate: speedup must be >= 1, got {speedup}")
    if latency_ms is not None and not (0 < latency_ms < math.inf):
        raise ValueError(f"calibrate: latency_ms must be a number of ms > 0, got {latency_ms}")
    if latency_ms is not None and measure is None:
        raise ValueError("calibrate: the latency criterion needs a timer")
    if len(labels) == 0:
        raise ValueError("calibrate: the dev split is empty")
    raw = threshold_points(ents, preds, labels, metric, exit_start, gflops)
    measured = []
    if latency_ms is not None:
        for p in grid_by_exit_layer(raw, lambda p: p["avg_exit_layer"], latency_grid):
            p["latency_ms"] = float(measure(p["threshold"]))
            measured.append({k: p[k] for k in ("threshold", "latency_ms", "metric", "avg_exit_layer")})
    points = [target_verdict(p, teacher_metric, teacher_gflops, max_drop, speedup, latency_ms) for p in raw]
    met = [p for p in points if p["met"]]
    closest = None
    if met:
        key = (lambda p: (p["metric"], *(-c for c in _cost(p)))) if speedup is not None or latency_ms is not None \
            else (lambda p: (-p["avg_gflops"], p["metric"]))
        chosen = max(met, key=key)
    else:
        closest = closest_points(points, latency=latency_ms is not None)
        chosen = closest["meets_max_drop"] or max(points, key=lambda p: (p["metric"], *(-c for c in _cost(p))))
    full = points[0]  # threshold 0: every example at the last exit
    criterion = {"max_drop": max_drop, "speedup": speedup, "against": "teacher"}
    if latency_ms is not None:
        criterion["latency_ms"] = latency_ms
    return {"threshold": chosen["threshold"], "metric": metric, "dev_metric": chosen["metric"], "full_depth_dev_metric": full["metric"],
            "avg_exit_layer": chosen["avg_exit_layer"], "latency_ms": chosen["latency_ms"], "avg_gflops": chosen["avg_gflops"],
            "full_depth_gflops": full["avg_gflops"], "measured": measured, "examples": len(labels), "criterion": criterion,
            "teacher_dev_metric": teacher_metric, "teacher_gflops": teacher_gflops,
            "target": {k: chosen[k] for k in ("drop", "speedup", "latency_ms", "meets_max_drop", "meets_speedup", "meets_latency", "met")},
            "closest": closest}


def target_report(model, loader, metric: str, teacher: dict, threshold: float, max_drop: float, speedup: Optional[float] = None,
                  latency_ms: Optional[float] = None, measured_latency: Optional[float] = None) -> dict:
    """A calibrated threshold on another split (test): its verdict against the target, measured against
    the teacher on that split (``teacher``: {"metric": points, "config": its converted config}), and,
    when it misses, the closest point on each side of that split's curve. With a latency target,
    ``measured_latency`` is the threshold's latency measured on that split (ms per example)."""
    ents, preds, labels, lengths = exit_table(model, loader)
    teacher_gflops = float(exit_gflops_table(teacher["config"], lengths)[:, -1].mean())
    curve = threshold_points(ents, preds, labels, metric, model.config.exit_start, exit_gflops_table(model.config, lengths),
                             [threshold] + candidate_thresholds(ents))
    curve[0]["latency_ms"] = measured_latency
    at, *rest = [target_verdict(p, teacher["metric"], teacher_gflops, max_drop, speedup, latency_ms) for p in curve]
    return {**at, "teacher_metric": teacher["metric"], "teacher_gflops": teacher_gflops,
            "closest": None if at["met"] else closest_points(rest, latency=latency_ms is not None)}


def normalized_threshold(threshold: float, num_labels: int) -> Optional[float]:
    """threshold / ln C: 1 is the entropy of a uniform guess over C classes (None for one class)."""
    return threshold / math.log(num_labels) if num_labels > 1 else None


def write_calibration(model_dir, result: dict, num_labels: int) -> None:
    """inference_threshold into config.json and the dev numbers into calibration.json (both atomic)."""
    path = Path(os.fspath(model_dir))
    cfg = json.loads((path / "config.json").read_text())
    cfg["inference_threshold"] = result["threshold"]
    record = dict(result)
    record["normalized_threshold"] = normalized_threshold(result["threshold"], num_labels)
    for name, payload in (("calibration.json", record), ("config.json", cfg)):
        tmp = path / (name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=name == "config.json") + "\n")
        os.replace(tmp, path / name)


def calibrate_directory(model_dir, task: str, data_dir: Optional[str] = None, seed: int = 0, split: str = "dev",
                        max_drop: Optional[float] = None, latency_ms: Optional[float] = None, batch_size: int = 1,
                        precision: str = "fp32", max_examples: int = 0, timer: Optional[Callable[[Callable[[], None]], float]] = None,
                        tokenizer=None, max_length: Optional[int] = None, max_gflops: Optional[float] = None, device: str = "cpu",
                        teacher_dir: Optional[str] = None, speedup: Optional[float] = None, **task_kwargs) -> dict:
    """Calibrates a model directory on a task's split and writes the choice into it; returns the result.
    `timer(fn) -> seconds per call` measures a callable (default: median of interleaved wall-clock runs).
    ``device``: where the full-depth pass and the latency criterion run ("cuda": GpuRunner).
    ``teacher_dir``: the classifier the model was distilled from; ``max_drop`` is then measured against
    it on the split, and ``speedup`` (its analytic FLOPs over the model's) may be asked too
    (:func:`choose_for_target`, the pipeline's own calibration)."""
    from costeff.device import resolve_device
    from costeff.inference.predict import Predictor

    pred = Predictor(model_dir, precision, threshold=0.0, tokenizer=tokenizer, device=device)
    dd, num_labels, metric, names = load_task(task, data_dir=data_dir, seed=seed, **task_kwargs)
    cfg = pred.config
    model_names = [pred.labels[i] for i in range(cfg.num_labels)]
    ids, _ = head_label_order(model_names, names, f"calibrate: the model {model_dir}")
    ds = renumber_labels(type(dd)({split: dd[split]}), ids)[split]
    if max_examples:
        ds = ds.select(range(min(max_examples, len(ds))))
    enc = tokenize(type(dd)({split: ds}), pred.tokenizer, max_length or pred.max_length)[split]
    loader = make_loader(enc, pred.tokenizer, 64, shuffle=False)
    timed = None
    if latency_ms is not None:
        timed = list(make_loader(enc.select(range(min(128, len(enc)))), pred.tokenizer, batch_size, shuffle=False))
    reference = None
    if teacher_dir is not None:
        if max_drop is None or max_gflops is not None:
            raise ValueError("calibrate: against a teacher the criterion is max_drop (and speedup, latency_ms)")
        reference = teacher_on_split(teacher_dir, type(dd)({split: ds}), metric, model_names, max_length or pred.max_length)
    elif speedup is not None:
        raise ValueError("calibrate: speedup is measured against a teacher: give its directory (--teacher)")
    result = calibrate_on_batches(model_dir, loader, metric, max_drop, latency_ms, timed, pred, timer, max_gflops=max_gflops,
                                  device=resolve_device(device, "calibrate --device"), teacher=reference, speedup=speedup)
    result.update(task=task, split=split, precision=precision, batch_size=batch_size if latency_ms is not None else None)
    write_calibration(model_dir, result, cfg.num_labels)
    return result


def teacher_on_split(teacher_dir: str, splits, metric: str, label_names, max_length: int) -> dict:
    """{"metric": points, "config": converted config} of a fine-tuned classifier directory on the one
    split in ``splits`` (tokenized with its own tokenizer); its labels must be ``label_names``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from costeff.models import converted_config

    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    ids, _ = head_label_order(head_label_names(model.config), label_names, f"calibrate: the teacher {teacher_dir}")
    if ids != list(range(len(ids))):
        raise ValueError(f"calibrate: the teacher {teacher_dir} orders its labels {head_label_names(model.config)} unlike the model "
                         f"{list(label_names)}; it is not the teacher this model was distilled from")
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    (split,) = list(splits)
    enc = tokenize(splits, tok, max_length)[split]
    predictions, labels = [], []
    with torch.inference_mode():
        for b in make_loader(enc, tok, 64, shuffle=False):
            inputs = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in b}
            predictions.append(model(**inputs).logits.argmax(-1))
            labels.append(b["labels"])
    return {"metric": 100 * M.compute(metric, torch.cat(predictions), torch.cat(labels))[metric],
            "config": converted_config(teacher_dir, exit_start=None)}


def calibrate_on_batches(model_dir, loader, metric: str, max_drop: Optional[float] = None, latency_ms: Optional[float] = None,
                         timed_batches=None, predictor=None, timer=None, write: bool = False, max_gflops: Optional[float] = None,
                         device="cpu", teacher: Optional[dict] = None, speedup: Optional[float] = None) -> dict:
    """The calibration on already-tokenized batches (the pipeline's dev loader, batches on ``device``,
    where the full-depth pass runs); `timed_batches` and `predictor` (a
    costeff.inference.predict.Predictor of the directory) serve the latency criterion. ``teacher``
    ({"metric": dev points, "config": its converted config}): calibrate against it for ``max_drop``
    and ``speedup`` (:func:`choose_for_target`)."""
    from costeff.models import CostEffForSequenceClassification

    model = CostEffForSequenceClassification.from_pretrained(model_dir).to(device).eval()
    ents, preds, labels, lengths = exit_table(model, loader)
    measure = None
    if latency_ms is not None:
        if predictor is None or not timed_batches:
            raise ValueError("calibrate: the latency criterion needs a predictor and batches to time")
        n = sum(len(b["input_ids"]) for b in timed_batches)
        clock = timer or _median_seconds

        def measure(t):
            predictor.threshold = t

            def run():
                for b in timed_batches:
                    predictor._run(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
            return clock(run) * 1000 / n

    if teacher is not None:
        teacher_gflops = float(exit_gflops_table(teacher["config"], lengths)[:, -1].mean())
        result = choose_for_target(ents, preds, labels, metric, model.config.exit_start, exit_gflops_table(model.config, lengths),
                                   teacher["metric"], teacher_gflops, max_drop, speedup, latency_ms, measure)
        if write:
            write_calibration(model_dir, result, model.config.num_labels)
        return result
    result = choose_threshold(ents, preds, labels, metric, model.config.exit_start, max_drop, latency_ms, measure,
                              max_gflops=max_gflops, gflops=exit_gflops_table(model.config, lengths))
    if write:
        write_calibration(model_dir, result, model.config.num_labels)
    return result


def _median_seconds(fn: Callable[[], None], rounds: int = 5) -> float:
    from costeff.inference.timing import time_interleaved

    def block():
        fn()
        return 1

    return time_interleaved({"run": block}, rounds)["run"]["median"]
