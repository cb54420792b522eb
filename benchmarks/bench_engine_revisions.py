"""The C++ engine of this checkout against the engine of another git revision: the no-regression check of
an engine change on one machine. The base revision is built once, outside the checkout
(``~/.cache/costeff/revisions/<sha>``, ``git archive`` + ``setup.py build_ext --inplace``); each process
can hold one compiled costeff, so child processes take turns (base, then each ISA of this checkout, and
again), each timing batch 1 and batch 32 per precision on the run's student and test sentences. Medians
over all rounds of all processes; the answers (label, exit layer) of every arm are compared with the base's.

  python benchmarks/bench_engine_revisions.py --run runs/demo --base ee289e8 --isas avx2,auto

(ee289e8: the engine before the per-ISA kernel table, AVX2 only. A revision without ``COSTEFF_ENGINE_ISA``
takes the ISA it was built for; the ISA each arm reports is in the table.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PRECISIONS = ("fp32", "bf16", "int8")
BATCHES = (1, 32)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/demo", help="a pipeline run directory (its student/model is timed)")
    ap.add_argument("--base", required=True, help="git revision to compare with (built once, cached)")
    ap.add_argument("--isas", default="avx2,auto", help="COSTEFF_ENGINE_ISA values for this checkout's engine, side by side")
    ap.add_argument("--processes", type=int, default=6, help="turns per arm (one child process each)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per process (after one warm-up round)")
    ap.add_argument("--examples", type=int, default=320)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settle", type=float, default=0.25, help="seconds of (untimed) pause before each timed block")
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "costeff", "revisions"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "engine_revisions.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: time the costeff on PYTHONPATH (a JSON spec)
    args = ap.parse_args(argv)
    for name in ("processes", "rounds", "examples", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.settle < 0:
        ap.error("--settle must be >= 0")
    return args


def git(*argv: str) -> str:
    return subprocess.run(["git", "-C", ROOT, *argv], check=True, capture_output=True, text=True).stdout.strip()


def build_revision(rev: str, cache: str) -> str:
    """The ``python`` directory of ``rev`` with its extension built in place (cached by commit)."""
    try:
        sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        sys.exit(f"bench_engine_revisions: --base {rev!r} is not a commit of {ROOT}")
    tree = os.path.join(cache, sha)
    if not os.path.exists(os.path.join(tree, ".built")):
        print(f"[revisions] building {sha[:12]} in {tree} (minutes; once)", flush=True)
        os.makedirs(cache, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"{sha[:12]}.", dir=cache)  # renamed to ``tree`` once built
        archive = subprocess.run(["git", "-C", ROOT, "archive", sha], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        log = os.path.join(tmp, "build.log")
        with open(log, "w") as fh:
            rc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp, stdout=fh, stderr=subprocess.STDOUT,
                                env=dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))).returncode
        if rc:
            sys.exit(f"bench_engine_revisions: building {sha[:12]} failed; see {log}")
        open(os.path.join(tmp, ".built"), "w").close()
        if os.path.exists(tree):  # a half-built tree of an interrupted run
            subprocess.run(["rm", "-rf", tree], check=True)
        os.replace(tmp, tree)
    return os.path.join(tree, "python")


def child(spec_path: str) -> None:
    """One arm, one process: the costeff on PYTHONPATH, its engine per precision; prints a JSON line."""
    import torch
    from transformers import AutoTokenizer

    import costeff
    from costeff.inference import InferenceEngine

    spec = json.load(open(spec_path))
    torch.set_num_threads(spec["threads"])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    texts, thr = spec["texts"], spec["threshold"]
    feeds = {1: [tok([t], return_tensors="pt", truncation=True) for t in texts],
             32: [tok(texts[i:i + 32], return_tensors="pt", padding=True, truncation=True) for i in range(0, len(texts), 32)]}
    engines = {p: InferenceEngine.from_pretrained(spec["model"], p) for p in PRECISIONS}
    out = {"costeff": costeff.__file__, "isa": getattr(engines["int8"], "isa", None), "answers": {}, "ms": {}}

    def call(e, b):
        return e(b["input_ids"], b["attention_mask"], b.get("token_type_ids"), threshold=thr)

    with torch.inference_mode():
        for p, e in engines.items():
            answers = []
            for b in feeds[1]:
                o = call(e, b)
                answers.append([int(o.logits.argmax(-1)[0]), int(o.exit_layer[0])])
            out["answers"][p] = answers
        for r in range(spec["rounds"] + 1):  # round 0 warms up
            for p, e in engines.items():
                for bs, batches in feeds.items():
                    time.sleep(spec["settle"])
                    t0 = time.perf_counter()
                    for b in batches:
                        call(e, b)
                    if r:
                        out["ms"].setdefault(f"{p}_b{bs}", []).append(1000 * (time.perf_counter() - t0) / len(texts))
    print("RESULT " + json.dumps(out), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    sys.path[:0] = [os.path.join(ROOT, "python"), HERE]
    from _harness import cpu_model

    from costeff.data import load_task
    from costeff.pipeline.checkpoint import atomic_write_json

    model = os.path.join(args.run, "student", "model")
    if not os.path.isfile(os.path.join(model, "config.json")):
        sys.exit(f"bench_engine_revisions: {model} is not a model directory: train a run first (bash scripts/demo.sh) or pass --run DIR")
    base_python = build_revision(args.base, args.cache)
    dd, *_ = load_task("rotten_tomatoes", seed=0)
    texts = list(dd["test"]["text"][:args.examples])
    spec = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump({"model": os.path.abspath(model), "texts": texts, "threshold": args.threshold, "threads": args.threads,
               "rounds": args.rounds, "settle": args.settle}, spec)
    spec.close()

    env = dict(os.environ, OMP_PROC_BIND=os.environ.get("OMP_PROC_BIND", "true"), OMP_PLACES=os.environ.get("OMP_PLACES", "cores"))
    env.pop("COSTEFF_ENGINE_ISA", None)
    arms = {"base": (base_python, {})}
    for isa in [i for i in args.isas.split(",") if i]:
        arms[f"this {isa}"] = (os.path.join(ROOT, "python"), {} if isa == "auto" else {"COSTEFF_ENGINE_ISA": isa})
    ms = {a: {} for a in arms}
    found = {}
    try:
        for turn in range(args.processes):
            for arm, (path, extra) in arms.items():
                p = subprocess.run([sys.executable, os.path.abspath(__file__), "--base", args.base, "--child", spec.name],
                                   env=dict(env, PYTHONPATH=path, **extra), capture_output=True, text=True)
                line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"bench_engine_revisions: the {arm} process failed:\n{p.stderr[-4000:]}")
                got = json.loads(line[len("RESULT "):])
                found[arm] = got
                for k, v in got["ms"].items():
                    ms[arm].setdefault(k, []).extend(v)
            print(f"[revisions] turn {turn + 1}/{args.processes}", flush=True)
    finally:
        os.unlink(spec.name)

    base_answers = found["base"]["answers"]
    rows = []
    for arm in arms:
        row = {"arm": arm, "isa": found[arm]["isa"] or "(no ISA table)", "costeff": found[arm]["costeff"]}
        for k, v in ms[arm].items():
            row[f"ms_{k}"] = statistics.median(v)
            row[f"x_base_{k}"] = statistics.median(ms["base"][k]) / row[f"ms_{k}"]
        row["answers_differing"] = {p: sum(a != b for a, b in zip(found[arm]["answers"][p], base_answers[p])) for p in PRECISIONS}
        rows.append(row)

    keys = [f"{p}_b{b}" for p in PRECISIONS for b in BATCHES]
    print(f"\nms per sample (median of {args.processes} processes x {args.rounds} rounds), threshold {args.threshold}, "
          f"{args.threads} threads, {cpu_model()}; x base = base ms / arm ms")
    print(f"{'arm':18s} {'isa':14s}" + "".join(f"{k:>16s}" for k in keys) + "  answers != base")
    for r in rows:
        cells = "".join(f"{r[f'ms_{k}']:9.4f} {r[f'x_base_{k}']:5.2f}x" for k in keys)
        print(f"{r['arm']:18s} {r['isa']:14s}{cells}  {sum(r['answers_differing'].values())} of {len(texts) * len(PRECISIONS)}")
    head = git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    meta = {"bench": "engine_revisions", "base": git("rev-parse", f"{args.base}^{{commit}}"), "this": head, "processor": cpu_model(),
            "machine": platform.machine(), "run": args.run, "examples": len(texts), "threshold": args.threshold, "threads": args.threads,
            "processes": args.processes, "rounds": args.rounds, "settle_s": args.settle, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "omp": {k: env.get(k) for k in ("OMP_PROC_BIND", "OMP_PLACES")}, "loadavg_at_end": os.getloadavg()}
    atomic_write_json(args.out, {"meta": meta, "rows": rows, "ms_all": ms})
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
