import math

import pytest
import torch

from costeff.ops import exit_head, exit_head_reference
from _tolerance import assert_close_rel_torch, to64


def make_inputs(batch, hidden, classes, pooler, dtype=torch.float32, seed=0, weight_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, hidden, generator=g)
    w = torch.randn(classes, hidden, generator=g) * weight_scale / math.sqrt(hidden)
    b = torch.randn(classes, generator=g) * 0.1
    pw = torch.randn(hidden, hidden, generator=g) / math.sqrt(hidden) if pooler else None
    pb = torch.randn(hidden, generator=g) * 0.1 if pooler else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(h), cast(w), cast(b), cast(pw), cast(pb)


def check_against_reference(h, w, b, pw, pb, threshold, factor=4.0, atol=1e-6, activation="tanh"):
    out = exit_head(h, w, b, threshold, pw, pb, activation)
    ref = exit_head_reference(h, w, b, threshold, pw, pb, activation)
    ref64 = exit_head_reference(to64(h), to64(w), to64(b), threshold, to64(pw), to64(pb), activation)
    assert_close_rel_torch(out.logits, ref.logits, ref64.logits, factor, atol, "logits")
    assert out.entropy.dtype == torch.float32
    assert_close_rel_torch(out.entropy, ref.entropy.float(), ref64.entropy, factor, atol, "entropy")
    # exit decisions must agree wherever the entropy is not within rounding of the threshold
    clear = (ref64.entropy - threshold).abs() > 1e-3
    assert torch.equal(out.exit_mask[clear], ref64.exit_mask[clear])
    return out


@pytest.mark.parametrize("batch", [1, 33])
@pytest.mark.parametrize("hidden", [131, 384])
@pytest.mark.parametrize("classes", [1, 2, 3, 1000])
@pytest.mark.parametrize("pooler", [False, True])
def test_matches_reference_fp32(batch, hidden, classes, pooler):
    h, w, b, pw, pb = make_inputs(batch, hidden, classes, pooler, weight_scale=3.0)
    out = check_against_reference(h, w, b, pw, pb, threshold=0.3)
    assert out.logits.shape == (batch, classes) and out.exit_mask.dtype == torch.bool


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pooler", [False, True])
def test_matches_reference_16bit(dtype, pooler):
    h, w, b, pw, pb = make_inputs(33, 131, 3, pooler, dtype=dtype, weight_scale=3.0)
    out = check_against_reference(h, w, b, pw, pb, threshold=0.5, factor=4.0, atol=1e-2)
    assert out.logits.dtype == dtype


def test_non_contiguous_inputs():
    h, w, b, pw, pb = make_inputs(12, 131, 3, True)
    h_nc = torch.randn(12, 2 * 131)[:, ::2]  # strided rows
    h_nc.copy_(h)
    w_nc = w.t().contiguous().t()  # column-major weight
    pw_nc = pw.t().contiguous().t()
    assert not h_nc.is_contiguous() and not w_nc.is_contiguous()
    check_against_reference(h_nc, w_nc, b, pw_nc, pb, threshold=0.4)


def test_entropy_is_stable_for_huge_logits():
    h, w, b, _, _ = make_inputs(8, 64, 5, False, weight_scale=1e4)
    out = exit_head(h, w, b, 0.1)
    assert torch.isfinite(out.entropy).all()
    ref64 = exit_head_reference(to64(h), to64(w), to64(b), 0.1)
    torch.testing.assert_close(out.entropy.double(), ref64.entropy, atol=1e-4, rtol=0)


def test_uniform_logits_give_log_c_and_threshold_semantics():
    c = 7
    h = torch.zeros(3, 16)
    w = torch.randn(c, 16)
    b = torch.zeros(c)
    out = exit_head(h, w, b, threshold=0.0)  # tanh(0) = 0: every class has logit 0
    torch.testing.assert_close(out.entropy, torch.full((3,), math.log(c)))
    assert not out.exit_mask.any()  # threshold 0 never exits
    assert exit_head(h, w, b, threshold=math.inf).exit_mask.all()
    assert exit_head(h, w, b, threshold=math.log(c) + 1e-3).exit_mask.all()
    assert not exit_head(h, w, b, threshold=math.log(c) - 1e-3).exit_mask.any()


def test_empty_batch():
    h, w, b, _, _ = make_inputs(1, 16, 2, False)
    out = exit_head(h[:0], w, b, 0.5)
    assert out.logits.shape == (0, 2) and out.entropy.shape == (0,) and out.exit_mask.shape == (0,)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_logits_raise(bad):
    h, w, b, _, _ = make_inputs(4, 16, 2, False)
    w[1, 3] = float(bad)
    with pytest.raises(ValueError, match="non-finite logits"):
        exit_head(h, w, b, 0.5)
    h2, w2, b2, _, _ = make_inputs(4, 16, 2, False)
    b2[0] = float(bad)
    with pytest.raises(ValueError, match="row 0"):
        exit_head(h2, w2, b2, 0.5)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("batch,hidden,classes", [(1, 131, 2), (33, 384, 3), (17, 64, 1000)])
@pytest.mark.parametrize("pooler", [False, True])
def test_activations_match_reference(activation, batch, hidden, classes, pooler):
    h, w, b, pw, pb = make_inputs(batch, hidden, classes, pooler, weight_scale=3.0)
    out = check_against_reference(h, w, b, pw, pb, threshold=0.3, activation=activation)
    tanh_out = exit_head(h, w, b, 0.3, pw, pb)
    assert not torch.allclose(out.logits, tanh_out.logits)  # the argument reaches the kernel
    # the activation is applied after the pooler: ReLU of the pooled state gives the same logits as a
    # classifier on torch.relu(dense(h))
    pre = h if pw is None else torch.nn.functional.linear(h, pw, pb)
    act = torch.relu(pre) if activation == "relu" else torch.nn.functional.gelu(pre)
    torch.testing.assert_close(out.logits, torch.nn.functional.linear(act, w, b), atol=1e-4, rtol=1e-4)


def test_unknown_activation_is_rejected():
    h, w, b, _, _ = make_inputs(2, 8, 2, False)
    for fn in (exit_head, exit_head_reference):
        with pytest.raises(ValueError, match="activation"):
            fn(h, w, b, 0.5, None, None, "sigmoid")


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu"])
@pytest.mark.parametrize("pooler", [False, True])
def test_opcheck(pooler, activation):
    h, w, b, pw, pb = make_inputs(5, 24, 3, pooler)
    for t in (h, w, b, pw, pb):
        if t is not None:
            t.requires_grad_(True)
    torch.library.opcheck(torch.ops.costeff.exit_head.default, (h, pw, pb, w, b, 0.5, activation))


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu"])
@pytest.mark.parametrize("pooler", [False, True])
def test_gradcheck_logits_and_entropy(pooler, activation):
    h, w, b, pw, pb = (None if t is None else t.double().requires_grad_(True) for t in make_inputs(3, 6, 4, pooler))

    def fn(h, w, b, *pooler_args):
        pw, pb = pooler_args if pooler_args else (None, None)
        out = exit_head(h, w, b, 0.5, pw, pb, activation)
        return out.logits, out.entropy

    args = (h, w, b) + ((pw, pb) if pooler else ())
    assert torch.autograd.gradcheck(fn, args)


def test_backward_matches_reference_autograd_fp32():
    h, w, b, pw, pb = (t.requires_grad_(True) for t in make_inputs(9, 40, 3, True))
    out = exit_head(h, w, b, 0.5, pw, pb)
    (out.logits.square().sum() + 2 * out.entropy.sum()).backward()
    grads = [t.grad.clone() for t in (h, w, b, pw, pb)]
    for t in (h, w, b, pw, pb):
        t.grad = None
    ref = exit_head_reference(h, w, b, 0.5, pw, pb)
    (ref.logits.square().sum() + 2 * ref.entropy.sum()).backward()
    for g, t in zip(grads, (h, w, b, pw, pb)):
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-4)
