"""Reading a model directory without importing transformers: what `costeff predict` and `costeff serve`
need to start in about the time of `import torch`.

- :func:`read_engine_config`: config.json checked as :func:`~costeff.inference.predict.load_model_config`
  checks it, read by the C++ engine's own config reader (its defaults are CostEffConfig's; the tests
  compare the two field by field), plus the label names and the calibrated threshold.
- :class:`DirTokenizer`: the directory's ``tokenizer.json`` on the Rust ``tokenizers`` library (the
  same ids as the transformers tokenizer built from it; no padding, truncation on request), with the
  ``model_max_length`` and pad token of ``tokenizer_config.json``. A directory without
  ``tokenizer.json`` (only a vocabulary) falls back to transformers' ``AutoTokenizer``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

COSTEFF_MODEL_TYPE = "costeff_bert"
MANIFEST = "costeff_onnx.json"  # what `costeff export --format onnx` writes beside its graphs
FORMAT = "costeff-onnx"


def is_onnx_directory(path) -> bool:
    return (Path(os.fspath(path)) / MANIFEST).is_file()


def read_config_json(path: Path) -> dict:
    """config.json of a model directory, with clear errors for what is not one."""
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a saved model directory")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_file} is not valid JSON ({exc})") from None


def check_costeff_type(path: Path, raw: dict) -> None:
    model_type = raw.get("model_type")
    if model_type != COSTEFF_MODEL_TYPE:
        raise ValueError(
            f"{path} holds a '{model_type}' model, not a costeff model: train one with `costeff pipeline` "
            "(its student is in <output>/student/model), or convert a BERT with costeff.models.from_bert"
        )


def label_names(id2label: Optional[dict], num_labels: int) -> list[str]:
    id2label = id2label or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(num_labels)]


@dataclass
class EngineConfig:
    """The fields of a costeff model directory that predict and serve read."""

    num_labels: int
    labels: list
    num_hidden_layers: int
    max_positions: int  # positions a row may use (max_position_embeddings less RoBERTa's offset)
    type_vocab_size: int
    inference_threshold: Optional[float]


def engine_config_from(cfg, inference_threshold: Optional[float]) -> EngineConfig:
    """The same fields from a transformers config (a CostEffConfig, or a plain classifier's)."""
    return EngineConfig(num_labels=int(cfg.num_labels), labels=label_names(cfg.id2label, int(cfg.num_labels)),
                        num_hidden_layers=int(cfg.num_hidden_layers),
                        max_positions=int(cfg.max_position_embeddings - (getattr(cfg, "position_offset", None) or 0)),
                        type_vocab_size=int(getattr(cfg, "type_vocab_size", 1)),
                        inference_threshold=None if inference_threshold is None else float(inference_threshold))


def read_engine_config(path) -> EngineConfig:
    """A costeff model directory's config through the engine's reader (needs the compiled extension)."""
    import torch

    from costeff._extension import require_extension

    path = Path(os.fspath(path))
    raw = read_config_json(path)
    check_costeff_type(path, raw)
    require_extension()
    view = json.loads(torch.ops.costeff._engine_config(json.dumps(raw)))
    threshold = raw.get("inference_threshold")
    return EngineConfig(num_labels=int(view["num_labels"]), labels=label_names(raw.get("id2label"), int(view["num_labels"])),
                        num_hidden_layers=int(view["num_hidden_layers"]),
                        max_positions=int(view["max_position_embeddings"]) - int(view["position_offset"]),
                        type_vocab_size=int(view["type_vocab_size"]), inference_threshold=None if threshold is None else float(threshold))


def _token_content(value) -> Optional[str]:
    return value.get("content") if isinstance(value, dict) else value


class DirTokenizer:
    """A model directory's tokenizer as lists of ids (see the module docstring)."""

    def __init__(self, path):
        path = Path(os.fspath(path))
        settings = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins, as in transformers
            f = path / name
            if f.is_file():
                try:
                    settings.update(json.loads(f.read_text()))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{f} is not valid JSON ({exc})") from None
        limit = settings.get("model_max_length")
        self.model_max_length = int(limit) if isinstance(limit, (int, float)) and 0 < limit < 10**9 else None
        self._hf = None
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self._free = Tokenizer.from_file(str(path / "tokenizer.json"))
            self._free.no_padding()
            self._free.no_truncation()
            pad = _token_content(settings.get("pad_token"))
            pad_id = self._free.token_to_id(pad) if pad else None
        else:  # a vocabulary only: transformers builds the tokenizer
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(path)
            limit = self._hf.model_max_length
            self.model_max_length = limit if limit and limit < 10**9 else None
            pad_id = self._hf.pad_token_id
        self.pad_token_id = int(pad_id) if pad_id is not None else 0
        self._cut: dict[int, object] = {}

    def max_length(self, max_positions: int) -> int:
        """Tokens a row may have: the tokenizer's model_max_length, within the model's positions."""
        return min(self.model_max_length or max_positions, max_positions)

    def _truncating(self, max_length: int):
        if max_length not in self._cut:
            from tokenizers import Tokenizer

            cut = Tokenizer.from_str(self._free.to_str())
            cut.enable_truncation(max_length)  # longest_first, as transformers' truncation=True
            self._cut[max_length] = cut
        return self._cut[max_length]

    def encode(self, texts: list[str], pairs: Optional[list[str]] = None, max_length: Optional[int] = None) -> tuple[list, list]:
        """(input ids, token type ids) per text, with special tokens, unpadded; truncated to ``max_length``
        tokens when given."""
        if self._hf is not None:
            enc = self._hf(texts, pairs, truncation=max_length is not None, max_length=max_length, verbose=False)
            ids = enc["input_ids"]
            return ids, enc.get("token_type_ids") or [[0] * len(x) for x in ids]
        tok = self._free if max_length is None else self._truncating(max_length)
        if len(texts) == 1:  # encode_batch costs ~2x encode for one text (its thread pool)
            out = [tok.encode(texts[0]) if pairs is None else tok.encode(texts[0], pairs[0])]
        else:
            out = tok.encode_batch(texts if pairs is None else list(zip(texts, pairs)))
        return [e.ids for e in out], [e.type_ids for e in out]


def pad_rows(ids: list, types: Optional[list], pad_id: int = 0, always_mask: bool = True):
    """input_ids, attention_mask and token_type_ids (None without ``types``) as [rows, longest] int64
    tensors, right-padded; ``always_mask=False``: the mask is None where no row is padded. Built
    in numpy and shared with ``torch.from_numpy``: for a served sentence ``torch.tensor`` on nested lists
    (or a tensor op such as ``view``) costs several microseconds, a sizeable part of the engine's call."""
    import numpy as np
    import torch

    lengths = [len(x) for x in ids]
    s = max(lengths)
    ragged = any(n != s for n in lengths)

    def padded(rows, fill):
        if not ragged:
            return torch.from_numpy(np.array(rows, dtype=np.int64).reshape(len(rows), s))
        out = np.full((len(rows), s), fill, dtype=np.int64)
        for i, x in enumerate(rows):
            out[i, :len(x)] = x
        return torch.from_numpy(out)

    mask = torch.from_numpy((np.arange(s) < np.array(lengths)[:, None]).astype(np.int64)) if ragged or always_mask else None
    return padded(ids, pad_id), mask, padded(types, 0) if types is not None else None
