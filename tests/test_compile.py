import math

import torch

from costeff import ops


def _layer(attention, add_ln, ffn, head, x, mask, qkv_w, qkv_b, o_w, o_b, ln1_w, ln1_b, f_w1, f_b1, f_w2, f_b2, ln2_w, ln2_b, c_w, c_b):
    a = attention(x, mask, qkv_w, qkv_b, o_w, o_b, 3)
    x = add_ln(a, x, ln1_w, ln1_b, 1e-12)
    x = add_ln(ffn(x, f_w1, f_b1, f_w2, f_b2), x, ln2_w, ln2_b, 1e-12)
    out = head(x[:, 0], c_w, c_b, 0.4)
    return x, out.logits, out.entropy, out.exit_mask


def encoder_layer(*args):
    return _layer(ops.slim_attention, ops.add_layer_norm, ops.slim_ffn, ops.exit_head, *args)


def reference_layer(*args):
    return _layer(ops.slim_attention_reference, ops.add_layer_norm_reference, ops.slim_ffn_reference, ops.exit_head_reference, *args)


def make_layer_inputs(batch=3, seq=7, hidden=40, heads=3, head_size=24, ffn=50, classes=2):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    inner = heads * head_size
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[1, 4:] = False
    return [
        r(batch, seq, hidden), mask,
        r(3 * inner, hidden) / math.sqrt(hidden), r(3 * inner) * 0.1, r(hidden, inner) / math.sqrt(inner), r(hidden) * 0.1,
        1 + 0.1 * r(hidden), 0.1 * r(hidden),
        r(ffn, hidden) / math.sqrt(hidden), 0.1 * r(ffn), r(hidden, ffn) / math.sqrt(ffn), 0.1 * r(hidden),
        1 + 0.1 * r(hidden), 0.1 * r(hidden),
        r(classes, hidden), 0.1 * r(classes),
    ]


def test_layer_of_ops_matches_reference_layer():
    args = make_layer_inputs()
    for got, want in zip(encoder_layer(*args), reference_layer(*args)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    args = make_layer_inputs()
    compiled = torch.compile(encoder_layer, fullgraph=True, backend="inductor")
    for got, want in zip(compiled(*args), encoder_layer(*args)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_torch_compile_backward_through_ops():
    torch._dynamo.reset()
    args = make_layer_inputs()
    params = [a.requires_grad_(True) for i, a in enumerate(args) if i != 1]

    def loss_fn(*a):
        x, logits, entropy, _ = encoder_layer(*a)
        return x.square().mean() + logits.logsumexp(-1).mean() + entropy.mean()

    eager_grads = torch.autograd.grad(loss_fn(*args), params)
    compiled_grads = torch.autograd.grad(torch.compile(loss_fn, fullgraph=True)(*args), params)
    for g_c, g_e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g_c, g_e, atol=1e-5, rtol=1e-4)
