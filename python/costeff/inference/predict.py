"""Classify text with a saved costeff model directory: `costeff predict` and :class:`Predictor`.

A model directory is what the pipeline saves (config.json + model.safetensors + the tokenizer, with the
task's label names in the config and, once calibrated, ``inference_threshold``). Texts stream in (a line
each, or a column of a CSV / JSON Lines file) and JSON Lines stream out, one record per input line in
input order, so memory stays bounded whatever the corpus size. ``--num-shards N --shard-index I`` keeps
the lines i with i % N == I, so Slurm arrays, torchrun or Ray can split a corpus without overlap.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional, TextIO

import torch

from costeff._extension import extension_loaded
from costeff.ops._checks import check_threshold

_NO_TOKENIZER = (
    "{path} has no tokenizer (tokenizer.json / tokenizer_config.json / vocab.txt): it was saved before model "
    "directories carried one. Pass --tokenizer PATH (the backbone the model was trained from)."
)


def load_model_config(path: Path):
    """The CostEffConfig of a model directory, with clear errors for what is not one."""
    from costeff.inference.model_dir import check_costeff_type, read_config_json
    from costeff.models import CostEffConfig

    check_costeff_type(path, read_config_json(path))
    return CostEffConfig.from_pretrained(path)


def _engine_config_of(path: Path):
    """What Predictor reads of a model directory: through the engine's reader when the extension is
    built (no transformers), else from CostEffConfig."""
    from costeff.inference.model_dir import engine_config_from, read_engine_config

    if extension_loaded():
        return read_engine_config(path)
    cfg = load_model_config(path)
    return engine_config_from(cfg, cfg.inference_threshold)


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))


class Predictor:
    """Tokenizer + early-exit classifier of a model directory. Runs on the C++ engine when the
    extension is built (``precision`` fp32 (default) / bf16 / int8), else on the model's
    ``early_exit``; a directory written by ``costeff export --format onnx`` runs on ONNX Runtime.
    ``backend="pytorch"`` forces ``early_exit`` (kernels when built) on a model directory. ``device``
    "cuda"/"cuda:N" (or "auto" with a GPU visible) runs :class:`~costeff.inference.GpuRunner` there
    (precision fp32 or bf16)."""

    def __init__(self, model_dir, precision: Optional[str] = None, threshold: Optional[float] = None, tokenizer=None,
                 backend: Optional[str] = None, device: str = "cpu"):
        from costeff.inference.model_dir import DirTokenizer

        path = Path(os.fspath(model_dir))
        self.config = _engine_config_of(path)
        tok_path = Path(os.fspath(tokenizer)) if tokenizer is not None else path
        if tokenizer is not None and not _has_tokenizer(tok_path):
            raise FileNotFoundError(f"--tokenizer {tok_path} holds no tokenizer (tokenizer.json / tokenizer_config.json / vocab.txt)")
        if tokenizer is None and not _has_tokenizer(path):
            raise FileNotFoundError(_NO_TOKENIZER.format(path=path))
        self._tok_path = tok_path
        self._hf_tokenizer = None
        self.encoder = DirTokenizer(tok_path)
        self.max_length = self.encoder.max_length(self.config.max_positions)
        self.labels = self.config.labels
        self.notice = None
        if threshold is not None:
            self.threshold = check_threshold("predict", threshold)
        elif self.config.inference_threshold is not None:
            self.threshold = float(self.config.inference_threshold)
        else:
            self.threshold = 0.0
            self.notice = f"{path}: no calibrated threshold (config inference_threshold): every input runs to the last layer (threshold 0); pass --threshold NATS to exit early"
        from costeff.inference.model_dir import is_onnx_directory

        if backend not in (None, "engine", "pytorch"):
            raise ValueError(f"backend must be None (automatic), 'engine' or 'pytorch', got {backend!r}")
        self.engine = None
        from costeff.device import resolve_device

        on = resolve_device(device, "predict --device")
        if on.type == "cuda":
            if is_onnx_directory(path) or backend is not None:
                raise ValueError(f"predict --device {device}: a GPU runs the model directory on GpuRunner; ONNX exports and "
                                 "--backend run on the CPU")
            if precision not in (None, "fp32", "bf16"):
                raise ValueError(f"predict --device {device}: precision {precision} runs on the CPU engine; on a GPU use fp32 or bf16")
            from costeff.inference.gpu_runner import GpuRunner
            from costeff.models import CostEffForSequenceClassification

            runner = GpuRunner(CostEffForSequenceClassification.from_pretrained(path).eval(), device=str(on), precision=precision or "fp32")
            self.backend = f"gpu {runner.precision} ({on})"
            self._run = lambda ids, mask, types: _on_cpu(runner(ids, mask, types, threshold=self.threshold))
        elif is_onnx_directory(path):  # written by `costeff export --format onnx`: its precision was fixed there
            from costeff.inference.onnx_runner import OnnxEarlyExit

            runner = OnnxEarlyExit(path)
            if precision is not None and precision != runner.precision:
                raise ValueError(f"{path} is an ONNX export in {runner.precision}; --precision {precision} needs another export")
            self.backend = f"onnxruntime {runner.precision}"
            self._run = lambda ids, mask, types: runner(ids, mask, types, threshold=self.threshold)
        elif backend == "engine" or (backend is None and extension_loaded()):
            from costeff.inference.engine import InferenceEngine

            self.engine = InferenceEngine.from_pretrained(path, precision or "fp32")
            self.backend = f"engine {self.engine.precision}"
            self._run = lambda ids, mask, types: self.engine.run(ids, mask, types, threshold=self.threshold)  # no transformers import
        else:
            from costeff.models import CostEffForSequenceClassification

            model = CostEffForSequenceClassification.from_pretrained(path).eval()
            self.backend = "pytorch"
            self._run = lambda ids, mask, types: model.early_exit(ids, mask, types, threshold=self.threshold)
        self.truncated = 0

    @property
    def tokenizer(self):
        """The directory's transformers tokenizer (loaded on first use: calibration's data loaders want it)."""
        if self._hf_tokenizer is None:
            from transformers import AutoTokenizer

            self._hf_tokenizer = AutoTokenizer.from_pretrained(self._tok_path)
        return self._hf_tokenizer

    def __call__(self, texts: list[str], pairs: Optional[list[str]] = None, probs: bool = False) -> list[dict]:
        """One record per text: label (name), score (its softmax probability), exit_layer [, probs]."""
        if not texts:
            return []
        from costeff.inference.model_dir import pad_rows

        ids, types = self.encoder.encode(texts, pairs)  # over-long inputs are counted and reported once below
        over = sum(len(x) > self.max_length for x in ids)
        if over:
            self.truncated += over
            ids, types = self.encoder.encode(texts, pairs, max_length=self.max_length)
        ids, mask, types = pad_rows(ids, types if self.config.type_vocab_size > 1 else None, self.encoder.pad_token_id)  # families without token types
        with torch.inference_mode():
            out = self._run(ids, mask, types)
        p = torch.softmax(out.logits.float(), -1)
        best = p.argmax(-1)
        records = []
        for i in range(len(texts)):
            rec = {"label": self.labels[int(best[i])], "score": round(float(p[i, best[i]]), 6), "exit_layer": int(out.exit_layer[i])}
            if probs:
                rec["probs"] = {name: round(float(p[i, k]), 6) for k, name in enumerate(self.labels)}
            records.append(rec)
        return records


def _on_cpu(out):
    """An EarlyExitOutput with its tensors on the CPU (one copy each, where the records are built)."""
    from costeff.models.modeling_costeff import EarlyExitOutput

    return EarlyExitOutput.of(out.logits.cpu(), out.exit_layer.cpu(), out.entropy.cpu())


def read_inputs(stream: TextIO, fmt: str, text_column: Optional[str], pair_column: Optional[str]) -> Iterator[tuple[str, Optional[str]]]:
    """Yields (text, pair) per input record, streaming. fmt: lines | csv | jsonl."""
    if fmt == "lines":
        for line in stream:
            yield line.rstrip("\n").rstrip("\r"), None
        return
    if not text_column:
        raise ValueError(f"--text-column is required for {fmt} input")
    if fmt == "csv":
        reader = csv.DictReader(stream)
        missing = [c for c in (text_column, pair_column) if c and c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"CSV input has no column {missing[0]!r} (columns: {reader.fieldnames})")
        for row in reader:
            yield row.get(text_column) or "", (row.get(pair_column) or "") if pair_column else None
        return
    for n, line in enumerate(stream):
        if not line.strip():
            yield "", None
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"JSON Lines input, line {n}: not valid JSON") from None
        if not isinstance(obj, dict) or text_column not in obj:
            raise ValueError(f"JSON Lines input, line {n}: no field {text_column!r}")
        yield str(obj[text_column] or ""), (str(obj.get(pair_column) or "") if pair_column else None)


def predict_stream(predictor: Predictor, records: Iterable[tuple[str, Optional[str]]], out: TextIO, batch_size: int = 32,
                   probs: bool = False, num_shards: int = 1, shard_index: int = 0, progress=None) -> int:
    """Classifies `records` in batches and writes a JSON line per kept record (in input order, with its
    0-based input index as "line"); returns how many were written."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index must be in [0, --num-shards={num_shards}), got {shard_index}")
    written = 0
    pending: list[tuple[int, str, Optional[str]]] = []

    def flush():
        nonlocal written
        ok = [(i, t, p) for i, t, p in pending if t.strip()]
        res = iter(predictor([t for _, t, _ in ok], [p or "" for _, _, p in ok] if ok and ok[0][2] is not None else None, probs))
        done = {i: r for (i, _, _), r in zip(ok, res)}
        for i, text, _ in pending:
            rec = {"line": i, **done[i]} if i in done else {"line": i, "error": "empty input"}
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            written += 1
        pending.clear()

    for i, (text, pair) in enumerate(records):
        if progress is not None:
            progress.update(1)
        if i % num_shards != shard_index:
            continue
        pending.append((i, text, pair))
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    out.flush()
    return written


def main_predict(args) -> int:
    """`costeff predict` (arguments from costeff.cli)."""
    if args.threshold is not None:
        check_threshold("costeff predict", args.threshold, "--threshold")
    predictor = Predictor(args.model, args.precision, args.threshold, args.tokenizer, device=getattr(args, "device", None) or "cpu")
    if predictor.notice:
        print(f"costeff predict: {predictor.notice}", file=sys.stderr)
    fmt = args.format
    src = args.input
    if fmt is None:
        suffix = Path(src).suffix.lower() if src and src != "-" else ""
        fmt = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}.get(suffix, "lines")
    if src and src != "-" and not Path(src).is_file():
        raise FileNotFoundError(f"input file {src} does not exist")
    stream = open(src, encoding="utf-8", newline="" if fmt == "csv" else None) if src and src != "-" else sys.stdin
    tmp = None
    if args.output:  # written next to the target and renamed at the end: nothing half-written on an error
        out_dir = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(out_dir):
            raise FileNotFoundError(f"--output directory {out_dir} does not exist")
        tmp = args.output + ".partial"
        out = open(tmp, "w", encoding="utf-8")
    else:
        out = sys.stdout
    bar = None
    ok = False
    try:
        if stream is not sys.stdin and not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(desc="predict", unit=" lines", file=sys.stderr)
        predict_stream(predictor, read_inputs(stream, fmt, args.text_column, args.text_pair_column), out, args.batch_size,
                       args.probs, args.num_shards, args.shard_index, bar)
        ok = True
    finally:
        if bar is not None:
            bar.close()
        if stream is not sys.stdin:
            stream.close()
        if tmp is not None:
            out.close()
            if ok:
                os.replace(tmp, args.output)
            else:
                os.unlink(tmp)
    if predictor.truncated:
        print(f"costeff predict: {predictor.truncated} input(s) longer than {predictor.max_length} tokens were truncated", file=sys.stderr)
    return 0
