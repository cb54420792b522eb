"""Students side by side at the same FLOPs reduction: each model's threshold sweep on a split, its
metric at the given reductions (interpolated as the ablation's matched-FLOPs column), and its dev
metric by exit. No latency: for that, `costeff evaluate`.

    python scripts/compare_at_flops.py --teacher runs/demo/teacher/model --split dev \\
        runs/demo/student/model runs/other/student/model
"""
from __future__ import annotations

import argparse
import json

import torch

from costeff.models import CostEffForSequenceClassification, flops_per_sample, from_pretrained_encoder
from costeff.pipeline.ablate import metric_at_flops_ratio
from costeff.pipeline.context import prepare_data
from costeff.pipeline.evaluate import sweep_costeff
from costeff.pipeline.multi_exit import dev_exit_scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="costeff model directories (each with its tokenizer)")
    p.add_argument("--teacher", required=True, help="the HF teacher directory the FLOPs reductions are against")
    p.add_argument("--task", default="rotten_tomatoes")
    p.add_argument("--data-dir")
    p.add_argument("--split", default="dev", choices=["dev", "test"])
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=48, help="the training max_length (demo preset: 48)")
    p.add_argument("--thresholds", default="0,0.1,0.2,0.3,0.4,0.5,0.55,0.6,0.65,0.7", help="entropy thresholds in nats")
    p.add_argument("--ratios", default="8,10,12,15,20", help="FLOPs reductions to report the metric at")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher)
    teacher_config = from_pretrained_encoder(teacher, exit_start=teacher.config.num_hidden_layers).config  # its one classifier
    results = []
    for path in args.models:
        data = prepare_data(args.task, path, max_length=args.max_length, split_seed=args.split_seed, data_dir=args.data_dir,
                            bucket_by_length=True)
        model = CostEffForSequenceClassification.from_pretrained(path).eval()
        lengths = [int(n) for b in data.split(args.split) for n in b["attention_mask"].sum(1).tolist()]
        teacher_gflops = sum(flops_per_sample(teacher_config, n) for n in lengths) / len(lengths) / 1e9
        rows = [r for r, _ in sweep_costeff(model, data, args.split, thresholds, path)]
        curve = [(teacher_gflops / r["avg_gflops"], 100 * r[data.metric]) for r in rows]
        exits = {k: 100 * v for k, v in dev_exit_scores(model, data.dev, data.metric).items() if k.startswith("exit")}
        at = {f"{r:g}x": metric_at_flops_ratio(curve, r) for r in ratios}
        results.append({"model": path, "split": args.split, "sweep": [{"threshold": t, "flops_ratio": x, data.metric: m}
                                                                      for t, (x, m) in zip(thresholds, curve)],
                        "at": at, "dev_exits": exits})
        print(path)
        print("  sweep:", " ".join(f"T={t:g}: {m:.2f} @ {x:.1f}x" for t, (x, m) in zip(thresholds, curve)))
        print(f"  {args.split} {data.metric} at", " / ".join(f"{k}: {'-' if v is None else f'{v:.2f}'}" for k, v in at.items()))
        print("  dev by exit:", " / ".join(f"{v:.2f}" for v in exits.values()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
