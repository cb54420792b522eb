"""`costeff export --format onnx`: a model directory as ONNX graphs that keep the early exit.

Writes ``embeddings.onnx`` (input_ids, token_type_ids[, attention_mask] -> hidden), one ``segment_<k>.onnx`` per exit
(hidden, attention_mask -> logits, entropy, hidden; :mod:`costeff.models.segments`), all with dynamic
batch and sequence axes, plus ``costeff_onnx.json`` and the model directory's config.json, tokenizer
and model card, so the output is a directory ``costeff predict --model`` and
:class:`~costeff.inference.onnx_runner.OnnxEarlyExit` run as they are. Another runtime reproduces
the early exit by calling the segments in order and keeping only the rows whose entropy is not
below the threshold (any rows may be dropped between calls).

``precision="int8"`` quantizes each segment's matrix products with onnxruntime's dynamic
quantization (int8 weights per output channel, activations per call). The export is written to
``<output>.partial`` and renamed once it loaded back and matched the PyTorch model.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch

from costeff.inference.onnx_runner import FORMAT, MANIFEST, OnnxEarlyExit, require_onnxruntime

OPSET = 17
PRECISIONS = ("fp32", "int8")
_AXES = {0: "batch", 1: "sequence"}


def _example_inputs(config, batch: int = 3, seq: int = 16, seed: int = 0):
    seq = max(1, min(seq, config.max_position_embeddings - (config.position_offset or 0)))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    types = torch.randint(0, config.type_vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq // 2:] = 0
    return ids, mask, types


def _export_graphs(model, out: Path) -> list[dict]:
    import onnx

    from costeff.models.segments import EmbeddingSegment, exit_segments

    ids, mask, types = _example_inputs(model.config)
    emb = EmbeddingSegment(model)
    with warnings.catch_warnings(), torch.no_grad():
        # the tracer warns at every Python branch on shapes; those branches are static per model
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(emb, (ids, types, mask), str(out / "embeddings.onnx"), opset_version=OPSET, dynamo=False,
                          input_names=["input_ids", "token_type_ids", "attention_mask"], output_names=["hidden"],
                          dynamic_axes={"input_ids": _AXES, "token_type_ids": _AXES, "attention_mask": _AXES, "hidden": _AXES})
        hidden = emb(ids, types, mask)
        embeddings_inputs = [i.name for i in onnx.load(str(out / "embeddings.onnx"), load_external_data=False).graph.input]
        segments = []
        for k, seg in enumerate(exit_segments(model)):
            name = f"segment_{k}.onnx"
            torch.onnx.export(seg, (hidden, mask), str(out / name), opset_version=OPSET, dynamo=False,
                              input_names=["hidden", "attention_mask"], output_names=["logits", "entropy", "hidden_out"],
                              dynamic_axes={"hidden": _AXES, "attention_mask": _AXES, "logits": {0: "batch"},
                                            "entropy": {0: "batch"}, "hidden_out": _AXES})
            first = segments[-1]["exit_layer"] + 1 if segments else 1
            inputs = [i.name for i in onnx.load(str(out / name), load_external_data=False).graph.input]
            segments.append({"file": name, "layers": list(range(first, seg.exit_layer + 1)), "exit_layer": seg.exit_layer,
                             "inputs": inputs})
            hidden = seg(hidden, mask)[2]
    return embeddings_inputs, segments


def _quantize(out: Path, segments: list[dict]) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # quantize_dynamic advises shape pre-processing on every call
    try:
        for seg in segments:
            src = out / seg["file"]
            tmp = out / (seg["file"] + ".int8")
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            os.replace(tmp, src)
    finally:
        logging.disable(logging.NOTSET)


def _verify(model, out: Path, precision: str) -> float:
    """Runs the export on an example batch at full depth; returns the largest logit difference to
    the PyTorch reference path (raises when an fp32 export disagrees)."""
    ids, mask, types = _example_inputs(model.config, batch=4, seq=12, seed=1)
    ref = model.early_exit(ids, mask, types, threshold=0.0, use_kernels=False)
    got = OnnxEarlyExit(out, threads=1)(ids, mask, types, threshold=0.0)
    err = float((got.logits - ref.logits.float()).abs().max())
    scale = float(ref.logits.abs().max()) + 1.0
    if precision == "fp32" and not err <= 1e-3 * scale:
        raise RuntimeError(f"costeff export: the ONNX graphs disagree with the PyTorch model (max logit difference {err:.3g}); "
                           "please report this with the model's config.json")
    return err


def export_onnx(model_dir, output, precision: str = "fp32", overwrite: bool = False) -> dict:
    """Exports the model directory ``model_dir`` to the directory ``output``; returns the manifest."""
    require_onnxruntime("costeff export --format onnx")
    from costeff.inference.predict import load_model_config
    from costeff.models import CostEffForSequenceClassification

    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS} for ONNX, got {precision!r}")
    src = Path(os.fspath(model_dir))
    config = load_model_config(src)
    out = Path(os.fspath(output))
    if out.resolve() == src.resolve():
        raise ValueError("--output must differ from --model")
    if out.exists() and not overwrite:
        raise ValueError(f"--output {out} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--output's parent directory {out.parent} does not exist")
    model = CostEffForSequenceClassification.from_pretrained(src).float().eval()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        embeddings_inputs, segments = _export_graphs(model, tmp)
        if precision == "int8":
            _quantize(tmp, segments)
        for f in src.iterdir():  # config, tokenizer, model card, calibration: everything but the weights
            if f.is_file() and f.suffix not in (".safetensors", ".bin", ".pt", ".partial") and f.name != MANIFEST:
                shutil.copy2(f, tmp / f.name)
        manifest = {
            "format": FORMAT, "version": 1, "precision": precision, "opset": OPSET,
            "embeddings": "embeddings.onnx", "embeddings_inputs": embeddings_inputs, "segments": segments,
            "outputs": {"embeddings": ["hidden"], "segments": ["logits", "entropy", "hidden_out"]},
            "note": "a graph has attention_mask among its inputs only when it reads it (RoBERTa-style positions; attention; "
                    "mean-pooled exits)",
            "num_labels": config.num_labels, "inference_threshold": config.inference_threshold,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        manifest["max_logit_difference"] = _verify(model, tmp, precision)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def export_torch(model, example: Optional[tuple] = None):
    """``torch.export`` programs of ``model``'s embeddings and every exit segment, with dynamic batch
    and sequence sizes: ``(embeddings_program, [segment_programs])``. ``example`` is
    (input_ids, attention_mask, token_type_ids); a small random batch by default."""
    from costeff.models.segments import EmbeddingSegment, exit_segments

    ids, mask, types = example if example is not None else _example_inputs(model.config)
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("sequence", min=1, max=model.config.max_position_embeddings - (model.config.position_offset or 0))
    dims = ({0: batch, 1: seq}, {0: batch, 1: seq})
    emb = EmbeddingSegment(model)
    with torch.no_grad():
        programs = [torch.export.export(emb, (ids, types, mask), dynamic_shapes=dims + ({0: batch, 1: seq},))]
        hidden = emb(ids, types, mask)
        for seg in exit_segments(model):
            programs.append(torch.export.export(seg, (hidden, mask), dynamic_shapes=dims))
            hidden = seg(hidden, mask)[2]
    return programs[0], programs[1:]
