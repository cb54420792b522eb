"""Early exit on ONNX Runtime: runs a directory written by ``costeff export --format onnx``.

The directory holds ``embeddings.onnx`` and one ``segment_<k>.onnx`` per exit (see
:mod:`costeff.models.segments`), ``costeff_onnx.json`` naming them, and the model directory's
config.json and tokenizer. :class:`OnnxEarlyExit` calls the graphs in order and between calls drops
the rows that left, with the same loop as ``early_exit`` (``run_exit_segments``), so it returns what
``early_exit`` returns. ``onnxruntime`` is optional: ``pip install -r requirements/onnx.txt``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from costeff._extension import MissingDependencyError
from costeff.models.modeling_costeff import EarlyExitOutput, prepare_inputs, run_exit_segments, trim_padding
from costeff.ops._checks import check_threshold

from costeff.inference.model_dir import FORMAT, MANIFEST, is_onnx_directory  # noqa: F401  (re-exported)

_INSTALL_HINT = (
    "needs onnxruntime and onnx, which costeff does not install by default: "
    "pip install -r requirements/onnx.txt (from the costeff repository) or pip install 'costeff[onnx]'"
)


def require_onnxruntime(what: str = "the ONNX runner"):
    """Imports onnxruntime or raises :class:`MissingDependencyError` saying how to install it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(f"{what} {_INSTALL_HINT} (import error: {exc})") from None
    return onnxruntime


def read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {MANIFEST}: not a directory written by `costeff export --format onnx`")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("segments"), list) or not manifest["segments"]:
        raise ValueError(f"{file} is not a costeff ONNX manifest (format {manifest.get('format')!r})")
    for name in [manifest.get("embeddings")] + [s.get("file") for s in manifest["segments"]]:
        if not name or not (path / name).is_file():
            raise FileNotFoundError(f"{path}: {MANIFEST} names {name!r}, which is missing: export again")
    return manifest


def _reads_mask(session) -> bool:
    # the exporter drops unused inputs: a graph that never reads the mask (a segment with 0 heads and a
    # CLS exit; embeddings without RoBERTa positions) has no attention_mask input
    return "attention_mask" in {i.name for i in session.get_inputs()}


class OnnxEarlyExit:
    """Entropy early exit over the exported segment graphs on ONNX Runtime (CPU by default).

    ``runner(input_ids, attention_mask, token_type_ids, threshold=...)`` checks its inputs like
    ``early_exit`` and returns an :class:`~costeff.models.EarlyExitOutput` (logits float32, exit_layer
    int64 1-based, entropy float32 in nats; rows in input order)."""

    def __init__(self, path, threads: Optional[int] = None, providers: Optional[list] = None):
        ort = require_onnxruntime()
        from costeff.models import CostEffConfig

        self.path = Path(os.fspath(path))
        if not self.path.is_dir():
            raise FileNotFoundError(f"ONNX model directory {self.path} does not exist")
        self.manifest = read_manifest(self.path)
        self.config = CostEffConfig.from_pretrained(self.path)
        self.precision = self.manifest.get("precision", "fp32")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # one session per segment: idle threads must not spin, or each session's pool steals the
        # cores the next segment (or the caller) is about to use
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = providers or ["CPUExecutionProvider"]

        def session(name):
            try:
                return ort.InferenceSession(str(self.path / name), so, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
                raise ValueError(f"{self.path / name}: onnxruntime cannot load it ({type(exc).__name__}: {exc})") from None

        self._embeddings = session(self.manifest["embeddings"])
        self._embeddings_read_mask = _reads_mask(self._embeddings)
        self._steps = [self._step(session(s["file"])) for s in self.manifest["segments"]]
        self.exit_layers = [int(s["exit_layer"]) for s in self.manifest["segments"]]
        if self.exit_layers != self.config.exit_layers():
            raise ValueError(f"{self.path}: the segments' exit layers {self.exit_layers} do not match config.json's "
                             f"{self.config.exit_layers()}: export again")

    def __repr__(self) -> str:
        return f"OnnxEarlyExit({str(self.path)!r}, precision={self.precision!r}, exits={self.exit_layers})"

    @staticmethod
    def _step(session):
        wants_mask = _reads_mask(session)

        def run(hidden, mask):
            feeds = {"hidden": np.ascontiguousarray(hidden.numpy())}
            if wants_mask:
                feeds["attention_mask"] = np.ascontiguousarray(mask.to(torch.int64).numpy())
            logits, entropy, hidden = session.run(None, feeds)
            return torch.from_numpy(logits), torch.from_numpy(entropy), torch.from_numpy(hidden)
        return run

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, threshold: float = 0.0) -> EarlyExitOutput:
        threshold = check_threshold("OnnxEarlyExit", threshold)
        ids, mask, types = prepare_inputs(self.config, input_ids, attention_mask, token_type_ids)
        if ids.device.type != "cpu":
            raise ValueError(f"OnnxEarlyExit: inputs must be CPU tensors, got {ids.device}")
        b = ids.shape[0]
        logits = torch.zeros(b, self.config.num_labels)
        entropy = torch.zeros(b)
        layer = torch.zeros(b, dtype=torch.long)
        if b:
            ids, mask, types = trim_padding(ids, mask, types)
            feeds = {"input_ids": np.ascontiguousarray(ids.numpy()), "token_type_ids": np.ascontiguousarray(types.numpy())}
            if self._embeddings_read_mask:
                feeds["attention_mask"] = np.ascontiguousarray(mask.to(torch.int64).numpy())
            (hidden,) = self._embeddings.run(None, feeds)
            run_exit_segments(self._steps, self.exit_layers, torch.from_numpy(hidden), mask, threshold, logits, entropy, layer)
        return EarlyExitOutput(logits=logits, exit_layer=layer, entropy=entropy)
