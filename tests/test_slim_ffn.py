import math

import pytest
import torch

from costeff.ops import slim_ffn, slim_ffn_reference
from _tolerance import assert_close_rel_torch, to64


def make_inputs(lead, hidden, inter, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, hidden, generator=g)
    w1 = torch.randn(inter, hidden, generator=g) / math.sqrt(hidden)
    b1 = torch.randn(inter, generator=g) * 0.1
    w2 = torch.randn(hidden, inter, generator=g) / math.sqrt(max(inter, 1))
    b2 = torch.randn(hidden, generator=g) * 0.1
    return [t.to(dtype) for t in (x, w1, b1, w2, b2)]


def check(args, factor=4.0, atol=1e-6):
    out = slim_ffn(*args)
    ref = slim_ffn_reference(*args)
    ref64 = slim_ffn_reference(*(to64(t) for t in args))
    assert_close_rel_torch(out, ref, ref64, factor, atol)
    return out


@pytest.mark.parametrize("inter", [0, 1, 37, 1731])
@pytest.mark.parametrize("hidden", [131, 384])
@pytest.mark.parametrize("lead", [(1, 1), (33, 7)])
def test_matches_reference_fp32(inter, hidden, lead):
    check(make_inputs(lead, hidden, inter))


def test_zero_intermediate_is_out_bias():
    x, w1, b1, w2, b2 = make_inputs((4, 3), 131, 0)
    torch.testing.assert_close(slim_ffn(x, w1, b1, w2, b2), b2.expand(4, 3, 131))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_16bit(dtype):
    check(make_inputs((33, 5), 131, 173, dtype=dtype), atol=1e-2)


def test_non_contiguous_inputs():
    x, w1, b1, w2, b2 = make_inputs((6, 9), 131, 77)
    x_nc = x.transpose(0, 1)
    assert not x_nc.is_contiguous()
    check([x_nc, w1.t().contiguous().t(), b1, w2.t().contiguous().t(), b2])


def test_opcheck():
    args = [t.requires_grad_(True) for t in make_inputs((2, 3), 16, 11)]
    torch.library.opcheck(torch.ops.costeff.slim_ffn.default, tuple(args))


@pytest.mark.parametrize("inter", [0, 5])
def test_gradcheck(inter):
    args = [t.double().requires_grad_(True) for t in make_inputs((2, 3), 6, inter)]
    assert torch.autograd.gradcheck(slim_ffn, args)
