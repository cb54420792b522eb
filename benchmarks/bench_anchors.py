"""What a user would run instead, side by side with costeff, on a trained run directory.

Systems (all on the same test sentences, in one interleaved run per thread count and batch size):
  HF teacher (sdpa)          the fine-tuned transformers model as it ships
  torch int8 teacher         torch.ao.quantization.quantize_dynamic on its nn.Linear layers
  ORT fp32 teacher           ONNX export (opset 17) + onnxruntime.transformers.optimizer (model_type bert)
  ORT int8 teacher           onnxruntime.quantization.quantize_dynamic (QInt8 weights) of the plain export
  costeff early_exit         the student's Python early-exit path (torch.ops.costeff kernels)
  costeff engine <prec>      the student on the C++ engine, per precision
Accuracy is on the whole test split; latency (ms per sample) on the first --examples test sentences,
by costeff.inference.timing.time_interleaved (systems take turns round by round, median over rounds).
(through costeff.pipeline.evaluate.add_latency, as the evaluate stage). GFLOP/s = analytic FLOPs per sample (costeff.models.flops, average over the timed sentences at their
exit layers) / latency. Needs onnxruntime and onnx (requirements/onnx.txt).

    python benchmarks/bench_anchors.py [--run runs/demo] [--threads 1,2] [--thresholds 0.5]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# torch's OpenMP threads (HF, torch int8, early_exit and the engine all run on that pool) bound one per
# core, set before torch loads OpenMP; a caller's own setting wins. Unbound, the main thread and the
# OpenMP worker were seen sharing one core for whole phases of a process on these 2-core VMs (2 threads
# slower than 1; docs/engine.md, Threads). ONNX Runtime has its own pool, made while the process may
# use every CPU it was given (ort_sessions).
PROCESS_CPUS = os.sched_getaffinity(0)
os.environ.setdefault("OMP_PROC_BIND", "true")
os.environ.setdefault("OMP_PLACES", "cores")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "python", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from _harness import cpu_model  # noqa: E402
from costeff.inference import InferenceEngine  # noqa: E402
from costeff.models import flops_per_sample, from_bert  # noqa: E402
from costeff.pipeline.context import prepare_data  # noqa: E402
from costeff.pipeline.evaluate import add_latency  # noqa: E402
from costeff.pipeline.run import load_costeff, load_teacher, read_run_data_args, task_arguments  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=str(ROOT / "runs" / "demo"), help="trained run directory (teacher/ and student/)")
    ap.add_argument("--examples", type=int, default=320, help="test sentences timed")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--thresholds", default="0.5", help="student entropy thresholds (nats)")
    ap.add_argument("--precisions", default="fp32,bf16,int8")
    ap.add_argument("--isas", default="auto",
                    help="engine instruction sets, side by side (e.g. avx2,auto); auto = the best this CPU runs (costeff.inference.engine_isas)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--settle", type=float, default=0.25,
                    help="untimed pause (s) before each timed block: ONNX Runtime's threads spin for tens of ms after a run and slowed "
                         "whatever ran next by up to 2x (costeff.inference.timing.time_interleaved)")
    ap.add_argument("--no-ort", action="store_true", help="leave out the ONNX Runtime rows")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "anchors.json"))
    return ap.parse_args(argv)


def ort_sessions(teacher, tmp: str, threads: int, hidden: int, heads: int):
    """(fp32 transformer-optimized session, int8 session) of the HF teacher; recipes from
    shared notes: export unoptimized, quantize that, optimize a separate copy."""
    import onnxruntime as ort
    from onnxruntime.transformers import optimizer

    from costeff.inference.classifier_runner import export_classifier_onnx

    plain = os.path.join(tmp, "teacher.onnx")
    if not os.path.exists(plain):
        export_classifier_onnx(teacher, plain, int8=True)  # teacher.onnx and teacher_int8.onnx (the serve baseline's recipe)
        opt = optimizer.optimize_model(plain, model_type="bert", num_heads=heads, hidden_size=hidden)
        opt.save_model_to_file(os.path.join(tmp, "teacher_opt.onnx"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    bound = os.sched_getaffinity(0)  # this thread's OpenMP place; ORT's workers inherit the mask they are made with
    os.sched_setaffinity(0, PROCESS_CPUS)
    try:
        return (ort.InferenceSession(os.path.join(tmp, "teacher_opt.onnx"), so, providers=["CPUExecutionProvider"]),
                ort.InferenceSession(os.path.join(tmp, "teacher_int8.onnx"), so, providers=["CPUExecutionProvider"]))
    finally:
        os.sched_setaffinity(0, bound)


def ort_runner(session):
    def run(b):
        feeds = {"input_ids": b["input_ids"].numpy(), "attention_mask": b["attention_mask"].numpy(),
                 "token_type_ids": b.get("token_type_ids", torch.zeros_like(b["input_ids"])).numpy()}
        return torch.from_numpy(session.run(None, feeds)[0])
    return run


def accuracy(run, loader) -> float:
    correct = total = 0
    for b in loader:
        out = run(b)
        logits = out.logits if hasattr(out, "logits") else out
        correct += int((logits.argmax(-1) == b["labels"]).sum())
        total += len(b["labels"])
    return correct / total


def avg_gflops(run, batches, config):
    flops, n = 0, 0
    for b in batches:
        out = run(b)
        layers = out.exit_layer.tolist() if hasattr(out, "exit_layer") else [config.num_hidden_layers] * len(b["input_ids"])
        for length, layer in zip(b["attention_mask"].sum(1).tolist(), layers):
            flops += flops_per_sample(config, int(length), exit_layer=layer)
            n += 1
    return flops / n / 1e9


def main(argv=None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run)
    cfg_path = run_dir / "run_config.json"
    if not cfg_path.is_file():
        sys.exit(f"bench_anchors: {cfg_path} not found: train a run first (bash scripts/demo.sh) or pass --run DIR")
    run_cfg = json.loads(cfg_path.read_text())
    c = run_cfg["config"]
    task, data_dir, columns = task_arguments(read_run_data_args(str(run_dir)))  # the run's own task (BANKING77, a CSV, ...)
    data = prepare_data(task, run_cfg["backbone"], max_length=c["max_length"], eval_batch_size=64, seed=c["seed"],
                        split_seed=c.get("split_seed", c["seed"]), data_dir=data_dir, **columns)  # runs before split_seed existed split by seed
    thresholds = [float(t) for t in args.thresholds.split(",")]
    precisions = [p for p in args.precisions.split(",") if p]
    thread_counts = [int(t) for t in args.threads.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    teacher = load_teacher(str(run_dir), attn_implementation="sdpa")
    student = load_costeff(str(run_dir), "student")
    teacher_cfg = from_bert(teacher, exit_start=teacher.config.num_hidden_layers).config
    teacher_int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(teacher), {torch.nn.Linear}, dtype=torch.qint8)

    from costeff.data import make_loader
    sub = data.encoded["test"].select(range(min(args.examples, len(data.encoded["test"]))))
    timed = {bs: list(make_loader(sub, data.tokenizer, bs, shuffle=False)) for bs in batch_sizes}
    test_loader = list(data.split("test"))

    systems = {"HF teacher (sdpa)": (lambda b: teacher(**{k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in b}).logits, teacher_cfg),
               "torch int8 teacher": (lambda b: teacher_int8(**{k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in b}).logits, teacher_cfg)}
    tmp = tempfile.mkdtemp(prefix="costeff_anchors_")
    ort_by_threads = {}
    if not args.no_ort:
        for n in thread_counts:
            ort_by_threads[n] = ort_sessions(teacher, tmp, n, teacher.config.hidden_size, teacher.config.num_attention_heads)
        systems["ORT fp32 teacher (optimized)"] = (None, teacher_cfg)
        systems["ORT int8 teacher"] = (None, teacher_cfg)
    isas = [i for i in args.isas.split(",") if i]
    engines = {(p, i): InferenceEngine.from_model(student, p, isa=None if i == "auto" else i) for i in isas for p in precisions}
    for t in thresholds:
        systems[f"costeff early_exit T={t}"] = ((lambda b, t=t: student.early_exit(b["input_ids"], b["attention_mask"], b.get("token_type_ids"), threshold=t)), student.config)
        for (p, i), e in engines.items():
            name = f"costeff engine {p} T={t}" + (f" {e.isa}" if len(isas) > 1 else "")
            systems[name] = ((lambda b, e=e, t=t: e(b["input_ids"], b["attention_mask"], b.get("token_type_ids"), threshold=t)), student.config)

    def runner(name, n_threads):
        if name == "ORT fp32 teacher (optimized)":
            return ort_runner(ort_by_threads[n_threads][0])
        if name == "ORT int8 teacher":
            return ort_runner(ort_by_threads[n_threads][1])
        return systems[name][0]

    rows = {name: {"system": name} for name in systems}
    with torch.inference_mode():
        torch.set_num_threads(max(thread_counts))
        for name in systems:
            run = runner(name, max(thread_counts))
            rows[name]["accuracy"] = accuracy(run, test_loader)
            rows[name]["avg_gflops_timed"] = avg_gflops(run, timed[batch_sizes[0]], systems[name][1])
            print(f"  accuracy {rows[name]['accuracy']:.4f}  {name}", flush=True)
        for n in thread_counts:
            torch.set_num_threads(n)
            measured = [({}, runner(name, n)) for name in systems]
            add_latency(measured, timed, args.rounds, settle_s=args.settle)
            for name, (lat, _) in zip(systems, measured):
                for bs in batch_sizes:
                    ms = lat[f"latency_ms_b{bs}"]
                    rows[name][f"ms_t{n}_b{bs}"] = ms
                    rows[name][f"gflops_per_s_t{n}_b{bs}"] = rows[name]["avg_gflops_timed"] / (ms / 1000)
            print(f"  timed {n} thread(s)", flush=True)
    ref = rows["HF teacher (sdpa)"]
    ort_int8 = rows.get("ORT int8 teacher")
    for r in rows.values():
        for k in [k for k in r if k.startswith("ms_")]:
            r["x_hf_" + k[3:]] = ref[k] / r[k]
            if ort_int8:
                r["x_ort_int8_" + k[3:]] = ort_int8[k] / r[k]
    table = format_table(list(rows.values()), thread_counts, batch_sizes, ort_int8 is not None)
    print(table)
    meta = {"run": str(run_dir), "examples_timed": sum(len(b["input_ids"]) for b in timed[batch_sizes[0]]), "test_examples": sum(len(b["labels"]) for b in test_loader),
            "rounds": args.rounds, "torch": torch.__version__, "processor": cpu_model(), "machine": platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "loadavg_at_end": os.getloadavg(), "engine_isas": sorted({e.isa for e in engines.values()}),
            "timer": "costeff.inference.timing.time_interleaved (systems interleaved round by round, median), inference_mode",
            "settle_s": args.settle, "omp": {k: os.environ.get(k) for k in ("OMP_PROC_BIND", "OMP_PLACES")}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": list(rows.values()), "table": table}, f, indent=1)
    print(f"saved {args.out}")
    return 0


def format_table(rows, thread_counts, batch_sizes, with_ort: bool) -> str:
    head = f"{'system':<44} {'acc':>6}"
    for n in thread_counts:
        for bs in batch_sizes:
            head += f" | t{n} b{bs:<3} {'ms':>7} {'xHF':>6}" + (f" {'xORT8':>6}" if with_ort else "") + f" {'GF/s':>5}"
    lines = [head]
    for r in rows:
        line = f"{r['system']:<44} {100 * r['accuracy']:>6.2f}"
        for n in thread_counts:
            for bs in batch_sizes:
                k = f"t{n}_b{bs}"
                line += f" |        {r['ms_' + k]:>7.3f} {r['x_hf_' + k]:>6.2f}" + (f" {r['x_ort_int8_' + k]:>6.2f}" if with_ort else "") + f" {r['gflops_per_s_' + k]:>5.1f}"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
