"""What a deployer touches: the one-call early-exit engine (:class:`InferenceEngine`), ``predict``,
threshold calibration, the Hugging Face pipeline, early exit on a GPU (:class:`GpuRunner`), and ONNX export with its runner
(:func:`export_onnx`, :class:`OnnxEarlyExit`; onnxruntime is optional).

Uses :mod:`costeff.models` and the compiled library, never the pipeline. The names below load on first
use, so that `costeff predict` and `costeff serve` start without transformers' model stack; the
"costeff-text-classification" pipeline task is registered with the model classes (``import costeff.models``)."""
from __future__ import annotations

import importlib

_NAMES = {
    "PRECISIONS": "engine", "InferenceEngine": "engine", "engine_isas": "engine",
    "GpuRunner": "gpu_runner",
    "CostEffTextClassificationPipeline": "hf_pipeline",
    "export_onnx": "onnx_export", "export_torch": "onnx_export",
    "OnnxEarlyExit": "onnx_runner",
}


def __getattr__(name: str):
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'costeff.inference' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"costeff.inference.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_NAMES))


__all__ = sorted(_NAMES)
