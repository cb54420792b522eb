"""Triton launchers (costeff_kernels.<op>.<op>_triton) against the plain-PyTorch references.

Without a GPU everything runs through the Triton interpreter on CPU (TRITON_INTERPRET=1, set before
the kernel modules are imported). Shapes are small but exercise every masked/tiled edge: odd hidden
sizes, head sizes 24/40 (padded to 32/64), several key/query blocks, padding and all-padding rows,
0/1 heads, FFN 0/1/37, 1..1000 classes.
"""
from __future__ import annotations

import importlib
import inspect
import math
import os
from typing import Optional

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from costeff import _extension  # noqa: E402
from costeff.ops import (  # noqa: E402
    add_layer_norm_reference,
    exit_head_reference,
    slim_attention_reference,
    slim_ffn_reference,
)

aln_kernels = importlib.import_module("costeff_kernels.add_layer_norm")
eh_kernels = importlib.import_module("costeff_kernels.exit_head")
attn_kernels = importlib.import_module("costeff_kernels.slim_attention")
ffn_kernels = importlib.import_module("costeff_kernels.slim_ffn")
# The op modules (costeff.ops.<op> the attribute is the wrapper function, so go through importlib).
aln_ops = importlib.import_module("costeff.ops.add_layer_norm")
eh_ops = importlib.import_module("costeff.ops.exit_head")
attn_ops = importlib.import_module("costeff.ops.slim_attention")
ffn_ops = importlib.import_module("costeff.ops.slim_ffn")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    # 16-bit outputs (and the 16-bit intermediates of the GEMM chains) round at 2^-8 relative.
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


def rand(*shape, dtype=torch.float32, scale=1.0, gen=None):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous storage (column-major matrices, strided vectors/batches)."""
    if t.dim() == 1:
        return torch.stack([t, torch.zeros_like(t)], -1)[:, 0]
    if t.dim() == 2:
        return t.t().contiguous().t()
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def assert_close(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.device == ref.device
    torch.testing.assert_close(out.double(), ref.double(), **TOL[ref.dtype])


def assert_same_error(fn_a, fn_b):
    """Both calls raise the same exception type with the same message."""
    with pytest.raises((TypeError, ValueError)) as ref_err:
        fn_b()
    with pytest.raises(type(ref_err.value)) as err:
        fn_a()
    assert str(err.value) == str(ref_err.value)
    return str(err.value)


# --------------------------------------------------------------------------------------------------
# exit_head
# --------------------------------------------------------------------------------------------------


def exit_head_inputs(b, h, c, dtype, pooler, gen):
    hidden = rand(b, h, dtype=dtype, gen=gen)
    pw = rand(h, h, dtype=dtype, scale=h**-0.5, gen=gen) if pooler else None
    pb = rand(h, dtype=dtype, scale=0.1, gen=gen) if pooler else None
    # Scale so that entropies spread over (0, log C): some rows exit, some do not.
    cw = rand(c, h, dtype=dtype, scale=3.0 * h**-0.5, gen=gen)
    cb = rand(c, dtype=dtype, scale=0.5, gen=gen)
    return hidden, pw, pb, cw, cb


def check_exit_head(args, threshold=None, activation="tanh"):
    hidden, pw, pb, cw, cb = args
    ref0 = exit_head_reference(hidden, cw, cb, 0.0, pw, pb, activation)
    if threshold is None:  # the median entropy splits the batch
        threshold = float(ref0.entropy.median())
    ref = exit_head_reference(hidden, cw, cb, threshold, pw, pb, activation)
    logits, entropy, exit_mask = eh_kernels.exit_head_triton(hidden, pw, pb, cw, cb, threshold, activation)
    assert_close(logits, ref.logits)
    ent_tol = dict(rtol=1e-10, atol=1e-10) if hidden.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert entropy.dtype == ref.entropy.dtype
    torch.testing.assert_close(entropy, ref.entropy, **ent_tol)
    assert exit_mask.dtype == torch.bool and exit_mask.shape == ref.exit_mask.shape
    decided = (ref.entropy.double() - threshold).abs() > 1e-4  # ties are rounding-dependent
    assert torch.equal(exit_mask[decided], ref.exit_mask[decided])
    assert torch.equal(exit_mask, entropy < threshold)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("classes", [1, 2, 3, 1000])
@pytest.mark.parametrize("pooler", [False, True])
@pytest.mark.parametrize("batch,hidden_size", [(1, 40), (3, 131)])
def test_exit_head_matches_reference(dtype, classes, pooler, batch, hidden_size):
    gen = torch.Generator().manual_seed(classes * 7 + batch)
    check_exit_head(exit_head_inputs(batch, hidden_size, classes, dtype, pooler, gen))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("pooler", [False, True])
def test_exit_head_activations(activation, pooler):
    gen = torch.Generator().manual_seed(11)
    check_exit_head(exit_head_inputs(5, 131, 3, torch.float32, pooler, gen), activation=activation)


def test_exit_head_float64_and_many_rows():
    # 37 rows: two row blocks; float64 keeps float64 entropies.
    gen = torch.Generator().manual_seed(1)
    check_exit_head(exit_head_inputs(37, 48, 3, torch.float64, True, gen))


def test_exit_head_noncontiguous():
    gen = torch.Generator().manual_seed(2)
    seq = rand(3, 5, 64, gen=gen)
    cls_states = seq[:, 0]  # the CLS rows of a [batch, seq, hidden] state: row stride 5 * 64
    assert not cls_states.is_contiguous()
    _, pw, pb, cw, cb = exit_head_inputs(3, 64, 3, torch.float32, True, gen)
    check_exit_head((cls_states, noncontig(pw), noncontig(pb), noncontig(cw), noncontig(cb)))
    check_exit_head((cls_states, None, None, noncontig(cw), noncontig(cb)))


def test_exit_head_entropy_limits():
    # One class: H = 0 (always exits for tau > 0). Equal logits: H = log C exactly.
    hidden = rand(3, 40)
    out = eh_kernels.exit_head_triton(hidden, None, None, rand(1, 40), rand(1), 1e-3)
    assert torch.equal(out[1], torch.zeros(3, device=DEVICE)) and bool(out[2].all())
    c = 1000
    out = eh_kernels.exit_head_triton(hidden, None, None, torch.zeros(c, 40, device=DEVICE),
                                      torch.full((c,), 2.5, device=DEVICE), 0.0)
    torch.testing.assert_close(out[1], torch.full((3,), math.log(c), device=DEVICE))
    assert not bool(out[2].any())
    # Logits in the thousands: the online state never forms e^z, entropies stay finite and exact.
    cw, cb = rand(5, 40, scale=1e3), rand(5)
    big = eh_kernels.exit_head_triton(hidden, None, None, cw, cb, 0.5)
    ref = exit_head_reference(hidden, cw, cb, 0.5)
    assert torch.isfinite(big[1]).all()
    torch.testing.assert_close(big[1], ref.entropy, rtol=1e-3, atol=1e-3)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns about the NaNs
@pytest.mark.parametrize("where", ["hidden", "classifier_weight"])
def test_exit_head_non_finite_logits_name_the_row(where):
    hidden, pw, pb, cw, cb = exit_head_inputs(3, 40, 1000, torch.float32, False, torch.Generator().manual_seed(3))
    if where == "hidden":
        hidden[2, 5] = float("nan")
        row = 2
    else:
        cw[700, 3] = float("inf")  # inf in every row's logit 700 (tile 11 of 16)
        row = 0
    with pytest.raises(ValueError, match=f"non-finite logits .* in row {row}"):
        eh_kernels.exit_head_triton(hidden, pw, pb, cw, cb, 0.5)


def test_exit_head_bad_input_raises_like_reference():
    hidden, pw, pb, cw, cb = exit_head_inputs(3, 40, 3, torch.float32, True, torch.Generator().manual_seed(4))
    cases = [
        ((hidden, pw, pb, cw, cb[:2], 0.5), "classifier_bias"),
        ((hidden, pw, None, cw, cb, 0.5), "pooler_bias"),
        ((hidden, pw.double(), pb, cw, cb, 0.5), "pooler_weight"),
        ((hidden[0], pw, pb, cw, cb, 0.5), "hidden"),
        ((hidden, pw, pb, cw[:, :39], cb, 0.5), "classifier_weight"),
        ((hidden.int(), None, None, cw, cb, 0.5), "hidden"),
        ((hidden, pw, pb, cw, cb, float("nan")), "threshold"),
    ]
    for (h, w1, b1, w2, b2, tau), name in cases:
        msg = assert_same_error(
            lambda: eh_kernels.exit_head_triton(h, w1, b1, w2, b2, tau),
            lambda: exit_head_reference(h, w2, b2, tau, w1, b1),
        )
        assert name in msg


# --------------------------------------------------------------------------------------------------
# slim_attention
# --------------------------------------------------------------------------------------------------


def attention_inputs(b, s, h, heads, head_size, dtype, gen):
    rows = 3 * heads * head_size
    return (
        rand(b, s, h, dtype=dtype, gen=gen),
        rand(rows, h, dtype=dtype, scale=h**-0.5, gen=gen),
        rand(rows, dtype=dtype, scale=0.1, gen=gen),
        rand(h, heads * head_size, dtype=dtype, scale=max(1, heads * head_size) ** -0.5, gen=gen),
        rand(h, dtype=dtype, scale=0.1, gen=gen),
    )


def padding_mask(b, s, kind):
    mask = torch.ones(b, s, dtype=torch.bool)
    if kind == "padded" and b > 1:
        mask[0, s - 2:] = False  # short tail
        mask[-1, (s + 1) // 2:] = False  # half padding
    elif kind == "all_padding_row":
        mask[0, 3:] = False
        mask[-1, :] = False  # no real key at all: zero context -> out_bias rows
    return mask.to(DEVICE)


def run_attention(hidden, mask, qw, qb, ow, ob, heads):
    out = attn_kernels.slim_attention_triton(hidden, mask, qw, qb, ow, ob, heads)
    assert_close(out, slim_attention_reference(hidden, mask, qw, qb, ow, ob, heads))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,head_size", [(0, 0), (1, 24), (3, 40), (3, 24)])
@pytest.mark.parametrize("batch,seq,hidden_size,mask_kind", [
    (1, 5, 40, "full"),
    (3, 17, 64, "padded"),
    (3, 9, 131, "all_padding_row"),
])
def test_slim_attention_matches_reference(dtype, heads, head_size, batch, seq, hidden_size, mask_kind):
    gen = torch.Generator().manual_seed(heads * 100 + seq)
    hidden, qw, qb, ow, ob = attention_inputs(batch, seq, hidden_size, heads, head_size, dtype, gen)
    out = run_attention(hidden, padding_mask(batch, seq, mask_kind), qw, qb, ow, ob, heads)
    if mask_kind == "all_padding_row" and heads > 0:
        # The all-padding row attends to nothing: its output is exactly the (projected zero) bias.
        assert_close(out[-1], ob.expand(seq, hidden_size).to(dtype))


def test_slim_attention_multiple_blocks(monkeypatch):
    # 16-wide query/key blocks over 37 tokens: 3 key blocks, and rows whose first key block is all
    # padding (the running max stays -inf until a later block) must still be exact.
    monkeypatch.setattr(attn_kernels, "_MAX_BLOCK_Q", 16)
    monkeypatch.setattr(attn_kernels, "_MAX_BLOCK_KV", 16)
    gen = torch.Generator().manual_seed(5)
    b, s = 3, 37
    hidden, qw, qb, ow, ob = attention_inputs(b, s, 48, 3, 24, torch.float32, gen)
    mask = torch.zeros(b, s, dtype=torch.int64)
    mask[0] = 1
    mask[1, 20:35] = 1  # real keys only in the second and third blocks
    mask[2, 33:] = 1  # real keys only in the last block
    run_attention(hidden, mask.to(DEVICE), qw, qb, ow, ob, 3)
    # And the default (one-block) configuration on a sequence longer than one block.
    monkeypatch.undo()
    hidden, qw, qb, ow, ob = attention_inputs(2, 70, 40, 1, 40, torch.float32, gen)
    run_attention(hidden, padding_mask(2, 70, "padded"), qw, qb, ow, ob, 1)


def test_slim_attention_float64_head_size_one():
    gen = torch.Generator().manual_seed(6)
    hidden, qw, qb, ow, ob = attention_inputs(2, 6, 40, 2, 1, torch.float64, gen)
    run_attention(hidden, padding_mask(2, 6, "padded"), qw, qb, ow, ob, 2)


def test_slim_attention_noncontiguous():
    gen = torch.Generator().manual_seed(7)
    hidden, qw, qb, ow, ob = attention_inputs(3, 11, 40, 3, 24, torch.float32, gen)
    mask = noncontig(padding_mask(3, 11, "padded").to(torch.int32))
    args = (noncontig(hidden), mask, noncontig(qw), noncontig(qb), noncontig(ow), noncontig(ob))
    assert not any(t.is_contiguous() for t in args)
    run_attention(*args, 3)


def test_slim_attention_bad_input_raises_like_reference():
    hidden, qw, qb, ow, ob = attention_inputs(2, 5, 40, 3, 8, torch.float32, torch.Generator().manual_seed(8))
    mask = padding_mask(2, 5, "full")
    cases = [
        ((hidden, mask.float(), qw, qb, ow, ob, 3), "key_padding_mask"),
        ((hidden, mask[:, :4], qw, qb, ow, ob, 3), "key_padding_mask"),
        ((hidden, mask, qw[:-1], qb, ow, ob, 3), "qkv_weight"),
        ((hidden, mask, qw, qb, ow, ob, 0), "num_heads"),
        ((hidden, mask, qw, qb, ow, ob, -1), "num_heads"),
        ((hidden, mask, qw, qb[:-1], ow, ob, 3), "qkv_bias"),
        ((hidden, mask, qw, qb, ow[:, :-1], ob, 3), "out_weight"),
        ((hidden, mask, qw, qb, ow, ob.half(), 3), "out_bias"),
        ((hidden[0], mask, qw, qb, ow, ob, 3), "hidden"),
    ]
    for args, name in cases:
        msg = assert_same_error(lambda: attn_kernels.slim_attention_triton(*args),
                                lambda: slim_attention_reference(*args))
        assert name in msg


# --------------------------------------------------------------------------------------------------
# slim_ffn
# --------------------------------------------------------------------------------------------------


def ffn_inputs(lead, h, inter, dtype, gen):
    return (
        rand(*lead, h, dtype=dtype, gen=gen),
        rand(inter, h, dtype=dtype, scale=h**-0.5, gen=gen),
        rand(inter, dtype=dtype, scale=0.5, gen=gen),
        rand(h, inter, dtype=dtype, scale=max(inter, 1) ** -0.5, gen=gen),
        rand(h, dtype=dtype, scale=0.1, gen=gen),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("inter", [0, 1, 37])
@pytest.mark.parametrize("lead,hidden_size", [((1, 5), 40), ((3, 17), 131), ((7,), 64)])
def test_slim_ffn_matches_reference(dtype, inter, lead, hidden_size):
    gen = torch.Generator().manual_seed(inter + hidden_size)
    args = ffn_inputs(lead, hidden_size, inter, dtype, gen)
    out = ffn_kernels.slim_ffn_triton(*args)
    assert_close(out, slim_ffn_reference(*args))
    if inter == 0:
        assert_close(out, args[4].expand_as(out))


def test_slim_ffn_gelu_is_exact_erf():
    # Pre-activations spanning the GELU knee: the tanh approximation differs by up to ~5e-4 here.
    h = 16
    x = torch.linspace(-4, 4, 64, dtype=torch.float64).reshape(4, h).to(DEVICE)
    eye = torch.eye(h, dtype=torch.float64, device=DEVICE)
    zero = torch.zeros(h, dtype=torch.float64, device=DEVICE)
    out = ffn_kernels.slim_ffn_triton(x, eye, zero, eye, zero)
    torch.testing.assert_close(out, torch.nn.functional.gelu(x), rtol=1e-12, atol=1e-12)
    assert (out - torch.nn.functional.gelu(x, approximate="tanh")).abs().max() > 1e-4


def test_slim_ffn_noncontiguous_and_large_inter():
    gen = torch.Generator().manual_seed(9)
    hidden, w1, b1, w2, b2 = ffn_inputs((3, 5), 40, 200, torch.float32, gen)
    args = (noncontig(hidden), noncontig(w1), noncontig(b1), noncontig(w2), noncontig(b2))
    assert not any(t.is_contiguous() for t in args)
    assert_close(ffn_kernels.slim_ffn_triton(*args), slim_ffn_reference(*args))


def test_slim_ffn_bad_input_raises_like_reference():
    hidden, w1, b1, w2, b2 = ffn_inputs((2, 3), 40, 37, torch.float32, torch.Generator().manual_seed(10))
    cases = [
        ((hidden, w1[:, :-1], b1, w2, b2), "in_weight"),
        ((hidden, w1, b1[:-1], w2, b2), "in_bias"),
        ((hidden, w1, b1, w2[:, :-1], b2), "out_weight"),
        ((hidden, w1, b1, w2, b2.double()), "out_bias"),
        ((hidden.long(), w1, b1, w2, b2), "hidden"),
    ]
    for args, name in cases:
        msg = assert_same_error(lambda: ffn_kernels.slim_ffn_triton(*args), lambda: slim_ffn_reference(*args))
        assert name in msg


# --------------------------------------------------------------------------------------------------
# add_layer_norm
# --------------------------------------------------------------------------------------------------


def aln_inputs(lead, h, dtype, gen, offset=0.0):
    return (
        rand(*lead, h, dtype=dtype, gen=gen) + offset,
        rand(*lead, h, dtype=dtype, gen=gen),
        rand(h, dtype=dtype, gen=gen),
        rand(h, dtype=dtype, gen=gen),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("hidden_size", [1, 131, 384, 200])
@pytest.mark.parametrize("lead", [(1,), (3, 17)])
def test_add_layer_norm_matches_reference(dtype, hidden_size, lead):
    gen = torch.Generator().manual_seed(hidden_size)
    x, r, w, b = aln_inputs(lead, hidden_size, dtype, gen)
    for eps in (1e-12, 1e-5):
        out = aln_kernels.add_layer_norm_triton(x, r, w, b, eps)
        assert_close(out, add_layer_norm_reference(x, r, w, b, eps))


def test_add_layer_norm_large_offset_keeps_precision():
    # Rows around 1e4 with unit spread: a one-pass E[x^2] - E[x]^2 would lose most fp32 digits.
    x, r, w, b = aln_inputs((4,), 384, torch.float32, torch.Generator().manual_seed(11), offset=1e4)
    out = aln_kernels.add_layer_norm_triton(x, r, w, b, 1e-12)
    torch.testing.assert_close(out, add_layer_norm_reference(x, r, w, b, 1e-12), rtol=1e-4, atol=2e-3)


def test_add_layer_norm_chunked_rows(monkeypatch):
    # The wide-row path (several chunks per row) on a small width: 131 columns in 32-wide chunks.
    monkeypatch.setattr(aln_kernels, "_MAX_SINGLE_BLOCK", 16)
    monkeypatch.setattr(aln_kernels, "_CHUNK", 32)
    for dtype in (torch.float32, torch.bfloat16):
        x, r, w, b = aln_inputs((3, 4), 131, dtype, torch.Generator().manual_seed(12))
        assert_close(aln_kernels.add_layer_norm_triton(x, r, w, b, 1e-12), add_layer_norm_reference(x, r, w, b, 1e-12))


def test_add_layer_norm_noncontiguous_and_empty():
    x, r, w, b = aln_inputs((5, 3), 131, torch.float32, torch.Generator().manual_seed(13))
    args = (noncontig(x), noncontig(r), noncontig(w), noncontig(b))
    strided = rand(5, 3, 262)[..., ::2]  # last-dimension stride 2
    for xs, rs in ((args[0], args[1]), (strided, r)):
        out = aln_kernels.add_layer_norm_triton(xs, rs, args[2], args[3], 1e-12)
        assert out.is_contiguous()
        assert_close(out, add_layer_norm_reference(xs, rs, args[2], args[3], 1e-12))
    empty = aln_kernels.add_layer_norm_triton(x[:0], r[:0], w, b, 1e-12)
    assert empty.shape == (0, 3, 131)


def test_add_layer_norm_bad_input_raises_like_reference():
    x, r, w, b = aln_inputs((2, 3), 40, torch.float32, torch.Generator().manual_seed(14))
    cases = [
        ((x, r[:, :2], w, b, 1e-12), "residual"),
        ((x, r.double(), w, b, 1e-12), "residual"),
        ((x, r, w[:-1], b, 1e-12), "weight"),
        ((x, r, w, b.half(), 1e-12), "bias"),
        ((x, r, w, b, 0.0), "eps"),
        ((x, r, w, b, float("inf")), "eps"),
        ((x.int(), r, w, b, 1e-12), "x"),
    ]
    for args, name in cases:
        msg = assert_same_error(lambda: aln_kernels.add_layer_norm_triton(*args),
                                lambda: add_layer_norm_reference(*args))
        assert name in msg


# --------------------------------------------------------------------------------------------------
# opcheck through test-only custom ops (reference as the default kernel, the Triton launcher for the
# device the kernels run on, the op module's fake and autograd)
# --------------------------------------------------------------------------------------------------

_NS = "costeff_triton_test"
Tensor = torch.Tensor


def _define_test_ops():
    key = DEVICE

    @torch.library.custom_op(f"{_NS}::exit_head", mutates_args=())
    def t_exit_head(hidden: Tensor, pooler_weight: Optional[Tensor], pooler_bias: Optional[Tensor],
                    classifier_weight: Tensor, classifier_bias: Tensor, threshold: float,
                    activation: str = "tanh") -> tuple[Tensor, Tensor, Tensor]:
        out = exit_head_reference(hidden, classifier_weight, classifier_bias, threshold, pooler_weight, pooler_bias, activation)
        return tuple(t.clone() for t in out)

    @torch.library.custom_op(f"{_NS}::slim_attention", mutates_args=())
    def t_slim_attention(hidden: Tensor, key_padding_mask: Tensor, qkv_weight: Tensor, qkv_bias: Tensor,
                         out_weight: Tensor, out_bias: Tensor, num_heads: int) -> Tensor:
        return slim_attention_reference(hidden, key_padding_mask, qkv_weight, qkv_bias, out_weight, out_bias,
                                        num_heads).clone()

    @torch.library.custom_op(f"{_NS}::slim_ffn", mutates_args=())
    def t_slim_ffn(hidden: Tensor, in_weight: Tensor, in_bias: Tensor, out_weight: Tensor, out_bias: Tensor) -> Tensor:
        return slim_ffn_reference(hidden, in_weight, in_bias, out_weight, out_bias).clone()

    @torch.library.custom_op(f"{_NS}::add_layer_norm", mutates_args=())
    def t_add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        return add_layer_norm_reference(x, residual, weight, bias, eps).clone()

    ops = {}
    for op, mod, launcher in (
        (t_exit_head, eh_ops, eh_kernels.exit_head_triton),
        (t_slim_attention, attn_ops, attn_kernels.slim_attention_triton),
        (t_slim_ffn, ffn_ops, ffn_kernels.slim_ffn_triton),
        (t_add_layer_norm, aln_ops, aln_kernels.add_layer_norm_triton),
    ):
        op.register_fake(mod._fake)
        op.register_kernel(key, launcher)
        op.register_autograd(mod._backward, setup_context=mod._setup_context)
        ops[mod.NAME] = op
    return ops


@pytest.fixture(scope="module")
def test_ops():
    return _define_test_ops()


def _opcheck_cases():
    gen = torch.Generator().manual_seed(15)

    def grad(*ts):
        return [t.requires_grad_(True) if t is not None else None for t in ts]

    hidden, pw, pb, cw, cb = grad(*exit_head_inputs(3, 40, 3, torch.float32, True, gen))
    h2, _, _, cw2, cb2 = grad(*exit_head_inputs(2, 24, 1000, torch.float32, False, gen))
    ah, qw, qb, ow, ob = grad(*attention_inputs(3, 7, 40, 3, 24, torch.float32, gen))
    zh, zqw, zqb, zow, zob = grad(*attention_inputs(2, 5, 40, 0, 0, torch.float32, gen))
    fx = grad(*ffn_inputs((3, 5), 40, 37, torch.float32, gen))
    f0 = grad(*ffn_inputs((2, 3), 40, 0, torch.float32, gen))
    lx = grad(*aln_inputs((3, 5), 131, torch.float32, gen))
    return [
        ("exit_head", (hidden, pw, pb, cw, cb, 0.5)),
        ("exit_head", (h2, None, None, cw2, cb2, 2.0)),
        ("exit_head", (hidden, pw, pb, cw, cb, 0.5, "gelu")),
        ("exit_head", (h2, None, None, cw2, cb2, 2.0, "relu")),
        ("slim_attention", (ah, padding_mask(3, 7, "all_padding_row"), qw, qb, ow, ob, 3)),
        ("slim_attention", (zh, padding_mask(2, 5, "full"), zqw, zqb, zow, zob, 0)),
        ("slim_ffn", tuple(fx)),
        ("slim_ffn", tuple(f0)),
        ("add_layer_norm", (*lx, 1e-12)),
    ]


def test_launchers_refuse_cpu_tensors_when_compiled(monkeypatch):
    # Outside the interpreter Triton needs GPU memory: a clear error instead of a pointer fault.
    monkeypatch.setattr(importlib.import_module("costeff_kernels._common"), "INTERPRET", False)
    x, r, w, b = (t.cpu() for t in aln_inputs((2,), 40, torch.float32, torch.Generator().manual_seed(18)))
    with pytest.raises(ValueError, match="x must be a GPU tensor"):
        aln_kernels.add_layer_norm_triton(x, r, w, b, 1e-12)
    with pytest.raises(ValueError, match="hidden must be a GPU tensor"):
        eh_kernels.exit_head_triton(x, None, None, w[None], b[:1], 0.5)


LAUNCHERS = {
    "exit_head": eh_kernels.exit_head_triton,
    "slim_attention": attn_kernels.slim_attention_triton,
    "slim_ffn": ffn_kernels.slim_ffn_triton,
    "add_layer_norm": aln_kernels.add_layer_norm_triton,
}


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_takes_the_op_schema_arguments(test_ops, name):
    # costeff.ops._registry calls <op>_triton(*schema_args): same names, same order.
    params = list(inspect.signature(LAUNCHERS[name]).parameters)
    assert params == [a.name for a in test_ops[name]._opoverload._schema.arguments]
    if _extension.extension_loaded():
        schema = getattr(torch.ops.costeff, name).default._schema
        assert params == [a.name for a in schema.arguments]


@pytest.mark.parametrize("case", range(7))
def test_opcheck(test_ops, case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(test_ops[name], args)


def test_triton_op_under_torch_compile(test_ops):
    x, r, w, b = aln_inputs((3, 5), 131, torch.float32, torch.Generator().manual_seed(16))
    ffn = ffn_inputs((3, 5), 131, 37, torch.float32, torch.Generator().manual_seed(17))

    def block(x, r, w, b):
        y = test_ops["add_layer_norm"](x, r, w, b, 1e-12)
        return test_ops["slim_ffn"](y, *ffn[1:])

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    expected = slim_ffn_reference(add_layer_norm_reference(x, r, w, b, 1e-12), *ffn[1:])
    torch.testing.assert_close(compiled(x, r, w, b), expected, rtol=1e-5, atol=1e-5)


# --- the GPU runner's exit bookkeeping (costeff_kernels/exit_decide.py) ---------------------------

def _exit_decide_case(b, s, labels, spare, seed):
    g = torch.Generator().manual_seed(seed)
    entropy = torch.rand(b, generator=g, dtype=torch.float64).float()
    entropy[torch.randint(0, b, (max(1, b // 7),), generator=g)] = 0.25  # ties with the threshold below
    logits = torch.randn(b, labels, generator=g)
    row = torch.randperm(spare, generator=g)[:b]
    row[torch.rand(b, generator=g) < 0.3] = spare  # rows that are not real (left already, bucket padding)
    lengths = torch.randint(1, s + 1, (b,), generator=g)
    key = torch.arange(s)[None] < lengths[:, None]
    key[::3] = key[::3].flip(1)  # left-padded rows too: the length is the last real position
    return entropy, logits, row, key


@pytest.mark.parametrize("b,s,labels,last", [(1, 5, 2, False), (7, 33, 3, False), (37, 70, 77, False), (256, 40, 2, False), (19, 9, 4, True)])
def test_exit_decide_matches_the_reference(b, s, labels, last):
    from costeff.inference.gpu_runner import exit_decide_reference
    from costeff_kernels.exit_decide import exit_decide_triton

    spare = 300
    entropy, logits, row, key = _exit_decide_case(b, s, labels, spare, seed=b + s)
    entropy[b // 2] = float("nan") if b > 4 else entropy[b // 2]
    threshold = torch.tensor(0.25)
    results = []
    for fn in (exit_decide_reference, exit_decide_triton):
        out = torch.full((spare + 1, labels + 2), -7.0, device=DEVICE)
        stats = torch.full((9,), -1, dtype=torch.long, device=DEVICE)
        dest, new_row = fn(*(t.to(DEVICE) for t in (entropy, logits, row, key, threshold)), out, stats, 3.0, spare, last)
        # row `spare` takes the reference's writes of the rows that do not leave; the kernel skips them
        results.append((out.cpu()[:spare], stats.cpu(), dest.cpu(), new_row.cpu()))
    (out_r, stats_r, dest_r, row_r), (out_t, stats_t, dest_t, row_t) = results
    assert torch.equal(out_t, out_r) and torch.equal(stats_t[:3], stats_r[:3])
    assert torch.equal(dest_t, dest_r) and torch.equal(row_t, row_r)
    assert sorted(dest_r.tolist()) == list(range(b))  # a permutation
    valid = row != spare
    assert stats_r[2].item() == int((valid & entropy.isnan()).sum())
    if last:
        assert stats_r[0].item() == 0 and (row_r == spare).all()


def test_gpu_runner_with_the_fused_exit_equals_early_exit():
    from tests.test_gpu_runner import _assert_same_as_early_exit, _batch, _model

    from costeff.inference import GpuRunner

    model = _model()
    for pooling in ("mean", "cls"):
        model = _model(pooling)
        runner = GpuRunner(model, device=DEVICE, fused_exit=True, batch_buckets=(1, 2, 4, 8, 16, 32))
        assert [k.__name__ for k in runner._kernels] == ["exit_decide_triton", "exit_pool_head_triton"]
        for t in (0.0, 0.6, math.inf):
            _assert_same_as_early_exit(runner, model.to(DEVICE), tuple(x.to(DEVICE) for x in _batch(b=23, s=31)), t)


def test_gpu_runner_falls_back_when_the_fused_exit_kernel_fails(monkeypatch):
    from tests.test_gpu_runner import _assert_same_as_early_exit, _batch, _model

    from costeff.inference import GpuRunner

    def broken(*args):
        raise RuntimeError("PassManager::run failed")  # what a Triton compile error looks like

    model = _model()
    runner = GpuRunner(model, device=DEVICE, fused_exit=True, graphs=False)
    runner._kernels = (broken, runner._kernels[1])
    with pytest.warns(RuntimeWarning, match="fused exit kernels failed"):
        _assert_same_as_early_exit(runner, model.to(DEVICE), tuple(x.to(DEVICE) for x in _batch(b=9, s=12)), 0.6)
    assert runner._kernels is None


@pytest.mark.parametrize("b,s,h,c,act,mean,dtype", [(1, 5, 32, 2, "tanh", True, torch.float32), (9, 33, 40, 77, "gelu", True, torch.bfloat16),
                                                   (6, 17, 384, 3, "relu", False, torch.float32), (4, 3, 24, 300, "tanh", True, torch.float32)])
def test_exit_pool_head_matches_the_reference(b, s, h, c, act, mean, dtype):
    from costeff.models import CostEffConfig
    from costeff.models.modeling_costeff import exit_input
    from costeff.ops.exit_head import exit_head_logits_entropy
    from costeff_kernels.exit_pool_head import exit_pool_head_triton

    gen = torch.Generator().manual_seed(b * 7 + c)
    hidden = (torch.randn(b, s, h, generator=gen) * 2).to(dtype)
    lengths = torch.randint(1, s + 1, (b,), generator=gen)
    key = torch.arange(s)[None] < lengths[:, None]
    w, bias = torch.randn(c, h, generator=gen) * 0.3, torch.randn(c, generator=gen)
    cfg = CostEffConfig(exit_pooling="mean" if mean else "cls")
    want_logits, want_entropy = exit_head_logits_entropy(exit_input(hidden.float(), key, cfg, last=False), w, bias, None, None, act)
    logits, entropy = exit_pool_head_triton(hidden.to(DEVICE), key.to(DEVICE), w.to(DEVICE), bias.to(DEVICE), act, mean)
    torch.testing.assert_close(logits.cpu(), want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.cpu(), want_entropy, rtol=1e-5, atol=1e-5)
    hidden[0, 0, 0] = float("nan")  # a non-finite row gives a non-finite entropy: the runner counts those
    _, entropy = exit_pool_head_triton(hidden.to(DEVICE), key.to(DEVICE), w.to(DEVICE), bias.to(DEVICE), act, mean)
    assert not torch.isfinite(entropy[0]) and torch.isfinite(entropy[1:]).all()


def test_gpu_runner_with_the_fused_exit_refuses_non_finite_logits():
    from tests.test_gpu_runner import _batch, _model

    from costeff.inference import GpuRunner

    model = _model()
    with torch.no_grad():
        model.costeff.layers[0].ffn.out_bias[3] = float("nan")
    runner = GpuRunner(model, device=DEVICE, fused_exit=True, graphs=False)
    with pytest.raises(ValueError, match="non-finite logits"):
        runner(*(x.to(DEVICE) for x in _batch(b=5, s=7)), threshold=0.5)
