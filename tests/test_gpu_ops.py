"""The ops on a CUDA GPU (marker ``gpu``; skipped with a reason without one): every op and dtype
against the CPU kernel and a float64 reference, opcheck (autograd, fake kernel) on CUDA, the
attention launch past the old 65535-program grid limit, one training step on CUDA against the CPU."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs it on a lent machine)")]

from tests._tolerance import assert_close_rel_torch  # noqa: E402

OPS = ("slim_attention", "slim_ffn", "add_layer_norm", "exit_head")


def _args(name, dtype, device, b=5, s=19, h=64):
    g = torch.Generator().manual_seed(0)
    r = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)  # noqa: E731
    x = r(b, s, h)
    if name == "slim_attention":
        mask = torch.ones(b, s, dtype=torch.bool)
        mask[1, 7:] = False
        return (x, mask.to(device), r(3 * 4 * 16, h, scale=0.1), r(3 * 4 * 16), r(h, 4 * 16, scale=0.1), r(h), 4)
    if name == "slim_ffn":
        return (x, r(96, h, scale=0.1), r(96), r(h, 96, scale=0.1), r(h))
    if name == "add_layer_norm":
        return (x, r(b, s, h), r(h), r(h), 1e-12)
    return (x[:, 0], r(3, h, scale=0.3), r(3), 0.5, r(h, h, scale=0.1), r(h))


def _first(out):
    return out[:2] if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", OPS)
def test_op_on_cuda_against_float64_and_the_cpu_kernel(name, dtype):
    import costeff.ops as ops

    torch.backends.cuda.matmul.allow_tf32 = False
    op, ref = getattr(ops, name), getattr(ops, f"{name}_reference")
    args = _args(name, dtype, "cuda")
    got = _first(op(*args))
    same = _first(ref(*args))
    exact = _first(ref(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]))
    cpu = _first(op(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args]))
    for g, s, e, c in zip(got, same, exact, cpu):
        assert_close_rel_torch(g.cpu(), s.cpu(), e.cpu(), what=f"{name} {dtype} CUDA")
        assert_close_rel_torch(c, s.cpu(), e.cpu(), what=f"{name} {dtype} CPU")


@pytest.mark.parametrize("name", OPS)
def test_opcheck_on_cuda(name):
    import costeff.ops as ops
    from costeff.ops._registry import op_handle

    args = list(_args(name, torch.float32, "cuda", b=2, s=5, h=32))
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            args[i] = a.requires_grad_()
    if name == "exit_head":  # the op's own argument order
        h, cw, cb, t, pw, pb = args
        args = [h, pw, pb, cw, cb, t, "tanh"]
    torch.library.opcheck(op_handle(name), tuple(args))
    assert ops is not None


def test_attention_launch_past_the_old_grid_limit():
    """batch x heads = 65544 programs on one axis: over the 65535 that grid axis y allows."""
    import costeff.ops as ops

    b, heads, s, d = 16386, 4, 3, 8
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, s, heads * d, device="cuda", generator=g)
    mask = torch.ones(b, s, dtype=torch.bool, device="cuda")
    w = torch.randn(3 * heads * d, heads * d, device="cuda", generator=g) * 0.1
    ow = torch.randn(heads * d, heads * d, device="cuda", generator=g) * 0.1
    bias, obias = torch.zeros(3 * heads * d, device="cuda"), torch.zeros(heads * d, device="cuda")
    out = ops.slim_attention(x, mask, w, bias, ow, obias, heads)
    ref = ops.slim_attention_reference(x[-64:], mask[-64:], w, bias, ow, obias, heads)
    torch.testing.assert_close(out[-64:], ref, atol=1e-4, rtol=1e-4)


def test_one_training_step_on_cuda_matches_the_cpu():
    from costeff.models import CostEffConfig, CostEffForSequenceClassification

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    cfg = CostEffConfig(vocab_size=70, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, attention_head_size=8, intermediate_size=40,
                        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = CostEffForSequenceClassification(cfg).train()
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 70, (6, 11), generator=g), torch.randint(0, 3, (6,), generator=g)
    mask = torch.ones(6, 11, dtype=torch.long)
    mask[2, 6:] = 0
    model(ids, mask, labels=labels).loss.backward()
    cpu_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.cuda()(ids.cuda(), mask.cuda(), labels=labels.cuda()).loss.backward()
    for n, p in model.named_parameters():
        if n in cpu_grads:
            torch.testing.assert_close(p.grad.cpu(), cpu_grads[n], atol=2e-5, rtol=1e-3, msg=n)
