"""The early-exit inference engine: ``CostEffForSequenceClassification.early_exit`` as one C++ call
(csrc/engine/) on weights packed once, in fp32, bf16 or int8.

``early_exit`` stays the readable reference the engine is tested against. The engine keeps rows
unpadded, so padding costs nothing; attention, LayerNorm, softmax and entropy run in fp32, the linear
layers in the chosen precision, the exit classifiers in fp32. It is immutable after construction and
may be called from several threads at once; its parallel work follows ``torch.get_num_threads()``.

Its linear kernels come from one table per instruction set (csrc/engine/linear/), chosen when an
engine is built: ``isa=`` or else ``COSTEFF_ENGINE_ISA`` (``auto`` | ``portable`` | ``avx2`` |
``avx512`` | ``avx512_vnni`` | ``avx512_bf16``), by default the best this CPU runs; asking for one
the CPU lacks raises ValueError.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

from costeff._extension import require_extension
from costeff.ops._checks import check_threshold

if TYPE_CHECKING:
    from costeff.outputs import EarlyExitOutput

PRECISIONS = ("fp32", "bf16", "int8")


def engine_isas() -> dict:
    """The engine's instruction sets: ``{"known": [...], "supported": [...], "selected": name}``, worst
    to best; "selected" is what a new engine takes (``COSTEFF_ENGINE_ISA`` or the CPU's best)."""
    require_extension()
    known, supported, selected = torch.ops.costeff._engine_isas()
    return {"known": list(known), "supported": list(supported), "selected": selected}


def _check_isa(isa: Optional[str]) -> str:
    if isa is not None and not isinstance(isa, str):
        raise TypeError(f"InferenceEngine: isa must be a string or None, got {type(isa).__name__}")
    return "" if isa in (None, "") else isa


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"InferenceEngine: precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


class EngineOutput(NamedTuple):
    """What :meth:`InferenceEngine.run` returns: the fields of EarlyExitOutput, without transformers'
    ModelOutput (importing transformers costs ~0.8 s of a one-line ``costeff predict``)."""

    logits: torch.Tensor
    exit_layer: torch.Tensor
    entropy: torch.Tensor


class InferenceEngine:
    """Entropy early exit of a costeff classifier in one C++ call.

    Build with :meth:`from_model` (a loaded ``CostEffForSequenceClassification``) or
    :meth:`from_pretrained` (a model directory: ``config.json`` + ``model.safetensors``, read in C++).
    Call it like ``model.early_exit``: ``engine(input_ids, attention_mask, token_type_ids, threshold=...)``
    returns an :class:`~costeff.models.EarlyExitOutput` (logits float32, exit_layer int64 1-based,
    entropy float32 in nats; rows in input order)."""

    def __init__(self, handle, config=None, path: Optional[Path] = None):
        self._handle = handle
        self._config, self._path = config, path

    @property
    def config(self):
        """The model's CostEffConfig (read from the directory on first use: starting the engine needs no transformers)."""
        if self._config is None and self._path is not None:
            from costeff.models.configuration_costeff import CostEffConfig

            self._config = CostEffConfig.from_pretrained(self._path)
        return self._config

    @classmethod
    def from_model(cls, model: "CostEffForSequenceClassification", precision: str = "fp32", isa: Optional[str] = None) -> "InferenceEngine":
        """Packs ``model``'s weights (copied: later changes to the model do not reach the engine);
        ``isa`` picks the kernels' instruction set (default: ``COSTEFF_ENGINE_ISA`` or the CPU's best)."""
        require_extension()
        from costeff.models.modeling_costeff import CostEffForSequenceClassification

        if not isinstance(model, CostEffForSequenceClassification):
            raise TypeError(
                f"InferenceEngine.from_model needs a costeff CostEffForSequenceClassification, got {type(model).__name__}; "
                "convert a BERT with costeff.models.from_bert first"
            )
        _check_precision(precision)
        state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
        config_json = model.config.to_json_string(use_diff=False)
        return cls(torch.classes.costeff.InferenceEngine.build(state, config_json, precision, _check_isa(isa)), model.config)

    @classmethod
    def from_pretrained(cls, path, precision: str = "fp32", isa: Optional[str] = None) -> "InferenceEngine":
        """Builds from a saved model directory without instantiating the PyTorch model."""
        require_extension()
        _check_precision(precision)
        path = Path(os.fspath(path))
        if not path.is_dir():
            raise FileNotFoundError(f"InferenceEngine.from_pretrained: {path} is not a directory")
        handle = torch.classes.costeff.InferenceEngine.from_directory(str(path), precision, _check_isa(isa))
        return cls(handle, path=path)

    @property
    def precision(self) -> str:
        return self._handle.precision()

    @property
    def isa(self) -> str:
        """The instruction set the kernels use ("portable", "avx2", "avx512", "avx512_vnni", "avx512_bf16")."""
        return self._handle.isa()

    @property
    def num_labels(self) -> int:
        return self._handle.num_labels()

    def __repr__(self) -> str:
        return f"InferenceEngine(precision={self.precision!r}, isa={self.isa!r}, layers={self._handle.num_layers()}, labels={self.num_labels})"

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        threshold: float = 0.0,
    ) -> EarlyExitOutput:
        """A row leaves at the first exit whose softmax entropy (nats) is below ``threshold``; 0 runs
        every row to the last layer. Inputs are CPU tensors (input_ids int64/int32 [batch, seq_len],
        attention_mask 0/1, token_type_ids integer); bad inputs raise ValueError/TypeError."""
        from costeff.outputs import EarlyExitOutput

        return EarlyExitOutput.of(*self.run(input_ids, attention_mask, token_type_ids, threshold))

    def run(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None,
            threshold: float = 0.0) -> EngineOutput:
        """As calling the engine, as a plain named tuple (``predict`` and ``serve`` use it)."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"InferenceEngine: input_ids must be a Tensor, got {type(input_ids).__name__}")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"InferenceEngine: {name} must be a Tensor or None, got {type(t).__name__}")
        threshold = check_threshold("InferenceEngine", threshold)
        return EngineOutput(*self._handle.run(input_ids, attention_mask, token_type_ids, threshold))

    def session(self):
        """A continuous-batching session over this engine (costeff.inference.session.EngineSession)."""
        from costeff.inference.session import EngineSession

        return EngineSession(self)

    def profile(self, input_ids, attention_mask=None, token_type_ids=None, threshold: float = 0.0, repeats: int = 20) -> dict:
        """Wall-clock milliseconds per call spent in each stage ("embeddings", "layer<i>.qkv",
        ".attention", ".attn_out", ".norm1", ".ffn_in" (with GELU), ".ffn_out", ".norm2", ".exit"),
        averaged over ``repeats`` runs of the same inputs."""
        if repeats < 1:
            raise ValueError(f"InferenceEngine.profile: repeats must be >= 1, got {repeats}")
        secs = self._handle.profile(input_ids, attention_mask, token_type_ids, float(threshold), int(repeats))
        return {k: v * 1000 / repeats for k, v in secs.items()}

