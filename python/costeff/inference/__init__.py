"""What a deployer touches: the one-call early-exit engine (:class:`InferenceEngine`), ``predict``,
threshold calibration, the Hugging Face pipeline, early exit on a GPU (:class:`GpuRunner`), and ONNX export with its runner
(:func:`export_onnx`, :class:`OnnxEarlyExit`; onnxruntime is optional).

Uses :mod:`costeff.models` and the compiled library, never the pipeline."""
from costeff.inference.engine import PRECISIONS, InferenceEngine, engine_isas
from costeff.inference.gpu_runner import GpuRunner
from costeff.inference.hf_pipeline import CostEffTextClassificationPipeline  # registers "costeff-text-classification"
from costeff.inference.onnx_export import export_onnx, export_torch
from costeff.inference.onnx_runner import OnnxEarlyExit

__all__ = ["CostEffTextClassificationPipeline", "GpuRunner", "InferenceEngine", "OnnxEarlyExit", "PRECISIONS", "engine_isas", "export_onnx", "export_torch"]
