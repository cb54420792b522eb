import pytest
import torch

from costeff.ops import add_layer_norm, add_layer_norm_reference
from _tolerance import assert_close_rel_torch, to64


def make_inputs(shape, dtype=torch.float32, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    h = shape[-1]
    x = torch.randn(*shape, generator=g) + offset
    r = torch.randn(*shape, generator=g)
    w = 1 + 0.1 * torch.randn(h, generator=g)
    b = 0.1 * torch.randn(h, generator=g)
    return [t.to(dtype) for t in (x, r, w, b)]


def check(x, r, w, b, eps=1e-12, factor=4.0, atol=1e-6):
    out = add_layer_norm(x, r, w, b, eps)
    ref = add_layer_norm_reference(x, r, w, b, eps)
    ref64 = add_layer_norm_reference(to64(x), to64(r), to64(w), to64(b), eps)
    assert_close_rel_torch(out, ref, ref64, factor, atol)


@pytest.mark.parametrize("hidden", [1, 7, 131, 200, 384])
@pytest.mark.parametrize("lead", [(1,), (33, 5), (2, 3, 4)])
def test_matches_reference_fp32(hidden, lead):
    check(*make_inputs((*lead, hidden)), eps=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_16bit(dtype):
    check(*make_inputs((33, 9, 131), dtype=dtype), eps=1e-5, atol=1e-2)


def test_large_mean_is_stable():
    # x + r has mean ~1e4 and unit spread: naive E[x^2] - E[x]^2 would lose all precision in fp32
    check(*make_inputs((16, 384), offset=1e4), eps=1e-12, factor=4.0, atol=1e-4)


def test_non_contiguous_inputs():
    _, _, w, b = make_inputs((8, 6, 131))
    x_t, r_t = torch.randn(8, 131, 6).transpose(1, 2), torch.randn(8, 131, 6).transpose(1, 2)  # strided
    assert not x_t.is_contiguous()
    w_nc = torch.stack([w, w], 1)[:, 0]
    assert not w_nc.is_contiguous()
    check(x_t, r_t, w_nc, b)


def test_empty_rows():
    x, r, w, b = make_inputs((0, 5, 16))
    assert add_layer_norm(x, r, w, b).shape == (0, 5, 16)


def test_opcheck():
    x, r, w, b = (t.requires_grad_(True) for t in make_inputs((3, 4, 24)))
    torch.library.opcheck(torch.ops.costeff.add_layer_norm.default, (x, r, w, b, 1e-5))


def test_gradcheck():
    args = [t.double().requires_grad_(True) for t in make_inputs((2, 3, 7))]
    assert torch.autograd.gradcheck(lambda x, r, w, b: add_layer_norm(x, r, w, b, 1e-5), args)


def test_backward_fp32_matches_reference():
    args = [t.requires_grad_(True) for t in make_inputs((5, 131))]
    grad = torch.randn(5, 131)
    add_layer_norm(*args, 1e-5).backward(grad)
    mine = [t.grad.clone() for t in args]
    for t in args:
        t.grad = None
    add_layer_norm_reference(*args, 1e-5).backward(grad)
    for a, t in zip(mine, args):
        torch.testing.assert_close(a, t.grad, atol=1e-5, rtol=1e-4)
