"""Throughput of `costeff predict`'s Predictor (tokenizer + early exit + records, sentences/s) per
backend, side by side in one run, on a trained model directory and the task's test sentences:

  engine int8 / engine fp32   the C++ InferenceEngine (the default backend)
  pytorch early_exit          CostEffForSequenceClassification.early_exit on the torch.ops.costeff kernels
  onnxruntime fp32 / int8     `costeff export --format onnx` of the same directory, run by OnnxEarlyExit

All at the model's calibrated threshold (or --threshold). Timing: costeff.inference.timing.time_interleaved
(backends take turns round by round, median over rounds) over the first --examples test sentences
per batch size; accuracy on the whole test split. Needs onnxruntime and onnx (requirements/onnx.txt).

    python benchmarks/bench_predict.py --model runs/demo/student/model [--batch-sizes 1,32] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "python", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import costeff  # noqa: E402
from costeff.data import load_task  # noqa: E402
from costeff.inference.onnx_export import export_onnx  # noqa: E402
from costeff.inference.predict import Predictor  # noqa: E402
from costeff.inference.timing import time_interleaved  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "runs" / "demo" / "student" / "model"), help="model directory")
    ap.add_argument("--tokenizer", help="tokenizer directory, for model directories saved without one")
    ap.add_argument("--task", default="rotten_tomatoes")
    ap.add_argument("--data-dir")
    ap.add_argument("--seed", type=int, default=0, help="the split seed the model was trained with")
    ap.add_argument("--threshold", type=float, help="entropy threshold in nats (default: the calibrated one)")
    ap.add_argument("--examples", type=int, default=320, help="test sentences timed")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "predict.json"))
    return ap.parse_args(argv)


def build_predictors(args, tmp: str) -> dict[str, Predictor]:
    kw = dict(threshold=args.threshold, tokenizer=args.tokenizer)
    preds = {
        "engine int8": Predictor(args.model, "int8", **kw),
        "engine fp32": Predictor(args.model, "fp32", **kw),
        "pytorch early_exit": Predictor(args.model, backend="pytorch", **kw),
    }
    for precision in ("fp32", "int8"):
        out = os.path.join(tmp, f"onnx_{precision}")
        export_onnx(args.model, out, precision)
        preds[f"onnxruntime {precision}"] = Predictor(out, **kw)
    return preds


def accuracy(pred: Predictor, texts: list[str], labels: list[int], batch: int = 64) -> float:
    right = 0
    for i in range(0, len(texts), batch):
        for rec, gold in zip(pred(texts[i:i + batch]), labels[i:i + batch]):
            right += pred.labels.index(rec["label"]) == gold
    return 100.0 * right / len(texts)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    dd, _, _, _ = load_task(args.task, data_dir=args.data_dir, seed=args.seed)
    test = dd["test"]
    text_col = "text" if "text" in test.column_names else test.column_names[0]
    texts, labels = list(test[text_col]), list(test["label"])
    timed = texts[: args.examples]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        preds = build_predictors(args, tmp)
        threshold = next(iter(preds.values())).threshold
        rows = {name: {"system": name, "accuracy": accuracy(p, texts, labels)} for name, p in preds.items()}
        for b in batch_sizes:
            chunks = [timed[i:i + b] for i in range(0, len(timed), b)]

            def block(p):
                def run():
                    for c in chunks:
                        p(c)
                    return len(timed)
                return run

            res = time_interleaved({name: block(p) for name, p in preds.items()}, rounds=args.rounds)
            for name, r in res.items():
                rows[name][f"b{b}_sentences_per_s"] = 1.0 / r["median"]
                rows[name][f"b{b}_ms_per_sentence"] = 1000.0 * r["median"]
    base = rows["pytorch early_exit"]
    header = f"{'system':22} {'acc':>6}" + "".join(f" | b{b:<3} sent/s  x pytorch" for b in batch_sizes)
    lines = [header, "-" * len(header)]
    for row in rows.values():
        line = f"{row['system']:22} {row['accuracy']:6.2f}"
        for b in batch_sizes:
            v = row[f"b{b}_sentences_per_s"]
            line += f" | {v:12.0f} {v / base[f'b{b}_sentences_per_s']:9.2f}"
        lines.append(line)
    table = "\n".join(lines)
    print(f"threshold {threshold:.4f} nats, {args.threads} threads, {len(timed)} sentences timed, accuracy on {len(texts)}")
    print(table)
    meta = {"model": args.model, "threshold": threshold, "threads": args.threads, "examples": len(timed), "test_sentences": len(texts),
            "rounds": args.rounds, "cpu": platform.processor() or platform.machine(), "engine_isa": costeff.info()["engine_isa"], "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": "python benchmarks/bench_predict.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": list(rows.values()), "table": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
