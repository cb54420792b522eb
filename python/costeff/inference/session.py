"""Continuous batching at layer granularity: :class:`EngineSession` over an :class:`InferenceEngine`
(csrc/engine/session.h), the core of ``costeff serve``'s scheduler.

Rows are admitted at any time with a tag and a threshold each; every :meth:`EngineSession.step` takes
all rows in flight one layer deeper (rows at the same depth run as one batch) and returns the rows
that left at an exit in that step. A request is answered when its own rows have left, not when the
deepest row of some batch has, and rows of later requests start at layer 1 while earlier ones are
deeper. :meth:`finish` answers rows at once from the last exit they passed (a deadline), :meth:`drop`
forgets rows whose client has gone. One thread owns a session."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from costeff.ops._checks import check_threshold


class Finished(NamedTuple):
    """Rows that finished, in no particular order: their tags, logits [n, num_labels] (float32),
    1-based exit layers, entropies (nats) and whether a deadline forced the answer."""

    tags: torch.Tensor
    logits: torch.Tensor
    exit_layer: torch.Tensor
    entropy: torch.Tensor
    forced: torch.Tensor


def _tags(tags) -> torch.Tensor:
    return torch.as_tensor(list(tags) if not isinstance(tags, torch.Tensor) else tags, dtype=torch.long).reshape(-1)


class EngineSession:
    def __init__(self, engine):
        from costeff.inference.engine import InferenceEngine

        if not isinstance(engine, InferenceEngine):
            raise TypeError(f"EngineSession needs a costeff InferenceEngine, got {type(engine).__name__}")
        self.engine = engine
        self._handle = torch.classes.costeff.EngineSession(engine._handle)

    def admit(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None, *,
              tags: Sequence[int], thresholds) -> None:
        """Embeds the rows of ``input_ids`` (the engine's input rules) and puts them in flight; ``tags``
        (ints, unique among the rows in flight) name them in what :meth:`step` returns; ``thresholds``:
        one for all rows or one per row."""
        tags = _tags(tags)
        if isinstance(thresholds, (int, float)):
            thresholds = [check_threshold("EngineSession", thresholds)] * len(tags)
        else:
            thresholds = [check_threshold("EngineSession", float(t)) for t in thresholds]
        self._handle.admit(input_ids, attention_mask, token_type_ids, tags, torch.tensor(thresholds, dtype=torch.float64))

    def step(self) -> Finished:
        return Finished(*self._handle.step())

    def finish(self, tags: Sequence[int]) -> Finished:
        return Finished(*self._handle.finish(_tags(tags)))

    def drop(self, tags: Sequence[int]) -> int:
        return int(self._handle.drop(_tags(tags)))

    @property
    def rows(self) -> int:
        return int(self._handle.rows())

    @property
    def tokens(self) -> int:
        """Real tokens (and position 0) of the rows in flight."""
        return int(self._handle.tokens())

    def rows_per_depth(self) -> list[int]:
        """Rows in flight by layers done ([0]: admitted, not yet run)."""
        return list(self._handle.rows_per_depth())


class Delivered(NamedTuple):
    """What :meth:`SessionWorker.take` hands over: the finished rows as in :class:`Finished`, the
    seconds each waited before admission (``queue_s``) and ran (``inference_s``), and the tags of rows
    that failed with the reason (``error``; empty when none did)."""

    tags: torch.Tensor
    logits: torch.Tensor
    exit_layer: torch.Tensor
    entropy: torch.Tensor
    forced: torch.Tensor
    queue_s: torch.Tensor
    inference_s: torch.Tensor
    failed: torch.Tensor
    error: str


class SessionWorker:
    """An :class:`EngineSession` turned by a C++ thread of its own (csrc/engine/session_worker.h): rows
    are queued with :meth:`submit` from any thread, admitted while the session holds fewer than
    ``max_batch_tokens`` real tokens, stepped one layer per turn, answered at their deadline from the
    exit reached, dropped on :meth:`cancel`; :meth:`take` hands over every finished row at once. The
    engine never waits for the GIL between layers. ``thread=False``: no thread, :meth:`turn` by hand."""

    def __init__(self, engine, max_batch_tokens: int, thread: bool = True):
        from costeff.inference.engine import InferenceEngine

        if not isinstance(engine, InferenceEngine):
            raise TypeError(f"SessionWorker needs a costeff InferenceEngine, got {type(engine).__name__}")
        self.engine, self.threaded = engine, thread
        self._handle = torch.classes.costeff.SessionWorker(engine._handle, int(max_batch_tokens), bool(thread))

    def submit(self, ids: Sequence[Sequence[int]], types: Optional[Sequence[Sequence[int]]], *, tags: Sequence[int],
               thresholds: Sequence[float], deadlines_s: Optional[Sequence[Optional[float]]] = None) -> None:
        """Queues rows (token ids per row, unpadded; token types likewise or None), all or none; a
        deadline is seconds from now (None: none)."""
        flat = [t for row in ids for t in row]
        flat_types = [t for row in types for t in row] if types is not None else []
        deadlines = [-1.0 if d is None else max(0.0, float(d)) for d in (deadlines_s or [None] * len(tags))]
        self._handle.submit(flat, [len(r) for r in ids], flat_types, list(tags), [float(t) for t in thresholds], deadlines)

    def cancel(self, tags: Sequence[int]) -> None:
        self._handle.cancel(list(tags))

    def take(self, timeout_s: float = 0.0) -> Delivered:
        return Delivered(*self._handle.take(float(timeout_s)))

    def turn(self) -> bool:
        return bool(self._handle.turn())

    def stop(self) -> None:
        self._handle.stop()

    def finished(self) -> bool:
        return bool(self._handle.finished())

    def rows_per_depth(self) -> list[int]:
        return list(self._handle.rows_per_depth())

    def queued_rows(self) -> int:
        return int(self._handle.queued_rows())
