"""Residual add + LayerNorm: costeff kernel vs eager F.layer_norm(x + r) vs torch.compile of the same."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

import _harness as hz
from costeff.ops import add_layer_norm, add_layer_norm_reference

BENCH = "add_layer_norm"
EPS = 1e-12


def eager_add_layer_norm(x, residual, weight, bias, eps: float):
    return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)


def make_cases(quick: bool) -> list[hz.Case]:
    gen = torch.Generator().manual_seed(0)
    hiddens = (384,) if quick else (384, 256)
    batches, seqs = ((1, 32), (128,)) if quick else ((1, 32), (64, 128))
    cases = []
    for h, batch, seq in itertools.product(hiddens, batches, seqs):
        args = (
            torch.randn(batch, seq, h, generator=gen),
            torch.randn(batch, seq, h, generator=gen),
            1 + 0.1 * torch.randn(h, generator=gen),
            0.1 * torch.randn(h, generator=gen),
            EPS,
        )
        cases.append(
            hz.Case(
                label=f"h{h} b{batch} s{seq}",
                shape=dict(hidden=h, batch=batch, seq=seq),
                args=args,
                candidates={
                    "costeff": add_layer_norm,
                    "eager": eager_add_layer_norm,
                    "compile": hz.compiled(eager_add_layer_norm),
                },
                reference=add_layer_norm_reference,
            )
        )
    return cases


def main(argv=None):
    return hz.main_for(BENCH, __doc__, make_cases, argv)


if __name__ == "__main__":
    main()
