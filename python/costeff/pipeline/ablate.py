"""`costeff ablate`: COST-EFF's design choices switched off one at a time, over several training seeds
on one fixed data split (``split_seed``), with per-seed paired differences against the baseline.

Run directory layout::

    OUTPUT/seed<S>/teacher, ta          fine-tuned teacher and TA of training seed S, shared by the arms
    OUTPUT/seed<S>/<arm>/               that arm's prune/ and student/ (+ its own ta/ where the arm
                                        changes the TA); teacher/ and ta/ link into seed<S>/
    OUTPUT/seed<S>/<arm>/ablation_row.json   test accuracy at full depth and at the calibrated threshold,
                                        FLOPs, dev accuracy of every exit
    OUTPUT/latency.json                 every student (and the teacher) timed side by side in one run
    OUTPUT/ablation.json, ablation.md   mean ± std over seeds and paired differences, rewritten as arms finish

Every step resumes: the same command again continues where it stopped."""
from __future__ import annotations

import json
import logging
import os
import statistics
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from costeff._extension import extension_loaded
from costeff.pipeline.checkpoint import atomic_write_json
from costeff.pipeline.evaluate import add_latency, evaluate_hf_teacher, latency_batches, sweep_costeff
from costeff.pipeline.evaluate_utils import model_inputs
from costeff.pipeline.multi_exit import dev_exit_scores
from costeff.pipeline.run import PipelineConfig, load_costeff, load_teacher, run_pipeline, threshold_grid
from costeff.models import count_parameters, from_pretrained_encoder

log = logging.getLogger("costeff")


@dataclass(frozen=True)
class Arm:
    overrides: dict
    what: str  # what the arm changes (and the paper's claim it tests), for the table
    own_ta: bool = False  # the arm changes the TA, so it trains its own instead of sharing the seed's


ARMS = {
    "baseline": Arm({}, "COST-EFF as configured: exit-aware importance, gradient equilibrium, TA, iterative pruning"),
    "last_exit_importance": Arm({"exit_aware": False}, "importance from the last exit's loss only (paper: exit-aware is better)"),
    "no_gradient_equilibrium": Arm({"gradient_equilibrium": False}, "TA and student trained without gradient equilibrium",
                                   own_ta=True),
    "no_ta": Arm({"teacher_assistant": False}, "no TA: the teacher with fresh exits is pruned and distilled from the teacher"),
    "one_shot": Arm({"prune_schedule": "one_shot"}, "one pruning event with the iterative schedule's total steps"),
}


def _link(target: str, link: str) -> None:
    """``link`` -> ``target`` (relative), so an arm reads the seed's shared teacher/TA."""
    if os.path.islink(link):
        if os.path.realpath(link) != os.path.realpath(target):
            raise ValueError(f"ablate: {link} points to {os.readlink(link)}, expected {target}; use a fresh --output")
        return
    if os.path.exists(link):
        raise ValueError(f"ablate: {link} exists and is not a link to {target}; use a fresh --output")
    os.symlink(os.path.relpath(target, os.path.dirname(link)), link)


def _check_same_settings(out: str, c: PipelineConfig, backbone: str) -> None:
    """A resumed ablation must train with the settings it started with, or its arms would not compare."""
    path = os.path.join(out, "ablation_config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        before = json.load(f)
    now = json.loads(json.dumps({"config": c.__dict__, "backbone": backbone}))
    # a field added after the ablation started was not there to set: it ran with the field's default
    defaults = json.loads(json.dumps(PipelineConfig().__dict__))
    before["config"] = {**{k: v for k, v in defaults.items() if k not in before["config"]}, **before["config"]}
    ignored = {"progress"}  # display only
    changed = sorted(k for k in set(before["config"]) | set(now["config"])
                     if k not in ignored and before["config"].get(k) != now["config"].get(k))
    if before["backbone"] != backbone:
        changed.append("backbone")
    if changed:
        raise ValueError(f"ablate: {out} was started with other settings ({', '.join(changed)} differ); "
                         "rerun with the same flags to resume, or use a fresh --output")


def _teacher_row(data, seed_dir: str) -> dict:
    path = os.path.join(seed_dir, "teacher_test.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    teacher = load_teacher(seed_dir)
    config = from_pretrained_encoder(teacher, exit_start=teacher.config.num_hidden_layers).config
    row, _ = evaluate_hf_teacher(teacher, config, data, "test", "teacher (HF)")
    row["params"] = count_parameters(teacher)
    atomic_write_json(path, row)
    return row


# arms reach different FLOPs at their own calibrated thresholds; this compares them at the same cost
MATCHED_FLOPS_RATIO = 10.0


def metric_at_flops_ratio(points: Sequence[tuple], ratio: float) -> Optional[float]:
    """The metric at FLOPs reduction ``ratio``, linearly interpolated between the two sweep points
    (ratio, metric) around it (None when the sweep does not reach it)."""
    points = sorted(points)
    for (r0, m0), (r1, m1) in zip(points, points[1:]):
        if r0 <= ratio <= r1:
            return m0 if r1 == r0 else m0 + (m1 - m0) * (ratio - r0) / (r1 - r0)
    return points[0][1] if len(points) == 1 and points[0][0] == ratio else None


def evaluate_arm(arm_dir: str, data, teacher_row: dict, thresholds: Sequence[float] = ()) -> dict:
    """The student's test metric at full depth, at its calibrated threshold and, over a sweep of
    ``thresholds``, at MATCHED_FLOPS_RATIO; FLOPs against the teacher; the dev metric of every exit
    (how early rows can leave)."""
    student = load_costeff(arm_dir, "student")
    calibrated = student.config.inference_threshold
    grid = sorted({float(t) for t in thresholds} - {0.0})
    swept = [0.0] + grid + ([calibrated] if calibrated is not None else [])
    rows = [r for r, _ in sweep_costeff(student, data, "test", swept, "student", use_kernels=extension_loaded())]
    metric = data.metric
    full, cal = rows[0], rows[-1]
    curve = [(teacher_row["avg_gflops"] / r["avg_gflops"], 100 * r[metric]) for r in rows]
    dev = dev_exit_scores(student, data.dev, metric)
    params = count_parameters(student)
    return {
        "metric": metric,
        "full_depth": 100 * full[metric],
        "calibrated": 100 * cal[metric] if calibrated is not None else None,
        "threshold": calibrated,
        "avg_exit_layer": cal["avg_exit_layer"],
        "flops_ratio_full_depth": teacher_row["avg_gflops"] / full["avg_gflops"],
        "flops_ratio_calibrated": teacher_row["avg_gflops"] / cal["avg_gflops"],
        "matched_flops_ratio": MATCHED_FLOPS_RATIO,
        "at_matched_flops": metric_at_flops_ratio(curve, MATCHED_FLOPS_RATIO),
        "sweep": [{"threshold": t, "flops_ratio": r, metric: m} for t, (r, m) in zip(swept, curve)],
        "params": params,
        "params_ratio": teacher_row["params"] / params,
        "dev_exits": {k: 100 * v for k, v in dev.items() if k.startswith("exit")},
        "teacher": 100 * teacher_row[metric],
    }


def _train_arm(c: PipelineConfig, data, backbone: str, seed_dir: str, arm_dir: str, own_ta: bool, data_args: Optional[dict] = None) -> None:
    """The arm's run directory: the seed's teacher (and TA, unless the arm trains its own or has
    none) linked in, then its remaining stages."""
    os.makedirs(arm_dir, exist_ok=True)
    _link(os.path.join(seed_dir, "teacher"), os.path.join(arm_dir, "teacher"))
    stages = ["prune", "distill"]
    if c.teacher_assistant:
        if own_ta:
            stages.insert(0, "ta")
        else:
            _link(os.path.join(seed_dir, "ta"), os.path.join(arm_dir, "ta"))
    run_pipeline(c, data, backbone, arm_dir, resume=True, stages=tuple(stages), data_args=data_args)


def run_ablation(c: PipelineConfig, data, backbone: str, out: str, seeds: Sequence[int], arms: Sequence[str],
                 latency: bool = True, data_args: Optional[dict] = None) -> dict:
    """``data_args``: the task and its data arguments, recorded in every run directory (run_config.json)."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"ablate: unknown arm(s) {unknown}; known: {list(ARMS)}")
    if not seeds:
        raise ValueError("ablate: no seeds given")
    os.makedirs(out, exist_ok=True)
    _check_same_settings(out, c, backbone)
    atomic_write_json(os.path.join(out, "ablation_config.json"), {"config": c.__dict__, "backbone": backbone, "seeds": list(seeds),
                                                                  "arms": list(arms)})
    total, n = len(seeds) * len(arms), 0
    grid = threshold_grid(c, data.num_labels)
    for seed in seeds:
        cs = replace(c, seed=seed)
        ds = replace(data, seed=seed)  # the batch order follows the training seed; the split stays fixed
        seed_dir = os.path.join(out, f"seed{seed}")
        shared = ("teacher", "ta") if any(not ARMS[a].own_ta and replace(cs, **ARMS[a].overrides).teacher_assistant for a in arms) \
            else ("teacher",)
        run_pipeline(cs, ds, backbone, seed_dir, resume=True, stages=shared, data_args=data_args)
        teacher_row = _teacher_row(ds, seed_dir)
        for arm in arms:
            n += 1
            spec, arm_dir = ARMS[arm], os.path.join(seed_dir, arm)
            row_path = os.path.join(arm_dir, "ablation_row.json")
            if os.path.exists(row_path):
                with open(row_path) as f:
                    if "at_matched_flops" in json.load(f):
                        continue
                # a row from before the matched-FLOPs column: only evaluate the trained student again
            else:
                log.info("ablate: seed %d, arm %s (%d/%d)", seed, arm, n, total)
                _train_arm(replace(cs, **spec.overrides), ds, backbone, seed_dir, arm_dir, spec.own_ta, data_args)
            row = {"arm": arm, "seed": seed, **evaluate_arm(arm_dir, ds, teacher_row, grid)}
            atomic_write_json(row_path, row)
            write_summary(out, arms, seeds)
    if latency and _timed_systems(out) != {(a, s) for a in arms for s in seeds}:
        time_students(c, data, out, arms, seeds)
    return write_summary(out, arms, seeds)


def _timed_systems(out: str) -> set:
    path = os.path.join(out, "latency.json")
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {(r["arm"], r["seed"]) for r in json.load(f)["rows"] if r["arm"] in ARMS}


def time_students(c: PipelineConfig, data, out: str, arms: Sequence[str], seeds: Sequence[int], precision: str = "fp32") -> dict:
    """Every arm's student at its calibrated threshold, and the first seed's HF teacher, timed in the
    same interleaved rounds (median ms per sample at batch 1 and 32): latencies comparable across arms."""
    from costeff.inference import InferenceEngine

    timed = latency_batches(data, "test", c.latency_examples)
    teacher = load_teacher(os.path.join(out, f"seed{seeds[0]}"), attn_implementation="sdpa")
    systems = [({"arm": "teacher (HF)", "seed": seeds[0]}, lambda b: teacher(**model_inputs(b)))]
    for seed in seeds:
        for arm in arms:
            student = load_costeff(os.path.join(out, f"seed{seed}", arm), "student")
            t = student.config.inference_threshold or 0.0
            if extension_loaded():
                engine = InferenceEngine.from_model(student, precision)
                run = (lambda b, e=engine, t=t: e(b["input_ids"], b.get("attention_mask"), b.get("token_type_ids"), threshold=t))
            else:
                run = (lambda b, m=student, t=t: m.early_exit(**model_inputs(b), threshold=t))
            systems.append(({"arm": arm, "seed": seed, "threshold": t}, run))
    with torch.inference_mode():
        add_latency(systems, timed, c.latency_rounds)
    engine_name = f"engine {precision}" if extension_loaded() else "PyTorch early_exit (costeff._C not built)"
    result = {"runner": engine_name, "examples": c.latency_examples, "rounds": c.latency_rounds, "threads": torch.get_num_threads(),
              "rows": [row for row, _ in systems]}
    atomic_write_json(os.path.join(out, "latency.json"), result)
    return result


def mean_std(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (None for fewer than two values)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


SUMMARY_KEYS = ("full_depth", "calibrated", "flops_ratio_calibrated", "avg_exit_layer", "at_matched_flops", "teacher")
PAIRED_KEYS = ("full_depth", "calibrated", "at_matched_flops")


def summarize(rows: Sequence[dict], arms: Sequence[str], latency: Optional[dict] = None) -> dict:
    """Per arm: mean ± std over seeds of each SUMMARY_KEYS value, and of the per-seed difference
    against the baseline on the same seed (arm minus baseline) for the accuracies."""
    by = {(r["arm"], r["seed"]): r for r in rows}
    ms = {}
    if latency:
        for r in latency["rows"]:
            for k in ("latency_ms_b1", "latency_ms_b32"):
                ms.setdefault((r["arm"], k), []).append(r[k])
    out = {}
    for arm in arms:
        mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])
        entry = {"what": ARMS[arm].what, "seeds": [r["seed"] for r in mine]}
        for k in SUMMARY_KEYS:
            entry[k] = mean_std([r.get(k) for r in mine])
        if arm != "baseline":
            for k in PAIRED_KEYS:
                diffs = [r[k] - by[("baseline", r["seed"])][k] for r in mine
                         if ("baseline", r["seed"]) in by and r.get(k) is not None and by[("baseline", r["seed"])].get(k) is not None]
                entry[f"paired_diff_{k}"] = {**mean_std(diffs), "per_seed": diffs}
        for k in ("latency_ms_b1", "latency_ms_b32"):
            if (arm, k) in ms:
                entry[k] = mean_std(ms[(arm, k)])
        out[arm] = entry
    return out


def _pm(s: Optional[dict], digits: int = 2, suffix: str = "", signed: bool = False) -> str:
    """``mean ± std`` (just the mean for one value; ``-`` for none)."""
    if not s or s.get("mean") is None:
        return "-"
    mean = f"{s['mean']:{'+' if signed else ''}.{digits}f}"
    return f"{mean}{suffix}" if s.get("std") is None else f"{mean} ± {s['std']:.{digits}f}{suffix}"


def format_summary(summary: dict, metric: str, latency: Optional[dict] = None) -> str:
    lines = [f"| arm | seeds | test {metric}, full depth | paired diff | test {metric}, calibrated | paired diff | "
             f"FLOPs reduction (calibrated) | avg exit layer | test {metric} at {MATCHED_FLOPS_RATIO:g}x fewer FLOPs | paired diff | "
             "ms/sample b1 | ms/sample b32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, e in summary.items():
        d_full, d_cal, d_matched = (e.get(f"paired_diff_{k}") for k in PAIRED_KEYS)
        lines.append(f"| {arm} | {len(e['seeds'])} | {_pm(e['full_depth'])} | {_pm(d_full, signed=True)} | "
                     f"{_pm(e['calibrated'])} | {_pm(d_cal, signed=True)} | {_pm(e['flops_ratio_calibrated'], 1, 'x')} | "
                     f"{_pm(e['avg_exit_layer'])} | {_pm(e.get('at_matched_flops'))} | {_pm(d_matched, signed=True)} | "
                     f"{_pm(e.get('latency_ms_b1'), 3)} | {_pm(e.get('latency_ms_b32'), 3)} |")
    if latency:
        t = next((r for r in latency["rows"] if r["arm"] == "teacher (HF)"), None)
        if t:
            lines += ["", f"Teacher (HF, seed {t['seed']}) in the same timing run: {t['latency_ms_b1']:.3f} ms/sample at batch 1, "
                          f"{t['latency_ms_b32']:.3f} at batch 32 ({latency['runner']}, {latency['threads']} threads)."]
    lines += ["", "mean ± sample std over seeds; paired diff: per seed, arm minus baseline on the same seed, then mean ± std. "
                  f"At {MATCHED_FLOPS_RATIO:g}x: interpolated along each student's threshold sweep on test."]
    return "\n".join(lines)


def write_summary(out: str, arms: Sequence[str], seeds: Sequence[int]) -> dict:
    rows = []
    for seed in seeds:
        for arm in arms:
            p = os.path.join(out, f"seed{seed}", arm, "ablation_row.json")
            if os.path.exists(p):
                with open(p) as f:
                    rows.append(json.load(f))
    lat_path = os.path.join(out, "latency.json")
    latency = None
    if os.path.exists(lat_path):
        with open(lat_path) as f:
            latency = json.load(f)
    summary = summarize(rows, arms, latency)
    metric = rows[0]["metric"] if rows else "accuracy"
    result = {"summary": summary, "rows": rows, "metric": metric}
    atomic_write_json(os.path.join(out, "ablation.json"), result)
    tmp = os.path.join(out, "ablation.md.tmp")
    with open(tmp, "w") as f:
        f.write(format_summary(summary, metric, latency) + "\n")
    os.replace(tmp, os.path.join(out, "ablation.md"))
    return result
