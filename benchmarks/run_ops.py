"""Runs the four op microbenchmarks (exit_head, slim_attention, slim_ffn, add_layer_norm).

    PYTHONPATH=python:. python benchmarks/run_ops.py [--quick] [--out DIR] [--no-compile]

--out is a directory here; each bench writes <DIR>/<bench>.json (default benchmarks/results/)."""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_add_layer_norm  # noqa: E402
import bench_exit_head  # noqa: E402
import bench_slim_attention  # noqa: E402
import bench_slim_ffn  # noqa: E402

BENCHES = (bench_exit_head, bench_slim_attention, bench_slim_ffn, bench_add_layer_norm)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="directory for the JSON files")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="bench names to run (default all)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    for mod in BENCHES:
        if args.only and mod.BENCH not in args.only:
            continue
        sub = ["--quick"] if args.quick else []
        sub += ["--threads", str(args.threads)]
        if args.no_compile:
            sub.append("--no-compile")
        if args.out:
            sub += ["--out", os.path.join(args.out, f"{mod.BENCH}.json")]
        mod.main(sub)
        print()
    print(f"all benches: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
