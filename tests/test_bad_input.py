"""Bad input to any op raises a clear ValueError/TypeError naming the op and the argument — never a
crash, a hang or a silent wrong answer. Explicit cases first, then a hypothesis fuzz over random
shapes, dtypes and corruptions."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from costeff import ops

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def exit_head_args(b=3, h=8, c=2, pooler=True, dtype=torch.float32):
    t = lambda *s: torch.randn(*s).to(dtype)  # noqa: E731
    return {
        "hidden": t(b, h),
        "pooler_weight": t(h, h) if pooler else None,
        "pooler_bias": t(h) if pooler else None,
        "classifier_weight": t(c, h),
        "classifier_bias": t(c),
        "threshold": 0.5,
    }


def slim_attention_args(b=2, s=5, h=8, nh=2, d=3, dtype=torch.float32):
    t = lambda *sh: torch.randn(*sh).to(dtype)  # noqa: E731
    return {
        "hidden": t(b, s, h),
        "key_padding_mask": torch.ones(b, s, dtype=torch.bool),
        "qkv_weight": t(3 * nh * d, h),
        "qkv_bias": t(3 * nh * d),
        "out_weight": t(h, nh * d),
        "out_bias": t(h),
        "num_heads": nh,
    }


def slim_ffn_args(lead=(2, 3), h=8, i=5, dtype=torch.float32):
    t = lambda *s: torch.randn(*s).to(dtype)  # noqa: E731
    return {"hidden": t(*lead, h), "in_weight": t(i, h), "in_bias": t(i), "out_weight": t(h, i), "out_bias": t(h)}


def add_layer_norm_args(lead=(2, 3), h=8, dtype=torch.float32):
    t = lambda *s: torch.randn(*s).to(dtype)  # noqa: E731
    return {"x": t(*lead, h), "residual": t(*lead, h), "weight": t(h), "bias": t(h), "eps": 1e-5}


OPS = {
    "exit_head": (exit_head_args, torch.ops.costeff.exit_head.default, ops.exit_head_reference),
    "slim_attention": (slim_attention_args, torch.ops.costeff.slim_attention.default, ops.slim_attention_reference),
    "slim_ffn": (slim_ffn_args, torch.ops.costeff.slim_ffn.default, ops.slim_ffn_reference),
    "add_layer_norm": (add_layer_norm_args, torch.ops.costeff.add_layer_norm.default, ops.add_layer_norm_reference),
}


def call_op(name, args):
    _, op, _ = OPS[name]
    return op(*args.values())


def call_reference(name, args):
    _, _, ref = OPS[name]
    a = dict(args)
    if name == "exit_head":
        return ref(a["hidden"], a["classifier_weight"], a["classifier_bias"], a["threshold"], a["pooler_weight"], a["pooler_bias"])
    return ref(*a.values())


EXPLICIT = [
    ("exit_head", "hidden", lambda t: t[None], ValueError, "hidden must be 2-D"),
    ("exit_head", "classifier_weight", lambda t: t[:, :-1], ValueError, "classifier_weight.size(1)"),
    ("exit_head", "classifier_bias", lambda t: t[:-1], ValueError, "classifier_bias.size(0)"),
    ("exit_head", "pooler_weight", lambda t: t[:-1], ValueError, "pooler_weight.size(0)"),
    ("exit_head", "pooler_bias", lambda t: None, ValueError, "pooler_weight and pooler_bias"),
    ("exit_head", "hidden", lambda t: t.long(), TypeError, "hidden must be float"),
    ("exit_head", "classifier_weight", lambda t: t.double(), TypeError, "classifier_weight has dtype"),
    ("exit_head", "classifier_weight", lambda t: t.to("meta"), ValueError, "classifier_weight is on meta"),
    ("exit_head", "classifier_weight", lambda t: t[:0], ValueError, "at least one class"),
    ("exit_head", "threshold", lambda t: math.nan, ValueError, "threshold must be a number >= 0"),
    ("exit_head", "hidden", lambda t: t.index_fill(0, torch.tensor([1]), math.nan), ValueError, "non-finite logits"),
    ("slim_attention", "hidden", lambda t: t[0], ValueError, "hidden must be 3-D"),
    ("slim_attention", "key_padding_mask", lambda t: t.float(), TypeError, "key_padding_mask must be bool or integer"),
    ("slim_attention", "key_padding_mask", lambda t: t[:, :-1], ValueError, "key_padding_mask.size(1)"),
    ("slim_attention", "qkv_weight", lambda t: t[:-1], ValueError, "qkv_weight.size(0)"),
    ("slim_attention", "qkv_bias", lambda t: t[:-1], ValueError, "qkv_bias.size(0)"),
    ("slim_attention", "out_weight", lambda t: t[:, :-1], ValueError, "out_weight.size(1)"),
    ("slim_attention", "out_bias", lambda t: t.half(), TypeError, "out_bias has dtype"),
    ("slim_attention", "num_heads", lambda t: -1, ValueError, "num_heads must be >= 0"),
    ("slim_attention", "num_heads", lambda t: 0, ValueError, "num_heads is 0 but qkv_weight"),
    ("slim_attention", "out_weight", lambda t: t.to("meta"), ValueError, "out_weight is on meta"),
    ("slim_ffn", "in_weight", lambda t: t[:, :-1], ValueError, "in_weight.size(1)"),
    ("slim_ffn", "out_weight", lambda t: t[:, :-1], ValueError, "out_weight.size(1)"),
    ("slim_ffn", "in_bias", lambda t: t[None], ValueError, "in_bias must be 1-D"),
    ("slim_ffn", "hidden", lambda t: t.int(), TypeError, "hidden must be float"),
    ("slim_ffn", "out_bias", lambda t: t.to("meta"), ValueError, "out_bias is on meta"),
    ("add_layer_norm", "residual", lambda t: t[..., :-1], ValueError, "residual must have the shape of x"),
    ("add_layer_norm", "weight", lambda t: t[:-1], ValueError, "weight.size(0)"),
    ("add_layer_norm", "bias", lambda t: t.bfloat16(), TypeError, "bias has dtype"),
    ("add_layer_norm", "eps", lambda t: 0.0, ValueError, "eps must be a positive"),
    ("add_layer_norm", "residual", lambda t: t.to("meta"), ValueError, "residual is on meta"),
]


@pytest.mark.parametrize("op_name,arg,corrupt,exc,msg", EXPLICIT, ids=[f"{c[0]}-{c[4]}" for c in EXPLICIT])
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_explicit_bad_input(op_name, arg, corrupt, exc, msg, path):
    args = OPS[op_name][0]()
    args[arg] = corrupt(args[arg])
    call = call_op if path == "kernel" else call_reference
    with pytest.raises(exc, match=f"costeff::{op_name}.*{msg}".replace("(", r"\(").replace(")", r"\)")):
        call(op_name, args)


CORRUPTIONS = ["none", "rank", "size", "int_dtype", "other_float_dtype", "meta_device"]


def corrupt_tensor(t: torch.Tensor, how: str, data) -> torch.Tensor:
    if how == "rank":
        return t.unsqueeze(0)
    if how == "size":
        d = data.draw(st.integers(0, t.dim() - 1), label="dim")
        return torch.cat([t, t.narrow(d, 0, 1)], d) if t.size(d) > 0 else t.new_zeros([*t.shape[:d], 1, *t.shape[d + 1:]])
    if how == "int_dtype":
        return t.to(torch.int32)
    if how == "other_float_dtype":
        return t.to(torch.float16 if t.dtype != torch.float16 else torch.float32)
    if how == "meta_device":
        return t.to("meta")
    return t


def draw_args(name, data):
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    if name == "exit_head":
        return exit_head_args(
            b=data.draw(st.integers(1, 5)), h=data.draw(st.integers(1, 24)), c=data.draw(st.integers(1, 7)),
            pooler=data.draw(st.booleans()), dtype=dtype)
    if name == "slim_attention":
        nh = data.draw(st.integers(0, 3))
        return slim_attention_args(
            b=data.draw(st.integers(1, 3)), s=data.draw(st.integers(1, 6)), h=data.draw(st.integers(1, 16)),
            nh=nh, d=data.draw(st.integers(1, 9)), dtype=dtype)
    if name == "slim_ffn":
        return slim_ffn_args(
            lead=tuple(data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))), h=data.draw(st.integers(1, 16)),
            i=data.draw(st.integers(0, 20)), dtype=dtype)
    return add_layer_norm_args(
        lead=tuple(data.draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))), h=data.draw(st.integers(1, 40)),
        dtype=dtype)


@pytest.mark.parametrize("op_name", list(OPS))
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_shapes_dtypes_and_corruptions(op_name, data):
    args = draw_args(op_name, data)
    tensor_args = [k for k, v in args.items() if isinstance(v, torch.Tensor)]
    how = data.draw(st.sampled_from(CORRUPTIONS), label="corruption")
    target = data.draw(st.sampled_from(tensor_args), label="argument")
    if how == "other_float_dtype" and target == tensor_args[0]:
        how = "int_dtype"  # changing the first tensor's float dtype just changes the call's dtype
    if how == "size" and target == tensor_args[0]:
        how = "rank"
    if how == "int_dtype" and target == "key_padding_mask":
        how = "size"  # integer masks are valid
    if how == "meta_device" and target == tensor_args[0]:
        how = "rank"
    if how == "rank" and op_name in ("slim_ffn", "add_layer_norm") and target in ("hidden", "x"):
        how = "int_dtype"  # these take any number of leading dimensions
    args[target] = corrupt_tensor(args[target], how, data)

    if how == "none":
        out = call_op(op_name, args)
        ref = call_reference(op_name, args)
        outs = out if isinstance(out, tuple) else (out,)
        refs = ref if isinstance(ref, tuple) else (ref,)
        tol = 1e-4 if args[tensor_args[0]].dtype in (torch.float32, torch.float64) else 5e-2
        for o, r in zip(outs[:2], refs[:2]):  # logits/entropy or the op's single output
            assert o.shape == r.shape and o.dtype == r.dtype
            torch.testing.assert_close(o.double(), r.double(), atol=tol * max(1.0, r.abs().max().item() if r.numel() else 1.0), rtol=tol)
        return
    # Both the compiled kernel (or, for meta inputs, the fake kernel) and the reference refuse it,
    # with a message naming the op and, unless the first tensor itself was corrupted, the argument.
    for call in (call_op, call_reference):
        with pytest.raises((ValueError, TypeError)) as info:
            call(op_name, args)
        text = str(info.value)
        assert f"costeff::{op_name}" in text, text
        if target != tensor_args[0]:
            assert target in text, text
