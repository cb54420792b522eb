"""Slim attention: costeff kernel vs the eager composition a user would write (fused QKV linear,
view/permute, F.scaled_dot_product_attention with the padding mask, output linear) vs torch.compile."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

import _harness as hz
from costeff.ops import slim_attention, slim_attention_reference

BENCH = "slim_attention"


def eager_attention(hidden, mask, qkv_weight, qkv_bias, out_weight, out_bias, num_heads: int):
    b, s, _ = hidden.shape
    d = qkv_weight.shape[0] // (3 * num_heads)
    qkv = F.linear(hidden, qkv_weight, qkv_bias)
    q, k, v = qkv.view(b, s, 3, num_heads, d).permute(2, 0, 3, 1, 4)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    return F.linear(ctx.transpose(1, 2).reshape(b, s, num_heads * d), out_weight, out_bias)


def padding_mask(batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """Row 0 is full length; the others keep a random length in [seq/4, seq] (BERT-style right padding)."""
    lengths = torch.randint(max(1, seq // 4), seq + 1, (batch,), generator=gen)
    lengths[0] = seq
    return torch.arange(seq)[None, :] < lengths[:, None]


def make_cases(quick: bool) -> list[hz.Case]:
    gen = torch.Generator().manual_seed(0)
    configs = ["minilm", "slim384"] if quick else list(hz.LAYER_CONFIGS)
    batches, seqs = ((1, 32), (128,)) if quick else ((1, 32), (64, 128))
    cases = []
    for name, batch, seq in itertools.product(configs, batches, seqs):
        cfg = hz.LAYER_CONFIGS[name]
        h, nh, d = cfg["hidden"], cfg["heads"], cfg["head_size"]
        inner = nh * d
        args = (
            torch.randn(batch, seq, h, generator=gen),
            padding_mask(batch, seq, gen),
            torch.randn(3 * inner, h, generator=gen) / h**0.5,
            torch.randn(3 * inner, generator=gen) * 0.1,
            torch.randn(h, inner, generator=gen) / inner**0.5,
            torch.randn(h, generator=gen) * 0.1,
            nh,
        )
        cases.append(
            hz.Case(
                label=f"{name} h{h} {nh}x{d} b{batch} s{seq}",
                shape=dict(config=name, hidden=h, heads=nh, head_size=d, batch=batch, seq=seq),
                args=args,
                candidates={
                    "costeff": slim_attention,
                    "eager": eager_attention,
                    "compile": hz.compiled(eager_attention),
                },
                reference=slim_attention_reference,
            )
        )
    return cases


def main(argv=None):
    return hz.main_for(BENCH, __doc__, make_cases, argv)


if __name__ == "__main__":
    main()
