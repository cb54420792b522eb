"""The C++ early-exit engine (costeff.inference.InferenceEngine, csrc/engine/) against its readable
reference, ``CostEffForSequenceClassification.early_exit`` on the plain-PyTorch path. Models are
built here with random weights scaled up so that exits disagree and entropies spread."""
from __future__ import annotations

import math
import threading

import pytest
import torch
from safetensors.torch import save_file

import costeff
from costeff.inference import InferenceEngine
from _models import CONFIGS, MAXPOS, VOCAB, assert_matches_reference, exit_entropies, make_batch, make_model, spread_thresholds

pytestmark = pytest.mark.skipif(not costeff.info()["cpu_kernels"], reason="costeff._C not built")


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("b", [1, 33])
def test_fp32_engine_equals_early_exit(name, b):
    model = make_model(**CONFIGS[name])
    engine = InferenceEngine.from_model(model, "fp32")
    ids, mask, types = make_batch(b=b)
    layers_seen = set()
    for thr in spread_thresholds(model, ids, mask, types):
        out, _ = assert_matches_reference(model, engine, ids, mask, types, thr)
        layers_seen |= set(out.exit_layer.tolist())
    cfg = model.config
    assert cfg.num_hidden_layers in layers_seen  # threshold 0: none leaves early
    assert cfg.exit_start in layers_seen  # threshold inf: all leave at the first exit


def test_no_mask_no_types_and_int32_ids():
    model = make_model()
    engine = InferenceEngine.from_model(model)
    ids, _, _ = make_batch(b=5, pad=False)
    ref = model.early_exit(ids, threshold=0.7, use_kernels=False)
    out = engine(ids.int(), threshold=0.7)
    assert torch.equal(out.exit_layer, ref.exit_layer)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)


def test_empty_batch():
    engine = InferenceEngine.from_model(make_model())
    out = engine(torch.zeros(0, 5, dtype=torch.long), threshold=0.3)
    assert out.logits.shape == (0, 3) and out.exit_layer.shape == (0,) and out.entropy.shape == (0,)


def test_batched_row_equals_row_alone():
    model = make_model(exit_pooling="mean")
    engine = InferenceEngine.from_model(model)
    ids, mask, types = make_batch(b=9)
    thr = spread_thresholds(model, ids, mask, types)[2]
    full = engine(ids, mask, types, threshold=thr)
    for i in range(9):
        n = int(mask[i].nonzero().max()) + 1  # also trims the row's own trailing padding
        one = engine(ids[i:i + 1, :n], mask[i:i + 1, :n], types[i:i + 1, :n], threshold=thr)
        assert one.exit_layer.item() == full.exit_layer[i].item()
        torch.testing.assert_close(one.logits[0], full.logits[i], atol=1e-5, rtol=1e-5)


ENGINE_ISAS = ("avx2", "avx512", "avx512_vnni", "avx512_bf16")


def _require_isa(isa):
    known, supported, _ = torch.ops.costeff._engine_isas()
    assert isa in known
    if isa not in supported:
        pytest.skip(f"this CPU lacks {isa} (it runs: {', '.join(supported)})")


@pytest.mark.parametrize("isa", ENGINE_ISAS)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_isa_kernels_equal_portable(precision, isa, monkeypatch):
    _require_isa(isa)
    model = make_model(hidden_size=131, embedding_rank=None, num_attention_heads=[1, 2, 0, 3],
                       attention_head_size=[40, 24, 5, 16], intermediate_size=[33, 0, 131, 7], exit_pooling="mean")
    monkeypatch.setenv("COSTEFF_ENGINE_ISA", isa)
    fast = InferenceEngine.from_model(model, precision)
    assert fast.isa == isa
    monkeypatch.setenv("COSTEFF_ENGINE_ISA", "portable")
    portable = InferenceEngine.from_model(model, precision)
    assert portable.isa == "portable"
    ids, mask, types = make_batch(b=17)
    # same math in another summation order; bf16/int8 round activations again, so a one-ulp fp32
    # difference can move a value by one bf16 ulp / int8 step
    atol = 2e-4 if precision == "fp32" else 3e-2
    model_layers = model.config.num_hidden_layers
    for thr, layer in ((0.0, model_layers), (math.inf, 1)):  # every row at one exit: all comparable
        a, b = fast(ids, mask, types, threshold=thr), portable(ids, mask, types, threshold=thr)
        assert (a.exit_layer == layer).all() and (b.exit_layer == layer).all()
        torch.testing.assert_close(a.logits, b.logits, atol=atol, rtol=1e-3)
        torch.testing.assert_close(a.entropy, b.entropy, atol=atol, rtol=1e-3)
    for thr in spread_thresholds(model, ids, mask, types)[1:4]:
        a, b = fast(ids, mask, types, threshold=thr), portable(ids, mask, types, threshold=thr)
        same = a.exit_layer == b.exit_layer
        assert same.float().mean() >= (1.0 if precision == "fp32" else 0.9)
        torch.testing.assert_close(a.logits[same], b.logits[same], atol=atol, rtol=1e-3)


def _linear_reference(x, w, b, precision, activation):
    """float64 reference of one engine linear layer in `precision` (bf16 rounds x and w; int8 quantizes
    x per row and w per column, symmetric, round half to even, and rescales the exact integer product)."""
    def amax(t):
        return t.abs().amax(1, keepdim=True) if t.shape[1] else torch.zeros(t.shape[0], 1)

    if precision == "bf16":
        y = x.bfloat16().double() @ w.bfloat16().double().T
    elif precision == "int8":
        xa, wa = amax(x), amax(w)
        qx = torch.round(x * torch.where(xa > 0, 127.0 / xa, 0.0))
        qw = torch.round(w * torch.where(wa > 0, 127.0 / wa, 0.0)).clamp(-127, 127)
        y = (qx.double() @ qw.double().T) * (xa / 127.0).double() * (wa / 127.0).double().T
    else:
        y = x.double() @ w.double().T
    y = y + b.double()
    return {"none": y, "gelu": torch.nn.functional.gelu(y), "tanh": torch.tanh(y), "relu": torch.relu(y)}[activation]


@pytest.mark.parametrize("isa", ("portable",) + ENGINE_ISAS)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_linear_kernel_against_float64(precision, isa):
    """Each ISA's linear kernel on odd K/N and ragged row counts (every micro-kernel height and tail)."""
    _require_isa(isa)
    g = torch.Generator().manual_seed(1)
    for m, k, n in ((1, 1, 1), (5, 3, 17), (11, 37, 45), (23, 130, 33), (0, 8, 8), (3, 0, 5), (4, 6, 0)):
        x = torch.randn(m, k, generator=g)
        w = torch.randn(n, k, generator=g) / max(k, 1) ** 0.5
        b = torch.randn(n, generator=g)
        for act in ("none", "gelu", "tanh", "relu"):
            y = torch.ops.costeff._engine_linear(x, w, b, precision, isa, act)
            ref = _linear_reference(x, w, b, precision, act)
            torch.testing.assert_close(y.double(), ref, atol=2e-6 * (k + 1) ** 0.5 + 1e-6, rtol=1e-5,
                                       msg=lambda s: f"{isa} {precision} {act} {(m, k, n)}: {s}")


def test_forced_isa_errors(monkeypatch):
    model = make_model()
    monkeypatch.setenv("COSTEFF_ENGINE_ISA", "sse9")
    with pytest.raises(ValueError, match="COSTEFF_ENGINE_ISA must be one of .*'avx512_vnni'.*got 'sse9'"):
        InferenceEngine.from_model(model)
    known, supported, _ = torch.ops.costeff._engine_isas()
    missing = [i for i in known if i not in supported]
    if not missing:
        pytest.skip("this CPU runs every ISA this build knows: no missing one to ask for")
    monkeypatch.setenv("COSTEFF_ENGINE_ISA", missing[0])
    with pytest.raises(ValueError, match=f"'{missing[0]}' was asked for .* this CPU lacks it"):
        InferenceEngine.from_model(model)


def test_auto_takes_the_best_isa_the_cpu_runs(monkeypatch):
    monkeypatch.delenv("COSTEFF_ENGINE_ISA", raising=False)
    _, supported, selected = torch.ops.costeff._engine_isas()
    assert selected == supported[-1]
    assert InferenceEngine.from_model(make_model()).isa == supported[-1]


@pytest.mark.parametrize("precision,min_agree,logit_tol", [("bf16", 0.95, 0.3), ("int8", 0.95, 0.5)])
def test_low_precision_agrees_with_fp32(precision, min_agree, logit_tol):
    model = make_model(seed=3, scale=3.0, exit_pooling="mean", hidden_size=64, embedding_rank=16)
    ref = InferenceEngine.from_model(model, "fp32")
    low = InferenceEngine.from_model(model, precision)
    assert low.precision == precision
    ids, mask, types = make_batch(b=64, seed=5)
    for thr in spread_thresholds(model, ids, mask, types)[1:4]:
        a, b = ref(ids, mask, types, threshold=thr), low(ids, mask, types, threshold=thr)
        agree = (a.exit_layer == b.exit_layer).float().mean().item()
        assert agree >= min_agree, (precision, thr, agree)
        same = a.exit_layer == b.exit_layer
        assert (a.logits[same] - b.logits[same]).abs().max().item() < logit_tol
    # int8/bf16 really quantize: full-depth logits differ from fp32, but only a little
    a, b = ref(ids, mask, types, threshold=0.0), low(ids, mask, types, threshold=0.0)
    assert (a.logits - b.logits).abs().max().item() > 1e-5


def test_threads_share_one_engine():
    model = make_model(exit_pooling="mean")
    engine = InferenceEngine.from_model(model, "int8")
    batches = [make_batch(b=1 + 3 * i, seed=10 + i) for i in range(8)]
    thr = 0.6
    serial = [engine(*bt, threshold=thr) for bt in batches]
    results = [None] * 8
    barrier = threading.Barrier(8)

    def work(i):
        barrier.wait()
        for _ in range(5):
            results[i] = engine(*batches[i], threshold=thr)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s, r in zip(serial, results):
        assert torch.equal(s.exit_layer, r.exit_layer)
        assert torch.equal(s.logits, r.logits)
        assert torch.equal(s.entropy, r.entropy)


def test_engine_copies_the_weights():
    model = make_model()
    engine = InferenceEngine.from_model(model)
    ids, mask, types = make_batch(b=4)
    before = engine(ids, mask, types, threshold=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    after = engine(ids, mask, types, threshold=0.0)
    assert torch.equal(before.logits, after.logits)


def test_profile_names_every_stage():
    model = make_model()
    engine = InferenceEngine.from_model(model)
    ids, mask, types = make_batch(b=3)
    prof = engine.profile(ids, mask, types, threshold=0.0, repeats=2)
    for layer in range(1, 5):
        for stage in ("attn_out", "norm1", "ffn_out", "norm2", "exit"):
            assert prof[f"layer{layer}.{stage}"] >= 0
    assert "layer1.qkv" in prof and "layer2.qkv" not in prof  # layer 2 has no heads
    assert prof["embeddings"] > 0 and sum(prof.values()) > 0


@pytest.mark.parametrize("labels", [3, 2])  # 2 default labels: save_pretrained writes neither id2label nor num_labels
def test_from_pretrained_directory(tmp_path, labels):
    model = make_model(exit_pooling="mean", num_labels=labels)
    model.save_pretrained(tmp_path / "m")
    a = InferenceEngine.from_model(model, "int8")
    b = InferenceEngine.from_pretrained(tmp_path / "m", "int8")
    ids, mask, types = make_batch(b=11)
    x, y = a(ids, mask, types, threshold=0.5), b(ids, mask, types, threshold=0.5)
    assert torch.equal(x.logits, y.logits) and torch.equal(x.exit_layer, y.exit_layer)


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument


@pytest.fixture(scope="module")
def engine():
    return InferenceEngine.from_model(make_model())


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(input_ids=torch.ones(2, 3)), TypeError, "input_ids must be an integer tensor"),
        (dict(input_ids=torch.ones(3, dtype=torch.long)), ValueError, "input_ids must be 2-D"),
        (dict(input_ids=torch.ones(2, 3, dtype=torch.long, device="meta")), ValueError, "input_ids must be a CPU tensor"),
        (dict(input_ids=torch.full((1, 3), VOCAB)), ValueError, r"input_ids must be in \[0, vocab_size=97\)"),
        (dict(input_ids=torch.full((1, 3), -1)), ValueError, "input_ids must be in"),
        (dict(input_ids=torch.ones(1, MAXPOS + 1, dtype=torch.long)), ValueError, "max_position_embeddings"),
        (dict(input_ids=torch.ones(1, 0, dtype=torch.long)), ValueError, "seq_len 0"),
        (dict(input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4)), ValueError, "attention_mask must have the shape"),
        (dict(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 2, 0]])), ValueError, "attention_mask must hold 0/1"),
        (dict(input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0], [0, 0, 0]])), ValueError, r"rows \[1\] have no real token"),
        (dict(input_ids=torch.ones(1, 3, dtype=torch.long), token_type_ids=torch.full((1, 3), 2)), ValueError, "token_type_ids must be in"),
        (dict(input_ids=torch.ones(1, 3, dtype=torch.long), token_type_ids=torch.zeros(1, 3)), TypeError, "token_type_ids must be an integer"),
        (dict(input_ids=torch.ones(1, 3, dtype=torch.long), threshold=float("nan")), ValueError, "threshold must be a number >= 0"),
        (dict(input_ids=torch.ones(1, 3, dtype=torch.long), threshold="0.5"), TypeError, "threshold must be a number"),
        (dict(input_ids=[[1, 2]]), TypeError, "input_ids must be a Tensor"),
    ],
)
def test_bad_input(engine, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        engine(**kwargs)


def test_bad_models(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match="precision must be one of"):
        InferenceEngine.from_model(model, "fp8")
    with pytest.raises(TypeError, match="CostEffForSequenceClassification"):
        InferenceEngine.from_model(torch.nn.Linear(2, 2))
    with torch.no_grad():
        model.costeff.layers[1].ffn_norm.weight[3] = float("nan")
    with pytest.raises(ValueError, match=r"weight 'costeff.layers.1.ffn_norm.weight' holds NaN or Inf"):
        InferenceEngine.from_model(model)

    good = make_model()
    good.save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        InferenceEngine.from_pretrained(tmp_path / "missing")
    # a checkpoint whose tensors do not match its config
    bad = tmp_path / "bad"
    good.save_pretrained(bad)
    state = {k: v.contiguous() for k, v in good.state_dict().items()}
    state["costeff.layers.0.ffn.in_weight"] = torch.zeros(7, good.config.hidden_size)
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"costeff.layers.0.ffn.in_weight' has shape \[7, 48\]"):
        InferenceEngine.from_pretrained(bad)
    # a truncated safetensors file
    trunc = tmp_path / "trunc"
    good.save_pretrained(trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="past the end of the file|truncated"):
        InferenceEngine.from_pretrained(trunc)
    # garbage header
    (trunc / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        InferenceEngine.from_pretrained(trunc)
    # not a costeff config
    (trunc / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    with pytest.raises(ValueError, match="not 'costeff_bert'"):
        InferenceEngine.from_pretrained(trunc)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("use_diff", [True, False])
def test_config_reader_field_by_field(name, use_diff, tmp_path, _engine_config_matches_python):
    """The C++ reader against CostEffConfig on each test model's config, with and without the defaults
    written out (save_pretrained leaves them out); conftest runs the same check on every config saved."""
    from conftest import check_engine_reads_config

    model = make_model(**CONFIGS[name])
    check_engine_reads_config(model.config, model.config.to_json_string(use_diff=use_diff))
    before = _engine_config_matches_python["n"]
    model.save_pretrained(tmp_path)  # goes through the session-wide check
    assert _engine_config_matches_python["n"] > before


def test_early_exit_output_of_equals_the_constructor():
    """EarlyExitOutput.of (the engine's fast path) builds exactly what the ModelOutput constructor does."""
    import pickle

    from costeff.models.modeling_costeff import EarlyExitOutput

    a, b, c = torch.randn(2, 3), torch.tensor([1, 2]), torch.rand(2)
    slow, fast = EarlyExitOutput(logits=a, exit_layer=b, entropy=c), EarlyExitOutput.of(a, b, c)
    assert type(fast) is type(slow) and list(fast.keys()) == list(slow.keys()) == ["logits", "exit_layer", "entropy"]
    assert fast.to_tuple() == slow.to_tuple() and fast.__dict__ == slow.__dict__
    assert fast["entropy"] is c and fast[1] is b and fast.logits is a
    fast.logits = a * 2  # attribute and key stay in sync, as with the constructor
    assert torch.equal(fast["logits"], a * 2)
    back = pickle.loads(pickle.dumps(fast))
    assert list(back.keys()) == list(fast.keys()) and torch.equal(back.exit_layer, b)
    flat, spec = torch.utils._pytree.tree_flatten(fast)
    assert len(flat) == 3 and torch.utils._pytree.tree_unflatten(flat, spec).entropy is c
