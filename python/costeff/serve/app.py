"""The ASGI application of ``costeff serve``: endpoints, request rules, errors, metrics. The two POST
endpoints run straight from ASGI; Starlette routes the others.

Every error is JSON ``{"error": ..., "error_type": ...}`` with its status: 400 empty input or
undecodable bytes, 401 missing/wrong API key, 404/405 unknown route or method, 413 body over
``payload_limit``, 422 malformed JSON, wrong types, unknown fields, too many inputs, a bad threshold or
deadline, an over-long text with ``truncate: false``, 429 over the token budget (with ``Retry-After``),
503 while warming up or draining, 500 for anything unexpected (never a traceback).
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from costeff.serve.config import ServeConfig
from costeff.serve.schedulers import Overloaded, Result, Row, Scheduler, Stopped

# A request with fewer characters than this is tokenized on the event loop (tens of microseconds in Rust),
# cheaper than the hand-off to a worker thread and back; a longer one goes to a thread.
INLINE_TOKENIZE_CHARS = 2048
REQUEST_FIELDS = {"inputs", "raw_scores", "truncate", "truncation_direction", "threshold", "deadline_ms"}


class BadRequest(Exception):
    def __init__(self, status: int, message: str, error_type: str):
        super().__init__(message)
        self.status, self.error_type = status, error_type


def error(status: int, message: str, error_type: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


class Metrics:
    """Prometheus metrics beyond the anchors': exits, depth, forced exits, the threshold in force."""

    def __init__(self, num_layers: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("costeff_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.exit_layer = Histogram("costeff_exit_layer", "Layer each input left at", buckets=[i + 0.5 for i in range(num_layers + 1)], registry=r)
        self.layers_per_request = Histogram("costeff_layers_per_request", "Layers run for a request (sum over its inputs)",
                                            buckets=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096], registry=r)
        self.forced = Counter("costeff_forced_exits", "Inputs answered at their deadline from the exit reached", registry=r)
        self.threshold = Gauge("costeff_threshold", "Entropy threshold in force (nats)", registry=r)
        self.rows_in_flight = Gauge("costeff_rows_in_flight", "Rows in the engine by layers done", ["depth"], registry=r)
        self.queued_tokens = Gauge("costeff_queued_tokens", "Tokens waiting for the engine", registry=r)
        self.flight_tokens = Gauge("costeff_flight_tokens", "Tokens in the engine", registry=r)
        self.active = Gauge("costeff_requests_active", "Requests in the server (the --max-concurrent-requests count)", registry=r)
        seconds = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5]
        self.queue_s = Histogram("costeff_queue_seconds", "Time an input waited before the engine took it", buckets=seconds, registry=r)
        self.tokenize_s = Histogram("costeff_tokenization_seconds", "Tokenization time per request", buckets=seconds, registry=r)
        self.inference_s = Histogram("costeff_inference_seconds", "Engine time of an input (start to exit)", buckets=seconds, registry=r)
        self.request_s = Histogram("costeff_request_seconds", "Request time in the server", buckets=seconds, registry=r)

        self._counts: dict = {}  # (route, status) -> its child of ``requests``: labels() takes a lock and builds a key each time

    def observe(self, result: Result) -> None:
        self.exit_layer.observe(result.exit_layer)
        self.queue_s.observe(result.queue_s)
        self.inference_s.observe(result.inference_s)
        if result.forced:
            self.forced.inc()

    def record(self, route: str, status: int, seconds: float, done: "Handled") -> None:
        """One request, once its response has gone out (the client does not wait for this)."""
        key = (route, status)
        count = self._counts.get(key)
        if count is None:
            count = self._counts[key] = self.requests.labels(route, str(status))
        count.inc()
        self.request_s.observe(seconds)
        if done.tokenize_s is not None:
            self.tokenize_s.observe(done.tokenize_s)
        if done.results:
            for r in done.results:
                self.observe(r)
            self.layers_per_request.observe(sum(r.exit_layer for r in done.results))


@dataclass
class Handled:
    """What a /predict handler measured, for :meth:`Metrics.record` after the response."""

    tokenize_s: Optional[float] = None
    results: list = field(default_factory=list)


class LoopLag:
    """How far the event loop runs behind (seconds): a probe asks to wake every ``period`` and records how
    late it woke. Requests parsed late have waited that long before any handler saw them, a wait that the
    scheduler's queue does not show; admission counts it (:meth:`now`)."""

    def __init__(self, period_s: float = 0.005):
        self.period_s, self.lag_s, self.task, self.due = period_s, 0.0, None, None

    def start(self) -> None:
        if self.task is None or self.task.done():  # first request, or a new loop (in-process tests run one per call)
            self.lag_s, self.due = 0.0, None
            self.task = asyncio.get_running_loop().create_task(self._probe())

    def now(self) -> float:
        """The lag at this moment: the last probe's, or how long the probe has been overdue if more. Under
        overload one pass of the loop can run hundreds of requests read together; the last of them waited
        the whole pass, which the probe reports only after it."""
        if self.due is None:
            return self.lag_s
        overdue = time.monotonic() - self.due
        return overdue if overdue > self.lag_s else self.lag_s

    async def _probe(self) -> None:
        while True:  # time.monotonic, not loop.time: uvloop's clock stands still within a pass of the loop
            self.due = time.monotonic() + self.period_s
            await asyncio.sleep(self.period_s)
            late = max(0.0, time.monotonic() - self.due)
            self.lag_s = late if late > self.lag_s else 0.7 * self.lag_s + 0.3 * late  # rises at once, decays over a few probes


class BusyPoll:
    """After a response, keeps the event loop polling its sockets (a task that yields to it over and over)
    for ``window_s`` instead of letting it sleep in epoll: a request that comes within the window is
    read at once, without the idle core's wake-up. CPU for latency, as the kernel's ``busy_poll``; each
    response extends the window, so under steady traffic one task polls."""

    def __init__(self, window_s: float):
        self.window_s, self.until, self.task = window_s, 0.0, None

    def kick(self) -> None:
        self.until = time.monotonic() + self.window_s
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while time.monotonic() < self.until:
            await asyncio.sleep(0)


@dataclass
class ServerState:
    config: ServeConfig
    tokenizer: object  # costeff.inference.model_dir.DirTokenizer
    labels: list
    max_length: int
    num_layers: int
    has_token_types: bool
    info: dict
    scheduler: Optional[Scheduler] = None
    metrics: Optional[Metrics] = None
    ready: bool = False
    draining: bool = False
    active: int = 0  # requests being handled (the --max-concurrent-requests rule)
    loop_lag: LoopLag = field(default_factory=LoopLag)
    busy_poll: Optional[BusyPoll] = None
    started: float = field(default_factory=time.time)


def _reject_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def parse_request(body: bytes, state: ServerState) -> dict:
    """The request's fields, checked; raises BadRequest."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(400, "the request body is not UTF-8", "invalid_encoding") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise BadRequest(422, f"malformed JSON: {exc}", "validation") from None
    if not isinstance(data, dict):
        raise BadRequest(422, "the body must be a JSON object with 'inputs'", "validation")
    unknown = sorted(set(data) - REQUEST_FIELDS)
    if unknown:
        raise BadRequest(422, f"unknown fields {unknown}; known: {sorted(REQUEST_FIELDS)}", "validation")
    if "inputs" not in data:
        raise BadRequest(422, "missing field 'inputs'", "validation")
    inputs = data["inputs"]
    if isinstance(inputs, str):
        items = [inputs]
    elif isinstance(inputs, list):
        items = inputs
    else:
        raise BadRequest(422, "'inputs' must be a string, a list of strings or a list of [text, pair] lists", "validation")
    if not items:
        raise BadRequest(400, "'inputs' is empty", "empty")
    if len(items) > state.config.max_inputs:
        raise BadRequest(422, f"{len(items)} inputs; at most {state.config.max_inputs} per request", "validation")
    texts, pairs = [], []
    for i, x in enumerate(items):
        if isinstance(x, str):
            texts.append(x)
            pairs.append(None)
        elif isinstance(x, list) and len(x) == 2 and all(isinstance(p, str) for p in x):
            texts.append(x[0])
            pairs.append(x[1])
        else:
            raise BadRequest(422, f"inputs[{i}] must be a string or a [text, pair] list of two strings", "validation")
        if not texts[-1].strip():
            raise BadRequest(400, f"inputs[{i}] is empty", "empty")
    if any(p is not None for p in pairs) and any(p is None for p in pairs):
        raise BadRequest(422, "mix of single texts and [text, pair] inputs in one request", "validation")
    for name in ("raw_scores", "truncate"):
        if name in data and not isinstance(data[name], bool):
            raise BadRequest(422, f"'{name}' must be true or false", "validation")
    if data.get("truncation_direction", "Right") not in ("Right", "right"):
        raise BadRequest(422, "truncation_direction: only 'Right' is supported", "validation")
    threshold = data.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0):
        raise BadRequest(422, f"'threshold' must be a number >= 0 (nats), got {threshold!r}", "validation")
    deadline = data.get("deadline_ms")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not 0 < deadline < math.inf):
        raise BadRequest(422, f"'deadline_ms' must be a number > 0, got {deadline!r}", "validation")
    return {"texts": texts, "pairs": pairs if pairs[0] is not None else None, "single": isinstance(inputs, str),
            "raw_scores": data.get("raw_scores", False), "truncate": data.get("truncate", True),
            "threshold": None if threshold is None else float(threshold), "deadline_ms": deadline}


def tokenize(state: ServerState, req: dict) -> list[Row]:
    ids, types = state.tokenizer.encode(req["texts"], req["pairs"])
    too_long = [i for i, x in enumerate(ids) if len(x) > state.max_length]
    if too_long:
        if not req["truncate"]:
            raise BadRequest(422, f"inputs {too_long[:8]} are longer than {state.max_length} tokens and truncate is false", "validation")
        ids, types = state.tokenizer.encode(req["texts"], req["pairs"], max_length=state.max_length)
    deadline = None if req["deadline_ms"] is None else time.monotonic() + req["deadline_ms"] / 1000
    return [Row(x, types[i] if state.has_token_types else None, req["threshold"], deadline) for i, x in enumerate(ids)]


def answer(state: ServerState, result: Result, raw_scores: bool) -> dict:
    logits = result.logits
    m = max(logits)
    exp = [math.exp(v - m) for v in logits]
    z = sum(exp)
    probs = [e / z for e in exp]
    best = max(range(len(probs)), key=probs.__getitem__)
    scores = logits if raw_scores else probs
    return {"label": state.labels[best], "score": round(scores[best], 6), "exit_layer": result.exit_layer, "forced_exit": result.forced,
            "threshold": round(result.threshold, 6), "scores": {state.labels[k]: round(v, 6) for k, v in enumerate(scores)}}


def create_app(state: ServerState):
    cfg = state.config
    metrics = state.metrics
    if cfg.busy_poll_us:
        state.busy_poll = BusyPoll(cfg.busy_poll_us / 1e6)

    def authorized(request: Request) -> bool:
        return cfg.api_key is None or request.headers.get("authorization") == f"Bearer {cfg.api_key}"

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.payload_limit:
            raise BadRequest(413, f"the body is {declared} bytes; the limit is {cfg.payload_limit}", "payload_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.payload_limit:
                raise BadRequest(413, f"the body is over the limit of {cfg.payload_limit} bytes", "payload_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def admit(request: Request, done: Handled) -> tuple[dict, list[Row]]:
        if not authorized(request):
            raise BadRequest(401, "missing or wrong API key (Authorization: Bearer ...)", "unauthorized")
        state.loop_lag.start()
        if state.draining or not state.ready or state.scheduler is None:
            raise BadRequest(503, "the server is shutting down" if state.draining else "the server is warming up", "unavailable")
        state.scheduler.admissible(0, state.loop_lag.now())  # refused before the body is parsed and tokenized
        req = parse_request(await read_body(request), state)
        t0 = time.monotonic()
        if sum(map(len, req["texts"])) + sum(map(len, req["pairs"] or ())) <= INLINE_TOKENIZE_CHARS:
            rows = tokenize(state, req)
        else:
            rows = await anyio.to_thread.run_sync(tokenize, state, req)  # off the event loop
        done.tokenize_s = time.monotonic() - t0
        lag = state.loop_lag.now()
        if not state.scheduler.run_inline(rows, waited_s=lag):  # idle: at once, on this thread
            state.scheduler.submit(rows, waited_s=lag)
        return req, rows

    def headers(results: list[Result]) -> dict:
        q = max((r.queue_s for r in results), default=0.0)
        inf = max((r.inference_s for r in results), default=0.0)
        return {"x-queue-time": f"{q * 1000:.3f}", "x-inference-time": f"{inf * 1000:.3f}", "x-threshold": f"{state.scheduler.threshold:.6g}"}

    async def guarded(route: str, scope, receive, send, handler) -> None:
        """Runs a /predict handler straight from ASGI (no routing or middleware: a served sentence takes
        ~0.1 ms of engine time, so every step around it counts), sends its response or its error, then
        records the metrics, after the client has its answer."""
        t0 = time.monotonic()
        request, done = Request(scope, receive, send), Handled()
        try:
            if state.active >= cfg.max_concurrent_requests:
                # before the body is read: a loop flooded by connections sheds them at the cost of a header parse
                raise Overloaded(1.0, state.active, cfg.max_concurrent_requests,
                                 f"{state.active} requests in the server (limit {cfg.max_concurrent_requests})")
            state.active += 1
            try:
                response = await handler(request, done)
            finally:
                state.active -= 1
        except BadRequest as exc:
            response = error(exc.status, str(exc), exc.error_type)
        except Overloaded as exc:
            response = error(429, str(exc), "overloaded", {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))})
        except Stopped as exc:
            response = error(503, str(exc), "unavailable")
        except ClientDisconnect:
            response = Response(status_code=499)
        except Exception as exc:  # noqa: BLE001 - never a traceback to the client
            response = error(500, f"internal error ({type(exc).__name__})", "internal")
        try:
            await response(scope, receive, send)
        except OSError:  # the client left while its answer was being sent
            pass
        finally:  # counted also when a stream breaks off (the error goes on to uvicorn, which logs it)
            metrics.record(route, response.status_code, time.monotonic() - t0, done)

    async def wait_all(request: Request, rows: list[Row]) -> Optional[list[Result]]:
        if all(r.future.done() for r in rows):  # run inline: no hop through the loop's thread-safe callbacks
            return [r.future.result() for r in rows]
        futures = [asyncio.wrap_future(r.future) for r in rows]
        pending = set(futures)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=0.05)
            if pending and await request.is_disconnected():
                for r in rows:
                    r.future.cancel()
                return None
        return [f.result() for f in futures]

    async def predict(request: Request, done: Handled) -> Response:
        req, rows = await admit(request, done)
        results = await wait_all(request, rows)
        if results is None:
            return Response(status_code=499)
        done.results = results
        out = [answer(state, r, req["raw_scores"]) for r in results]
        return JSONResponse(out[0] if req["single"] else out, headers=headers(results))

    async def predict_stream(request: Request, done: Handled) -> Response:
        req, rows = await admit(request, done)

        async def indexed(i, row):
            return i, await asyncio.wrap_future(row.future)

        async def lines():
            try:
                for finished in asyncio.as_completed([indexed(i, r) for i, r in enumerate(rows)]):
                    i, result = await finished
                    done.results.append(result)
                    yield json.dumps({"index": i, **answer(state, result, req["raw_scores"])}) + "\n"
            finally:
                for r in rows:
                    r.future.cancel()  # a client that left mid-stream: its rows are dropped before compute

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    posts = {"/predict": predict, "/predict/stream": predict_stream}

    async def health(request: Request) -> Response:
        if state.scheduler is not None and state.scheduler.error is not None:
            return error(500, f"the engine failed: {type(state.scheduler.error).__name__}", "internal")
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        if state.draining:
            return error(503, "draining", "unavailable")
        if not state.ready:
            return error(503, "warming up", "unavailable")
        return JSONResponse({"status": "ready"})

    async def info(request: Request) -> Response:
        if not authorized(request):
            return error(401, "missing or wrong API key (Authorization: Bearer ...)", "unauthorized")
        s = state.scheduler
        return JSONResponse({**state.info, "threshold_in_force": s.threshold if s else None, "uptime_s": round(time.time() - state.started, 3)})

    async def metrics_route(request: Request) -> Response:
        if not authorized(request):
            return error(401, "missing or wrong API key (Authorization: Bearer ...)", "unauthorized")
        metrics.active.set(state.active)
        s = state.scheduler
        if s is not None:
            st = s.stats()
            metrics.threshold.set(st["threshold"])
            metrics.queued_tokens.set(st["queued_tokens"])
            metrics.flight_tokens.set(st["flight_tokens"])
            for d, n in enumerate(st.get("rows_per_depth", [])):
                metrics.rows_in_flight.labels(str(d)).set(n)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(request: Request) -> Response:
        return JSONResponse(OPENAPI)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "error", "not_found" if exc.status_code == 404 else "method")

    async def internal(request: Request, exc: Exception) -> Response:
        return error(500, f"internal error ({type(exc).__name__})", "internal")

    async def post_only(request: Request) -> Response:  # reached by other methods only: the POSTs go straight to guarded
        raise HTTPException(405)

    routes = [
        Route("/predict", post_only, methods=["POST"]),
        Route("/predict/stream", post_only, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    routed = Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: internal})

    async def app(scope, receive, send) -> None:
        handler = posts.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if handler is None:
            await routed(scope, receive, send)
        else:
            await guarded(scope["path"], scope, receive, send, handler)
            if state.busy_poll is not None:
                state.busy_poll.kick()

    return app


_ANSWER = {"type": "object", "properties": {"label": {"type": "string"}, "score": {"type": "number"}, "exit_layer": {"type": "integer"},
                                            "forced_exit": {"type": "boolean"}, "threshold": {"type": "number"},
                                            "scores": {"type": "object", "additionalProperties": {"type": "number"}}}}
_ERROR = {"type": "object", "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}}}
OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "costeff serve", "version": "1"},
    "paths": {
        "/predict": {"post": {
            "summary": "Classify one text, a list of texts or a list of [text, pair] lists (TEI-compatible body)",
            "requestBody": {"content": {"application/json": {"schema": {"type": "object", "required": ["inputs"], "additionalProperties": False,
                            "properties": {"inputs": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                                                                {"type": "array", "items": {"type": "array", "items": {"type": "string"}}}]},
                                           "raw_scores": {"type": "boolean"}, "truncate": {"type": "boolean"},
                                           "truncation_direction": {"type": "string", "enum": ["Right"]},
                                           "threshold": {"type": "number", "minimum": 0}, "deadline_ms": {"type": "number", "exclusiveMinimum": 0}}}}}},
            "responses": {"200": {"content": {"application/json": {"schema": {"oneOf": [_ANSWER, {"type": "array", "items": _ANSWER}]}}}},
                          **{str(c): {"content": {"application/json": {"schema": _ERROR}}} for c in (400, 401, 413, 422, 429, 503)}}}},
        "/predict/stream": {"post": {"summary": "As /predict; NDJSON, one line per input as it finishes, with its index"}},
        "/health": {"get": {"summary": "Liveness"}},
        "/ready": {"get": {"summary": "200 when warm, 503 while warming up or draining"}},
        "/info": {"get": {"summary": "Model, labels, threshold, precision, scheduler, limits"}},
        "/metrics": {"get": {"summary": "Prometheus metrics"}},
    },
}
