import math

import pytest
import torch

from costeff.ops import slim_attention, slim_attention_reference
from _tolerance import assert_close_rel_torch, to64


def make_inputs(batch, seq, hidden, heads, head_size, dtype=torch.float32, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    inner = heads * head_size
    x = torch.randn(batch, seq, hidden, generator=g)
    qkv_w = torch.randn(3 * inner, hidden, generator=g) / math.sqrt(hidden)
    qkv_b = torch.randn(3 * inner, generator=g) * 0.1
    out_w = torch.randn(hidden, inner, generator=g) / math.sqrt(max(inner, 1))
    out_b = torch.randn(hidden, generator=g) * 0.1
    mask = torch.ones(batch, seq, dtype=torch.bool)
    if pad:
        lengths = torch.randint(1, seq + 1, (batch,), generator=g)
        mask = torch.arange(seq)[None, :] < lengths[:, None]
    x, qkv_w, qkv_b, out_w, out_b = (t.to(dtype) for t in (x, qkv_w, qkv_b, out_w, out_b))
    return [x, mask, qkv_w, qkv_b, out_w, out_b, heads]


def check(args, factor=4.0, atol=1e-6):
    out = slim_attention(*args)
    ref = slim_attention_reference(*args)
    args64 = [to64(a) for a in args]
    ref64 = slim_attention_reference(*args64)
    assert_close_rel_torch(out, ref, ref64, factor, atol)
    return out


@pytest.mark.parametrize("heads", [0, 1, 5, 7])
@pytest.mark.parametrize("head_size", [24, 40, 64])
@pytest.mark.parametrize("hidden", [131, 384])
def test_matches_reference_fp32(heads, head_size, hidden):
    check(make_inputs(3, 11, hidden, heads, head_size))


@pytest.mark.parametrize("batch,seq", [(1, 1), (1, 17), (33, 9)])
def test_batch_and_sequence_sizes(batch, seq):
    check(make_inputs(batch, seq, 131, 5, 24))


def test_all_padding_row_gets_zero_context():
    x, mask, *rest = make_inputs(3, 6, 40, 2, 24)
    mask[1] = False
    out = check([x, mask, *rest])
    out_b = rest[3]
    torch.testing.assert_close(out[1], out_b.expand(6, 40))  # zero context -> only the output bias


def test_padded_keys_do_not_matter():
    x, mask, *rest = make_inputs(2, 8, 40, 3, 24, pad=False)
    mask[:, 5:] = False
    out = slim_attention(x, mask, *rest)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(2, 3, 40) * 100  # garbage in the padded positions
    out2 = slim_attention(x2, mask, *rest)
    torch.testing.assert_close(out[:, :5], out2[:, :5])


def test_integer_mask_equals_bool_mask():
    args = make_inputs(4, 7, 64, 3, 40)
    out_bool = slim_attention(*args)
    args[1] = args[1].long()
    torch.testing.assert_close(slim_attention(*args), out_bool)


def test_zero_heads_is_out_bias():
    x, mask, qkv_w, qkv_b, out_w, out_b, _ = make_inputs(2, 5, 131, 0, 24)
    torch.testing.assert_close(slim_attention(x, mask, qkv_w, qkv_b, out_w, out_b, 0), out_b.expand(2, 5, 131))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_16bit(dtype):
    check(make_inputs(5, 9, 131, 5, 40, dtype=dtype), atol=2e-2)


def test_non_contiguous_inputs():
    x, mask, qkv_w, qkv_b, out_w, out_b, heads = make_inputs(4, 10, 131, 5, 24)
    x_nc = x.transpose(0, 1).contiguous().transpose(0, 1)
    mask_nc = mask.t().contiguous().t()
    assert not x_nc.is_contiguous() and not mask_nc.is_contiguous()
    check([x_nc, mask_nc, qkv_w.t().contiguous().t(), qkv_b, out_w.t().contiguous().t(), out_b, heads])


def test_opcheck():
    x, mask, *w, heads = make_inputs(2, 5, 16, 2, 8)
    x.requires_grad_(True)
    for t in w:
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.costeff.slim_attention.default, (x, mask, *w, heads))


@pytest.mark.parametrize("heads", [0, 2])
def test_gradcheck(heads):
    x, mask, *w, _ = make_inputs(2, 4, 6, heads, 3)
    args = [x.double().requires_grad_(True)] + [t.double().requires_grad_(True) for t in w]

    def fn(x, qkv_w, qkv_b, out_w, out_b):
        return slim_attention(x, mask, qkv_w, qkv_b, out_w, out_b, heads)

    assert torch.autograd.gradcheck(fn, args)
