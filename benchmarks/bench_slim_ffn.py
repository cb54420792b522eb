"""Slim FFN: costeff kernel vs eager (linear, exact GELU, linear) vs torch.compile of the same."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

import _harness as hz
from costeff.ops import slim_ffn, slim_ffn_reference

BENCH = "slim_ffn"


def eager_ffn(hidden, in_weight, in_bias, out_weight, out_bias):
    return F.linear(F.gelu(F.linear(hidden, in_weight, in_bias)), out_weight, out_bias)


def make_cases(quick: bool) -> list[hz.Case]:
    gen = torch.Generator().manual_seed(0)
    configs = ["minilm", "slim384"] if quick else list(hz.LAYER_CONFIGS)
    batches, seqs = ((1, 32), (128,)) if quick else ((1, 32), (64, 128))
    cases = []
    for name, batch, seq in itertools.product(configs, batches, seqs):
        cfg = hz.LAYER_CONFIGS[name]
        h, f = cfg["hidden"], cfg["ffn"]
        args = (
            torch.randn(batch, seq, h, generator=gen),
            torch.randn(f, h, generator=gen) / h**0.5,
            torch.randn(f, generator=gen) * 0.1,
            torch.randn(h, f, generator=gen) / f**0.5,
            torch.randn(h, generator=gen) * 0.1,
        )
        cases.append(
            hz.Case(
                label=f"{name} h{h} ffn{f} b{batch} s{seq}",
                shape=dict(config=name, hidden=h, ffn=f, batch=batch, seq=seq),
                args=args,
                candidates={"costeff": slim_ffn, "eager": eager_ffn, "compile": hz.compiled(eager_ffn)},
                reference=slim_ffn_reference,
            )
        )
    return cases


def main(argv=None):
    return hz.main_for(BENCH, __doc__, make_cases, argv)


if __name__ == "__main__":
    main()
