"""A plain fine-tuned ``*ForSequenceClassification`` directory (no early exit) behind the same call as
the engine: what a user serves without costeff, and the baseline ``costeff serve`` and the benchmarks
compare with.

:class:`ClassifierRunner` runs it on PyTorch (``precision="fp32"``) or on ONNX Runtime with int8
weights (``precision="int8"``: an opset-17 export quantized with onnxruntime's ``quantize_dynamic``,
QInt8 weights, the ONNX Runtime int8 teacher of ``benchmarks/bench_anchors.py``, built once at load
time in a temporary directory). ``runner(input_ids, attention_mask, token_type_ids, threshold=...)``
returns an :class:`~costeff.models.EarlyExitOutput` whose exit layer is always the last one (the
threshold is accepted and ignored: there is no earlier exit).
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

from costeff.ops._checks import check_threshold

PRECISIONS = ("fp32", "int8")
OPSET = 17


def is_classifier_directory(path) -> bool:
    """A Hugging Face model directory whose config names a ``*ForSequenceClassification`` architecture
    (and is not a costeff model)."""
    file = Path(os.fspath(path)) / "config.json"
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError):
        return False
    return raw.get("model_type") != "costeff_bert" and any(str(a).endswith("ForSequenceClassification") for a in raw.get("architectures") or ())


def export_classifier_onnx(model, path: str, int8: bool) -> str:
    """Writes ``model`` (a ``*ForSequenceClassification``) as ONNX with dynamic batch and sequence axes to
    ``path`` (fp32), and with ``int8`` a dynamically quantized copy beside it; returns the file to run."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ids = torch.ones(2, 16, dtype=torch.long)
    axes = {0: "batch", 1: "seq"}
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if _takes_token_types(model) else [])
    args = (ids, torch.ones_like(ids)) + ((torch.zeros_like(ids),) if len(names) == 3 else ())
    with warnings.catch_warnings(), torch.no_grad():
        # the tracer warns at shape branches in transformers' masking; the test serves other shapes than traced
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(model, args, path, opset_version=OPSET, dynamo=False, input_names=names, output_names=["logits"],
                          dynamic_axes={**{n: axes for n in names}, "logits": {0: "batch"}})
    if not int8:
        return path
    out = path.replace(".onnx", "_int8.onnx")
    quantize_dynamic(path, out, weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return out


def _takes_token_types(model) -> bool:
    return getattr(model.config, "type_vocab_size", 1) > 1


class ClassifierRunner:
    """The engine's call over a plain fine-tuned classifier directory (see the module docstring)."""

    def __init__(self, path, precision: str = "fp32", threads: Optional[int] = None):
        from transformers import AutoModelForSequenceClassification

        self.path = Path(os.fspath(path))
        if precision not in PRECISIONS:
            raise ValueError(f"a plain classifier runs in {PRECISIONS}, got precision {precision!r}")
        if not is_classifier_directory(self.path):
            raise ValueError(f"{self.path} is not a *ForSequenceClassification model directory")
        self.precision = precision
        model = AutoModelForSequenceClassification.from_pretrained(self.path, attn_implementation="sdpa").eval()
        self.config = model.config
        self.num_layers = int(model.config.num_hidden_layers)
        self.token_types = _takes_token_types(model)
        if precision == "fp32":
            self._model, self._session = model, None
            return
        from costeff.inference.onnx_runner import require_onnxruntime

        ort = require_onnxruntime("ClassifierRunner int8")
        with tempfile.TemporaryDirectory(prefix="costeff-classifier-") as tmp:
            file = export_classifier_onnx(model, os.path.join(tmp, "model.onnx"), int8=True)
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads or torch.get_num_threads()
            so.inter_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._session = ort.InferenceSession(file, so, providers=["CPUExecutionProvider"])
        self._model = None

    def __repr__(self) -> str:
        return f"ClassifierRunner({str(self.path)!r}, precision={self.precision!r})"

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, threshold: float = 0.0):
        from costeff.models import EarlyExitOutput

        check_threshold("ClassifierRunner", threshold)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.token_types:
            feeds["token_type_ids"] = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        if self._session is not None:
            logits = torch.from_numpy(self._session.run(None, {k: v.numpy() for k, v in feeds.items()})[0])
        else:
            with torch.inference_mode():
                logits = self._model(**feeds).logits.float()
        logp = torch.log_softmax(logits, -1)
        entropy = -(logp.exp() * logp).sum(-1)
        return EarlyExitOutput.of(logits, torch.full((len(logits),), self.num_layers, dtype=torch.long), entropy)
