"""The whole pipeline on the real all-MiniLM-L6-v2 backbone and real Rotten Tomatoes sentences
(the `tiny` preset's step counts, the default slenderization target: 2 heads, FFN 256, rank 64)."""
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_pipeline_on_minilm_and_rotten_tomatoes(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "costeff.cli", "pipeline", "--preset", "tiny", "--output", str(out), "--no-progress",
         "--max-train-examples", "64", "--max-eval-examples", "32", "--thresholds", "0,0.4,10", "--threads", "2", "--prune-vocabulary"],
        capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "COST-EFF slim" in res.stdout and "plot:" in res.stdout
    summary = json.load(open(out / "eval" / "summary.json"))
    p = summary["params"]
    # MiniLM-L6: 12 heads x 32, FFN 1536 -> 2 heads, FFN 256 per layer; word embedding rank 384 -> 64
    assert p["encoder_ratio"] > 5.5 and p["total_ratio"] > 8
    # --prune-vocabulary: word rows for the 64 training sentences' tokens and the special tokens, positions up to 24
    from transformers import AutoTokenizer

    from costeff.data import load_task
    from costeff.models import CostEffConfig

    tok = AutoTokenizer.from_pretrained(out / "student" / "model")
    texts = load_task("rotten_tomatoes", seed=0)[0]["train"]["text"][:64]
    seen = {i for row in tok(texts, truncation=True, max_length=24)["input_ids"] for i in row} | set(tok.all_special_ids)
    config = CostEffConfig.from_pretrained(out / "student" / "model")
    assert config.pruned_vocab_size == len(seen) < 1000 and config.vocab_size == tok.vocab_size and config.max_position_embeddings == 24
    rows = summary["rows"]
    teacher = rows[0]
    static = next(r for r in rows if r["model"] == "slim static")
    assert teacher["model"] == "teacher (HF)" and teacher["avg_exit_layer"] == 6
    assert static["flops_ratio"] > 5 and static["avg_exit_layer"] == 6
    eager_exit = next(r for r in rows if r["model"] == "COST-EFF slim" and r["threshold"] == 10.0)
    assert eager_exit["avg_exit_layer"] == 1 and eager_exit["flops_ratio"] > 5 * static["flops_ratio"]
    assert os.path.getsize(out / "eval" / "pareto.png") > 10_000
