"""The two schedulers of ``costeff serve``, each one worker thread in front of the engine.

- :class:`LayerScheduler` (default): continuous batching at layer granularity over an
  EngineSession, turned by a C++ thread (costeff.inference.session.SessionWorker). Each turn admits
  queued rows (up to ``max_batch_tokens`` in flight), answers rows whose deadline has passed from the
  exit they reached, forgets rows whose client has gone, and runs one step: every row in flight goes
  one layer deeper and the rows that exit are answered at once. The Python thread only hands answers
  over, a batch of finished rows at a time.
- :class:`BatchScheduler` (``--scheduler batch``, the baseline of TEI / Triton / Ray Serve): waits
  up to ``max_wait_ms`` for rows, runs them as one engine call per threshold, answers all of them when
  the call (its deepest row) is done.

Rows carry a ``concurrent.futures.Future``: the worker resolves it, the HTTP handler awaits it and
cancels it when its client goes away. Admission is by tokens: over ``max_queue_tokens`` queued and in
flight, :meth:`Scheduler.submit` raises :class:`Overloaded` with an estimate of when to retry.
"""
from __future__ import annotations

import atexit
import collections
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional

import torch

from costeff.inference.engine import InferenceEngine
from costeff.inference.model_dir import pad_rows
from costeff.ops._checks import check_threshold


class Overloaded(Exception):
    def __init__(self, retry_after_s: float, tokens: int, limit: int, why: Optional[str] = None):
        retry_after_s = max(0.05, min(30.0, retry_after_s))
        super().__init__(f"{why or f'the server holds {tokens} tokens (limit {limit})'}; retry in {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class Stopped(Exception):
    """The scheduler is shutting down and takes no new rows."""


@dataclass
class Row:
    ids: list
    types: Optional[list]
    threshold: Optional[float] = None  # None: the scheduler's threshold in force when the row starts
    deadline: Optional[float] = None  # time.monotonic() after which the row is answered from where it is
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    started: Optional[float] = None

    @property
    def tokens(self) -> int:
        return len(self.ids)


@dataclass
class Result:
    logits: list
    exit_layer: int
    entropy: float
    forced: bool
    threshold: float
    queue_s: float
    inference_s: float


def pad(rows: list[Row]) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """input_ids, attention_mask and token_type_ids, right-padded; the mask is None where no row is padded
    and the types None where all are 0, as every runner reads None (all real, type 0): for one sentence,
    one tensor to make and to check instead of three."""
    ids = [r.ids for r in rows]
    types = [r.types for r in rows] if rows[0].types is not None else None
    if types is not None and not any(map(any, types)):
        types = None
    return pad_rows(ids, types, always_mask=False)


class Scheduler:
    """Queue, admission, brownout and the worker thread; subclasses run the engine (:meth:`_turn`)."""

    name = "?"

    def __init__(self, engine, max_batch_tokens: int, max_queue_tokens: int, base_threshold: float = 0.0,
                 target_queue_ms: Optional[float] = None, max_threshold: Optional[float] = None, threshold_step: float = 0.05,
                 max_queue_ms: float = 0.0, inline_max_tokens: int = 0):
        self.engine = engine
        # the C++ engine's plain tuple (no ModelOutput to build); the ONNX and classifier runners are called
        self._run = engine.run if isinstance(engine, InferenceEngine) else engine
        self.max_batch_tokens, self.max_queue_tokens = max_batch_tokens, max_queue_tokens
        self.base_threshold = check_threshold("serve", base_threshold)
        self.threshold = self.base_threshold  # in force now (brownout raises it)
        self.target_queue_s = None if target_queue_ms is None else target_queue_ms / 1000
        self.max_threshold, self.threshold_step = max_threshold, threshold_step
        self.max_queue_s = max_queue_ms / 1000  # 0: no limit on the expected wait
        self.finished: collections.deque = collections.deque()  # (time, tokens) of rows answered lately: the drain rate
        self.finished_tokens = 0  # their sum, kept so that admission costs O(1) at any load
        self.queue: collections.deque[Row] = collections.deque()
        self.cond = threading.Condition()
        self.queued_tokens = 0
        self.flight_tokens = 0
        self.queue_delay_s = 0.0  # exponential average of the wait before compute
        self.stopping = False
        self.inline = False  # a request runs on the calling thread (run_inline): the worker waits
        self.inline_max_tokens = inline_max_tokens
        self.inline_runs = 0
        self.thread = threading.Thread(target=self._loop, name=f"costeff-{self.name}-scheduler", daemon=True)
        self.error: Optional[BaseException] = None

    # -- the HTTP side ---------------------------------------------------------------------------

    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    def submit(self, rows: list[Row], waited_s: float = 0.0) -> None:
        """Queues the rows of one request, all or none; raises Overloaded or Stopped. ``waited_s``: how long
        requests wait before they get here (the event loop's lag), counted into the expected wait."""
        n = sum(r.tokens for r in rows)
        with self.cond:
            self._admissible(n, waited_s)
            for r in rows:
                r.enqueued = time.monotonic()
                self.queue.append(r)
            self.queued_tokens += n
            self.cond.notify()

    def admissible(self, n: int, waited_s: float = 0.0) -> None:
        """Raises Stopped or Overloaded unless a request of ``n`` tokens may join now (0: any request, so
        that a refusal can come before the body is parsed and tokenized)."""
        with self.cond:
            self._admissible(n, waited_s)

    def _admissible(self, n: int, waited_s: float) -> None:
        """Raises Stopped or Overloaded unless a request of ``n`` tokens may join; called holding cond."""
        if self.stopping:
            raise Stopped("the server is shutting down")
        held = self.queued_tokens + self.flight_tokens
        if held + n > self.max_queue_tokens and held > 0:
            raise Overloaded(self._retry_after(held + n - self.max_queue_tokens), held, self.max_queue_tokens)
        rate = self.drain_rate()
        wait = waited_s + ((held + n) / rate if held > 0 and rate > 0 else 0.0)
        if self.max_queue_s > 0 and wait > self.max_queue_s:
            raise Overloaded(wait - self.max_queue_s, held, int(rate * self.max_queue_s),
                             f"a new request would wait ~{wait * 1000:.0f} ms ({waited_s * 1000:.0f} ms before the queue, then the "
                             f"{held} tokens ahead of it; limit {self.max_queue_s * 1000:.0f} ms)")

    def run_inline(self, rows: list[Row], waited_s: float = 0.0) -> bool:
        """Runs a small request at once on the calling thread when the scheduler holds nothing (no row
        queued or in flight): there is nothing to batch it with, and the engine call (~0.1 ms for a
        sentence) costs less than the hand-off to the worker thread and back. Its rows' futures are
        resolved on return; False (nothing done) when the scheduler is busy, the request is larger than
        ``inline_max_tokens`` (0: never) or has a deadline: then :meth:`submit` it. Admission is
        :meth:`submit`'s: an overloaded event loop (``waited_s``) refuses here too, else a server running
        every request inline never sheds load."""
        n = sum(r.tokens for r in rows)
        if n > self.inline_max_tokens or any(r.deadline is not None for r in rows):
            return False
        with self.cond:
            if self.stopping or self.inline or self.queue or self.flight_tokens:
                return False
            self._admissible(n, waited_s)
            self.inline = True
            self.inline_runs += 1
            self.flight_tokens += n
        try:
            for r in rows:
                r.enqueued = time.monotonic()
            self._start_rows(rows)
            self._run_whole(rows, rows[0].threshold)  # one request: one threshold
        finally:
            with self.cond:
                self.inline = False
                self.flight_tokens -= n
                self.cond.notify()
        return True

    def drain_rate(self, window_s: float = 2.0) -> float:
        """Tokens answered per second over the last ``window_s`` (0 before any)."""
        now = time.monotonic()
        while self.finished and self.finished[0][0] < now - window_s:
            self.finished_tokens -= self.finished.popleft()[1]
        if not self.finished:
            return 0.0
        span = max(0.25, now - self.finished[0][0])
        return self.finished_tokens / span

    def record_answered(self, tokens: int, at: float) -> None:
        """Counts ``tokens`` answered at ``at`` (time.monotonic()) into the drain rate."""
        with self.cond:
            self.finished.append((at, tokens))
            self.finished_tokens += tokens

    def _retry_after(self, excess_tokens: int) -> float:
        rate = self.drain_rate() or self.max_batch_tokens * 20.0  # nothing answered lately: a guess of 20 full batches/s
        return max(0.05, min(30.0, excess_tokens / rate))

    def stop(self, timeout: Optional[float] = None) -> None:
        """Takes no new rows, finishes what it holds, then ends the worker."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)

    def stats(self) -> dict:
        return {"queued_rows": len(self.queue), "queued_tokens": self.queued_tokens, "flight_tokens": self.flight_tokens,
                "threshold": self.threshold}

    # -- the worker side -------------------------------------------------------------------------

    def _take(self, budget: int, at_least_one: bool) -> list[Row]:
        """Queued rows (client still there) fitting in ``budget`` tokens; called holding cond."""
        taken, used = [], 0
        while self.queue:
            r = self.queue[0]
            if r.future.cancelled():
                self.queue.popleft()
                self.queued_tokens -= r.tokens
                continue
            if used + r.tokens > budget and not (at_least_one and not taken):
                break
            self.queue.popleft()
            self.queued_tokens -= r.tokens
            taken.append(r)
            used += r.tokens
        return taken

    def _adjust_threshold(self, waited_s: float) -> None:
        self.queue_delay_s = 0.8 * self.queue_delay_s + 0.2 * waited_s
        if self.target_queue_s is None:
            return
        if self.queue_delay_s > self.target_queue_s:
            self.threshold = min(self.max_threshold, self.threshold + self.threshold_step)
        elif self.queue_delay_s < self.target_queue_s / 2:
            self.threshold = max(self.base_threshold, self.threshold - self.threshold_step)

    def _start_rows(self, rows: list[Row]) -> None:
        now = time.monotonic()
        for r in rows:
            r.started = now
            self._adjust_threshold(now - r.enqueued)
        for r in rows:
            if r.threshold is None:
                r.threshold = self.threshold

    def _resolve(self, row: Row, logits, exit_layer: int, entropy: float, forced: bool,
                 queue_s: Optional[float] = None, inference_s: Optional[float] = None) -> None:
        done = time.monotonic()
        if queue_s is None:
            queue_s, inference_s = (row.started or done) - row.enqueued, done - (row.started or done)
        result = Result(list(map(float, logits)), int(exit_layer), float(entropy), bool(forced), float(row.threshold), queue_s, inference_s)
        self.record_answered(row.tokens, done)
        if not row.future.done():
            row.future.set_result(result)

    def _run_whole(self, rows: list[Row], threshold: float) -> None:
        """One engine call for ``rows`` (all their layers) and their answers."""
        ids, mask, types = pad(rows)
        try:
            out = self._run(ids, mask, types, threshold=threshold)
        except (ValueError, TypeError) as exc:  # the app checked the inputs; never leave a row hanging
            self._fail(rows, exc)
            return
        logits, layers, entropy = out.logits.tolist(), out.exit_layer.tolist(), out.entropy.tolist()  # one call each, not one per row
        for i, r in enumerate(rows):
            self._resolve(r, logits[i], layers[i], entropy[i], False)

    def _fail(self, rows: list[Row], exc: BaseException) -> None:
        for r in rows:
            if not r.future.done():
                r.future.set_exception(exc)

    def _loop(self) -> None:
        try:
            while self._turn():
                pass
        except BaseException as exc:  # noqa: BLE001 - a broken engine fails every waiting row, never hangs them
            self.error = exc
            with self.cond:
                self.stopping = True
                pending = list(self.queue)
                self.queue.clear()
            self._fail(pending + self._in_flight(), exc)

    def _in_flight(self) -> list[Row]:
        return []

    def _turn(self) -> bool:
        raise NotImplementedError


class LayerScheduler(Scheduler):
    """Rows go straight to a :class:`~costeff.inference.session.SessionWorker`, whose C++ thread admits,
    steps and answers them without the GIL; this class's thread only hands the answers over (one
    ``take`` per batch of finished rows, not one Python turn per layer)."""

    name = "layer"

    def __init__(self, engine, *args, **kwargs):
        super().__init__(engine, *args, **kwargs)
        self.worker = None  # made by start() (its own thread) or at the first submit (turned by hand: _turn)
        self.rows: dict[int, Row] = {}
        self._tag = 0

    def _session_worker(self, thread: bool):
        from costeff.inference.session import SessionWorker

        if self.worker is None:
            self.worker = SessionWorker(self.engine, self.max_batch_tokens, thread=thread)
        elif self.worker.threaded != thread:
            raise RuntimeError("LayerScheduler: start() it before the first submit, or never (turned by hand with _turn)")
        return self.worker

    def start(self) -> "Scheduler":
        self._session_worker(thread=True)
        # At exit the interpreter ends daemon threads where they stand; ending this one inside take() (C++
        # waiting without the GIL) aborts the process. Stopped first, it leaves take() and its loop.
        atexit.register(_stop_at_exit, weakref.ref(self))
        return super().start()

    def stats(self) -> dict:
        w = self.worker
        return {**super().stats(), "queued_rows": w.queued_rows() if w else 0, "rows_per_depth": w.rows_per_depth() if w else []}

    def submit(self, rows: list[Row], waited_s: float = 0.0) -> None:
        n = sum(r.tokens for r in rows)
        now = time.monotonic()
        with self.cond:
            self._admissible(n, waited_s)
            worker = self.worker or self._session_worker(thread=False)  # never started: turned by hand
            tags = list(range(self._tag, self._tag + len(rows)))
            self._tag += len(rows)
            for r in rows:
                r.enqueued = now
                if r.threshold is None:
                    r.threshold = self.threshold  # the one in force when the request came (brownout)
            worker.submit([r.ids for r in rows], [r.types for r in rows] if rows[0].types is not None else None, tags=tags,
                          thresholds=[r.threshold for r in rows], deadlines_s=[None if r.deadline is None else r.deadline - now for r in rows])
            self.rows.update(zip(tags, rows))
            self.flight_tokens += n
        for tag, r in zip(tags, rows):
            r.future.add_done_callback(lambda f, tag=tag: self._cancelled(tag) if f.cancelled() else None)

    def _cancelled(self, tag: int) -> None:
        """A client went away: its row leaves the queue or the session before more compute."""
        if self._forget([tag])[0] is not None:
            self.worker.cancel([tag])

    def stop(self, timeout: Optional[float] = None) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.worker is not None:
            self.worker.stop()  # it finishes what it holds; this thread hands the answers over, then ends
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _in_flight(self) -> list[Row]:
        with self.cond:
            return list(self.rows.values())

    def _forget(self, tags) -> list[Optional[Row]]:
        """The rows of ``tags`` (None where one was already answered or forgotten), no longer held."""
        with self.cond:
            rows = [self.rows.pop(t, None) for t in tags]
            self.flight_tokens -= sum(r.tokens for r in rows if r is not None)
        return rows

    def _turn(self) -> bool:
        """Hands over what the worker finished (waiting up to 0.1 s for it); by hand (no thread of the
        worker's own), first turns the worker once. False once the worker is done for good."""
        worker = self.worker
        if worker is None:
            return not self.stopping
        if not worker.threaded:
            worker.turn()
        out = worker.take(0.1 if worker.threaded else 0.0)
        tags = out.tags.tolist()
        if tags:
            logits, layers, entropy = out.logits.tolist(), out.exit_layer.tolist(), out.entropy.tolist()
            forced, queue_s, inference_s = out.forced.tolist(), out.queue_s.tolist(), out.inference_s.tolist()
            for i, row in enumerate(self._forget(tags)):
                if row is None:  # its client went away meanwhile
                    continue
                row.started = row.enqueued + queue_s[i]
                self._adjust_threshold(queue_s[i])
                self._resolve(row, logits[i], layers[i], entropy[i], forced[i], queue_s[i], inference_s[i])
        failed = out.failed.tolist()
        if failed:
            exc = RuntimeError(out.error) if out.error.startswith("the engine failed") else ValueError(out.error)
            if isinstance(exc, RuntimeError):
                self.error = exc
                with self.cond:
                    self.stopping = True
            self._fail([r for r in self._forget(failed) if r is not None], exc)
        return not (worker.threaded and not tags and not failed and worker.finished())


def _stop_at_exit(ref) -> None:
    scheduler = ref()
    if scheduler is not None:
        scheduler.stop(timeout=5.0)


class BatchScheduler(Scheduler):
    name = "batch"

    def __init__(self, engine, *args, max_wait_ms: float = 2.0, **kwargs):
        super().__init__(engine, *args, **kwargs)
        self.max_wait_s = max_wait_ms / 1000
        self.batch: list[Row] = []

    def _in_flight(self) -> list[Row]:
        return list(self.batch)

    def _turn(self) -> bool:
        with self.cond:
            while self.inline or not self.queue:
                if self.stopping and not self.inline and not self.queue:
                    return False
                self.cond.wait(0.1)
            deadline = self.queue[0].enqueued + self.max_wait_s
            while self.queued_tokens < self.max_batch_tokens and not self.stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            self.batch = self._take(self.max_batch_tokens, at_least_one=True)
            self.flight_tokens += sum(r.tokens for r in self.batch)
        if not self.batch:
            return True
        self._start_rows(self.batch)
        by_threshold: dict[float, list[Row]] = collections.defaultdict(list)
        for r in self.batch:
            by_threshold[r.threshold].append(r)
        for t, rows in by_threshold.items():
            self._run_whole(rows, t)
        with self.cond:
            self.flight_tokens -= sum(r.tokens for r in self.batch)
        self.batch = []
        return True


def make_scheduler(kind: str, engine, **kwargs) -> Scheduler:
    if kind == "layer":
        kwargs.pop("max_wait_ms", None)
        return LayerScheduler(engine, **kwargs)
    if kind == "batch":
        return BatchScheduler(engine, **kwargs)
    raise ValueError(f"unknown scheduler {kind!r}")

