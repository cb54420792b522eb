"""Stage 5: threshold sweep. For each model and entropy threshold: the task metric, the average exit
layer, the average analytic FLOPs per sample (each sample at its real length) and the measured CPU
latency per sample at batch 1 and batch 32 (every system timed in the same interleaved rounds, median;
costeff.inference.timing); written as JSON and CSV, printed as a table, and drawn as a Pareto plot
(metric vs FLOPs and vs latency)."""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Callable, Sequence

import torch

from costeff.data import make_loader
from costeff.inference.calibrate import normalized_threshold
from costeff.inference.timing import time_interleaved
from costeff.models import CostEffConfig, CostEffForSequenceClassification, flops_per_sample
from costeff.data import metrics as M
from costeff.pipeline.evaluate_utils import model_inputs

def fractions_of_ln2(nats) -> tuple:
    """The fractions of ln C that give exactly ``nats`` for two classes (a grid written in nats for
    binary tasks that scales with the class count elsewhere)."""
    return tuple(t / math.log(2) for t in nats)


# Sweep grids are fractions of ln C (the largest entropy C classes can have), so that they suit any class
# count (0 to 0.87 ln C here: 0 to 0.6 nats for two classes, 0 to 1.39 for five); thresholds themselves
# stay in nats everywhere.
DEFAULT_THRESHOLD_FRACTIONS = fractions_of_ln2((0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6))


def sweep_thresholds(fractions, num_labels: int) -> tuple:
    """Thresholds in nats: fraction * ln C, rounded to 6 decimals (so a two-class grid reads 0.1, 0.2...)."""
    scale = math.log(num_labels) if num_labels > 1 else 1.0
    return tuple(round(f * scale, 6) for f in fractions)


def latency_batches(data, split: str, examples: int, batch_sizes=(1, 32)) -> dict[int, list]:
    """The first `examples` rows of the split, collated once per batch size, in dataset order."""
    ds = data.encoded[split]
    sub = ds.select(range(min(examples, len(ds))))
    return {bs: list(make_loader(sub, data.tokenizer, bs, shuffle=False)) for bs in batch_sizes}


# A measured system: its table row (metric, exit layers, FLOPs) and how to run one batch for timing.
Measured = tuple[dict, Callable[[dict], object]]


def add_latency(systems: Sequence[Measured], timed: dict[int, list], rounds: int = 5, settle_s: float = 0.0) -> None:
    """row["latency_ms_b<bs>"] = ms per sample over the `timed` batches, for every system at once:
    costeff.inference.timing.time_interleaved (systems take turns round by round, median)."""
    for bs, batches in timed.items():
        n = sum(b["input_ids"].shape[0] for b in batches)

        def block(run):
            def go():
                for b in batches:
                    run(b)
                return n
            return go

        stats = time_interleaved({i: block(run) for i, (_, run) in enumerate(systems)}, rounds, settle_s=settle_s)
        for i, (row, _) in enumerate(systems):
            row[f"latency_ms_b{bs}"] = stats[i]["median"] * 1000


def _exit_row(name: str, threshold, metric: str, preds, labels, layers, flops, num_labels: int) -> dict:
    res = M.compute(metric, torch.cat(preds), torch.cat(labels))
    return {"model": name, "threshold": threshold, "normalized_threshold": normalized_threshold(threshold, num_labels), **res, "avg_exit_layer": sum(layers) / len(layers),
            "avg_gflops": sum(flops) / len(flops) / 1e9}


@torch.no_grad()
def sweep_costeff(model: CostEffForSequenceClassification, data, split: str, thresholds: Sequence[float], name: str,
                  use_kernels: bool = True, engine=None) -> list[Measured]:
    """One row per threshold: `model.early_exit` (the Python path), or `engine` (a
    costeff.inference.InferenceEngine of `model`) when given."""
    model.eval()
    loader = data.split(split) if engine is None else data.split(split, device="cpu")  # the engine runs on the CPU
    measured = []
    for t in thresholds:
        if engine is not None:
            run = (lambda b, t=t: engine(b["input_ids"], b.get("attention_mask"), b.get("token_type_ids"), threshold=t))
        else:
            run = (lambda b, t=t: model.early_exit(**model_inputs(b), threshold=t, use_kernels=use_kernels))
        preds, labels, flops, layers = [], [], [], []
        for batch in loader:
            out = run(batch)
            preds.append(out.logits.argmax(-1))
            labels.append(batch["labels"])
            lengths = batch["attention_mask"].sum(1).tolist()
            for length, layer in zip(lengths, out.exit_layer.tolist()):
                flops.append(flops_per_sample(model.config, int(length), exit_layer=layer))
                layers.append(layer)
        measured.append((_exit_row(name, t, data.metric, preds, labels, layers, flops, model.config.num_labels), run))
    return measured


@torch.no_grad()
def evaluate_hf_teacher(teacher, config: CostEffConfig, data, split: str, name: str) -> Measured:
    """The fine-tuned Hugging Face model as it ships (no exits); FLOPs from `config`, its full-width
    costeff config (from_bert(teacher, exit_start=num_layers).config)."""
    teacher.eval()
    preds, labels, flops = [], [], []
    for batch in data.split(split):
        preds.append(teacher(**model_inputs(batch)).logits.argmax(-1))
        labels.append(batch["labels"])
        flops += [flops_per_sample(config, int(n)) for n in batch["attention_mask"].sum(1).tolist()]
    res = M.compute(data.metric, torch.cat(preds), torch.cat(labels))
    row = {"model": name, "threshold": None, **res, "avg_exit_layer": float(config.num_hidden_layers), "avg_gflops": sum(flops) / len(flops) / 1e9}
    return row, (lambda b: teacher(**model_inputs(b)))


def add_ratios(rows: list[dict], reference: dict) -> None:
    for r in rows:
        r["flops_ratio"] = reference["avg_gflops"] / r["avg_gflops"]
        for k in list(r):
            if k.startswith("latency_ms_"):
                r[f"speedup_{k[len('latency_ms_'):]}"] = reference[k] / r[k]


def format_table(rows: list[dict], metric: str) -> str:
    cols = [("model", "{:<34}"), ("threshold", "{:>9}"), ("normalized_threshold", "{:>6.3f}"), (metric, "{:>8.4f}"), ("avg_exit_layer", "{:>6.2f}"),
            ("avg_gflops", "{:>8.4f}"), ("flops_ratio", "{:>7.2f}"), ("latency_ms_b1", "{:>8.2f}"),
            ("speedup_b1", "{:>6.2f}"), ("latency_ms_b32", "{:>8.3f}"), ("speedup_b32", "{:>6.2f}")]
    heads = ["model", "thresh", "/ln C", metric[:8], "layer", "GFLOPs", "FLOPs x", "ms b1", "x b1", "ms b32", "x b32"]
    widths = [34, 9, 6, 8, 6, 8, 7, 8, 6, 8, 6]
    lines = [" ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(heads, widths)))]
    for r in rows:
        cells = []
        for (k, fmt), w in zip(cols, widths):
            v = r.get(k)
            cells.append(("-" if v is None else (fmt.format(v) if not isinstance(v, str) else fmt.format(v))).rjust(w) if k != "model" else fmt.format(v))
        lines.append(" ".join(cells))
    return "\n".join(lines)


def write_results(rows: list[dict], metric: str, output_dir: str, title: str = "") -> dict:
    os.makedirs(output_dir, exist_ok=True)
    json_path, csv_path, png_path = (os.path.join(output_dir, f) for f in ("pareto.json", "pareto.csv", "pareto.png"))
    with open(json_path, "w") as f:
        json.dump(rows, f, indent=2)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "model", k != "threshold", k))
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    plot_pareto(rows, metric, png_path, title)
    return {"json": json_path, "csv": csv_path, "plot": png_path}


def plot_pareto(rows: list[dict], metric: str, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    models = list(dict.fromkeys(r["model"] for r in rows))
    for ax, xkey, xlabel in ((axes[0], "avg_gflops", "average GFLOPs per sample (analytic)"),
                             (axes[1], "latency_ms_b1", "CPU latency per sample, batch 1 (ms)")):
        for name in models:
            pts = sorted((r[xkey], r[metric]) for r in rows if r["model"] == name and r.get(xkey))
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) > 1 else "*", markersize=6 if len(pts) > 1 else 12, label=name)
        ax.set_xscale("log")
        # 1-2-5 ticks in plain numbers: the default minor labels (3x10^-2, 4x10^-2, ...) overlap
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(title or f"{metric} vs cost (entropy-threshold sweep)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
