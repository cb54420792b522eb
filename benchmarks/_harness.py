"""Shared microbenchmark harness for benchmarks/bench_<op>.py.

Each bench gives a list of cases; a case has a label, a shape dict and named candidates (costeff
kernel, eager composition, torch.compile of the same composition) plus the reference. Every
candidate's output is checked against the reference before it is timed, so a fast wrong kernel
cannot win. Timing: costeff.inference.timing.time_interleaved, fixed rounds of short blocks with the
candidates interleaved, median, 2 threads, under
torch.inference_mode() (the early-exit inference setting; it also skips the Python autograd shim the
custom ops register, which eager ATen ops do not pay either).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (os.path.join(ROOT, "python"), ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

import costeff  # noqa: E402
from costeff.inference import timing  # noqa: E402  (after the path setup above)

NUM_THREADS = 2
CANDIDATES = ("costeff", "eager", "compile")

# Layer shapes: MiniLM-L6, the COST-EFF slenderized MiniLM, and the example.
LAYER_CONFIGS = {
    "minilm": dict(hidden=384, heads=12, head_size=32, ffn=1536),
    "slim384": dict(hidden=384, heads=2, head_size=32, ffn=256),
    "slim256": dict(hidden=256, heads=4, head_size=64, ffn=512),
}


@dataclass
class Case:
    label: str
    shape: dict
    args: tuple
    candidates: dict  # name -> callable(*args)
    reference: Callable
    atol: float = 1e-4
    rtol: float = 1e-4
    compare: Callable | None = None  # (out, ref) -> None, raises on mismatch
    results: dict = field(default_factory=dict)


def parse_args(description: str, argv=None):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing")
    ap.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/<bench>.json)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidate")
    ap.add_argument("--threads", type=int, default=NUM_THREADS, help=f"intra-op threads (default {NUM_THREADS})")
    return ap.parse_args(argv)


def setup(threads: int = NUM_THREADS) -> None:
    global NUM_THREADS
    NUM_THREADS = threads
    torch.manual_seed(0)
    torch.set_num_threads(threads)


def compiled(fn: Callable) -> Callable:
    """torch.compile of the eager composition, specialized to the shape of its case (run_cases resets
    dynamo before each case, so the recompile limit is never hit)."""
    return torch.compile(fn, dynamic=False)


def _assert_close(name: str, case: Case, out, ref) -> None:
    if case.compare is not None:
        case.compare(out, ref)
        return
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    assert len(outs) == len(refs), f"{case.label} {name}: {len(outs)} outputs, reference has {len(refs)}"
    for i, (o, r) in enumerate(zip(outs, refs)):
        try:
            torch.testing.assert_close(o, r, atol=case.atol, rtol=case.rtol, check_dtype=False)
        except AssertionError as exc:
            raise AssertionError(f"{case.label}: candidate '{name}' output {i} differs from the reference\n{exc}")


def _block_size(fn: Callable, args: tuple, target_s: float) -> int:
    """Calls per timing block so that one block lasts about target_s."""
    t0 = time.perf_counter()
    for _ in range(3):
        fn(*args)
    per_call = (time.perf_counter() - t0) / 3
    return max(1, int(target_s / max(per_call, 1e-7)))


def time_interleaved(fns: dict, args: tuple, rounds: int, block_s: float, budget_s: float) -> dict:
    """Median (and min / quartiles) of per-call time in us over `rounds` short blocks per candidate,
    by costeff.inference.timing.time_interleaved (the one timing method of every number)."""
    numbers = {name: _block_size(fn, args, block_s) for name, fn in fns.items()}

    def block(fn, n):
        def run():
            for _ in range(n):
                fn(*args)
            return n
        return run

    blocks = {name: block(fn, numbers[name]) for name, fn in fns.items()}
    t0 = time.perf_counter()
    for b in blocks.values():
        b()
    round_s = max(time.perf_counter() - t0, 1e-9)
    # Big shapes get fewer rounds (at least 7) so that a full run stays within a few minutes.
    rounds = max(7, min(rounds, int(budget_s / round_s)))
    stats = timing.time_interleaved(blocks, rounds, warmup=0)
    return {
        name: {"median": v["median"] * 1e6, "q25": v["q25"] * 1e6, "q75": v["q75"] * 1e6, "min": v["min"] * 1e6,
               "calls_per_block": numbers[name], "blocks": v["rounds"]}
        for name, v in stats.items()
    }


def run_cases(bench: str, cases: list[Case], quick: bool, out_path: str | None, no_compile: bool = False) -> list[dict]:
    rounds, block_s, budget_s = (11, 0.0005, 0.3) if quick else (31, 0.0005, 1.5)
    rows = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for case in cases:
            torch._dynamo.reset()
            ref = case.reference(*case.args)
            fns = {}
            for name, fn in case.candidates.items():
                if name == "compile" and no_compile:
                    continue
                out = fn(*case.args)  # also the warm-up / compile call
                _assert_close(name, case, out, ref)
                for _ in range(3):
                    fn(*case.args)
                fns[name] = fn
            stats = time_interleaved(fns, case.args, rounds, block_s, budget_s)
            case.results = {k: v["median"] for k, v in stats.items()}
            row = {"bench": bench, "label": case.label, **case.shape}
            row.update({f"{k}_us": v for k, v in case.results.items()})
            row.update({f"{k}_min_us": v["min"] for k, v in stats.items()})
            row.update({f"{k}_iqr_us": [v["q25"], v["q75"]] for k, v in stats.items()})
            row["blocks"] = {k: v["blocks"] for k, v in stats.items()}
            c = case.results.get("costeff")
            for other in ("eager", "compile"):
                if c and other in case.results:
                    row[f"speedup_vs_{other}"] = case.results[other] / c
            rows.append(row)
            print(format_row(row), flush=True)
    elapsed = time.perf_counter() - t0
    print(f"[{bench}] {len(rows)} shapes in {elapsed:.1f} s")
    save(bench, rows, out_path, quick)
    return rows


def format_header() -> str:
    return (
        f"{'shape':<40} {'costeff us':>11} {'eager us':>10} {'compile us':>11} {'x eager':>8} {'x compile':>10}"
    )


def format_row(row: dict) -> str:
    def f(k, w, p=1):
        v = row.get(k)
        return f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"

    return (
        f"{row['label']:<40} {f('costeff_us', 11)} {f('eager_us', 10)} {f('compile_us', 11)} "
        f"{f('speedup_vs_eager', 8, 2)} {f('speedup_vs_compile', 10, 2)}"
    )


def save(bench: str, rows: list[dict], out_path: str | None, quick: bool) -> str:
    path = out_path or os.path.join(HERE, "results", f"{bench}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {
        "bench": bench,
        "quick": quick,
        "torch": torch.__version__,
        "threads": NUM_THREADS,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": cpu_model(),
        "engine_isa": costeff.info().get("engine_isa"),
        "timer": "costeff.inference.timing.time_interleaved: candidates interleaved block by block, median over blocks, inference_mode",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        # the machine is shared: a high load average means 2-thread timings include waits for a core
        "loadavg_at_end": os.getloadavg(),
    }
    with open(path, "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    return path


def cpu_model() -> str:
    """The CPU's model name, with its family/model numbers (a VM may report only "AMD EPYC") and the
    engine ISAs it runs, so a number is labelled with the machine that gave it."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor()
    name = fields.get("model name", platform.processor())
    isas = costeff.info().get("engine_isas") or []
    return f"{name} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}; engine ISAs: {', '.join(isas) or 'n/a'})"


def main_for(bench: str, description: str, make_cases: Callable[[bool], list[Case]], argv=None) -> list[dict]:
    args = parse_args(description, argv)
    setup(args.threads)
    print(f"== {bench} (torch {torch.__version__}, {NUM_THREADS} threads{', quick' if args.quick else ''})")
    print(format_header())
    return run_cases(bench, make_cases(args.quick), args.quick, args.out, args.no_compile)
