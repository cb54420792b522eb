"""A short tour of the costeff ops at all-MiniLM-L6-v2 shapes: each fused CPU kernel against its
plain-PyTorch reference (max error, median latency, speed-up). `python -m costeff.demo --help`."""
from __future__ import annotations

import argparse
import json
import math

import torch
from torch.utils import benchmark

import costeff
from costeff import ops


def _median_us(fn, min_run_time: float) -> float:
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e6


def _minilm_layer_inputs(batch: int, seq: int, hidden: int, heads: int, head_size: int, ffn: int):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    inner = heads * head_size
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    mask = torch.arange(seq)[None] < lengths[:, None]
    return {
        "exit_head": (r(batch, hidden), r(2, hidden) / math.sqrt(hidden), r(2), 0.3),
        "slim_attention": (r(batch, seq, hidden), mask, r(3 * inner, hidden) / math.sqrt(hidden), r(3 * inner),
                           r(hidden, inner) / math.sqrt(inner), r(hidden), heads),
        "slim_ffn": (r(batch, seq, hidden), r(ffn, hidden) / math.sqrt(hidden), r(ffn), r(hidden, ffn) / math.sqrt(ffn), r(hidden)),
        "add_layer_norm": (r(batch, seq, hidden), r(batch, seq, hidden), 1 + 0.1 * r(hidden), 0.1 * r(hidden), 1e-12),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-run-time", type=float, default=0.3, help="seconds of timing per candidate")
    p.add_argument("--json", help="also write the table to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("costeff", json.dumps(costeff.info()))
    shapes = [("MiniLM-L6 (12 heads x 32, FFN 1536)", 384, 12, 32, 1536), ("slenderized (2 heads x 32, FFN 256)", 384, 2, 32, 256)]
    rows = []
    for label, hidden, heads, head_size, ffn in shapes:
        inputs = _minilm_layer_inputs(args.batch, args.seq, hidden, heads, head_size, ffn)
        for name, a in inputs.items():
            kernel, reference = getattr(ops, name), getattr(ops, f"{name}_reference")
            out, ref = kernel(*a), reference(*a)
            out, ref = (out[0], ref[0]) if isinstance(out, tuple) else (out, ref)
            err = (out - ref).abs().max().item()
            t_k = _median_us(lambda: kernel(*a), args.min_run_time)
            t_r = _median_us(lambda: reference(*a), args.min_run_time)
            rows.append({"shape": label, "op": name, "max_abs_err": err, "kernel_us": t_k, "reference_us": t_r, "speedup": t_r / t_k})
    print(f"\nbatch {args.batch}, seq {args.seq}, {args.threads} threads")
    print(f"{'shape':38s} {'op':16s} {'max err':>9s} {'kernel us':>10s} {'ref us':>10s} {'speed-up':>8s}")
    for r in rows:
        print(f"{r['shape']:38s} {r['op']:16s} {r['max_abs_err']:9.2e} {r['kernel_us']:10.1f} {r['reference_us']:10.1f} {r['speedup']:7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
