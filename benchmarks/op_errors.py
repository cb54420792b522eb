"""Each op's error against a float64 reference, per dtype and device, beside PyTorch's own error in
that dtype (the plain-PyTorch ``<op>_reference`` run in the same dtype): the table that
tests/test_gpu_ops.py asserts on (kernel error <= 4x torch's own + a floor), printed with its numbers.

  python benchmarks/op_errors.py [--devices cpu,cuda] [--out results/op_errors.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (os.path.join(ROOT, "python"), ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

from tests._tolerance import max_err, to64  # noqa: E402
from tests.test_gpu_ops import OPS, _args, _first  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import costeff.ops as ops
    from costeff.ops._registry import TRITON_CUDA_OPS

    def kernel_of(name, device):
        if device == "cpu":
            return "C++ CPU"
        return "Triton" if name in TRITON_CUDA_OPS else "CUDA C++"

    torch.backends.cuda.matmul.allow_tf32 = False
    devices = list(dict.fromkeys(d for d in args.devices.split(",") if d == "cpu" or torch.cuda.is_available()))
    rows = []
    print(f"{'op':<16} {'dtype':<9} {'device':<6} {'kernel':<9} {'kernel err':>11} {'torch err':>11} {'ratio':>7}")
    for name in OPS:
        op, ref = getattr(ops, name), getattr(ops, f"{name}_reference")
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for device in devices:
                a = _args(name, dtype, device)
                exact = _first(ref(*[to64(x) for x in a]))
                got, same = _first(op(*a)), _first(ref(*a))
                k = max(max_err(g, e) for g, e in zip(got, exact))
                t = max(max_err(s, e) for s, e in zip(same, exact))
                rows.append({"op": name, "dtype": str(dtype).removeprefix("torch."), "device": device, "kernel": kernel_of(name, device), "kernel_err": k, "torch_err": t})
                ratio = k / t if t > 0 else float("nan")
                print(f"{name:<16} {rows[-1]['dtype']:<9} {device:<6} {rows[-1]['kernel']:<9} {k:>11.3g} {t:>11.3g} {ratio:>7.2f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=2)
        os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
