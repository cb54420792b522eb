"""Builds and runs ``costeff serve``: the engine of a model directory, its scheduler, a warm-up, the
app on uvicorn; SIGTERM/SIGINT drain (not ready, new requests 503, in-flight ones finish within
``graceful_timeout``), then exit 0."""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from costeff.serve.app import Metrics, ServerState, create_app
from costeff.serve.config import ServeConfig
from costeff.serve.schedulers import Row, make_scheduler

log = logging.getLogger("costeff.serve")


def build_state(config: ServeConfig, warm: bool = True) -> ServerState:
    """The engine and scheduler of ``config.model``, warmed up (ready) unless ``warm`` is False."""
    from transformers import AutoTokenizer

    from costeff.inference.engine import InferenceEngine
    from costeff.inference.predict import load_model_config

    if config.threads:
        torch.set_num_threads(config.threads)
    path = Path(config.model)
    model_config = load_model_config(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    limit = tokenizer.model_max_length
    max_positions = model_config.max_position_embeddings - (model_config.position_offset or 0)
    max_length = min(limit if limit and limit < 10**6 else max_positions, max_positions)
    engine = InferenceEngine.from_pretrained(path, config.precision)
    id2label = model_config.id2label or {}
    labels = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(model_config.num_labels)]
    threshold = config.threshold if config.threshold is not None else float(model_config.inference_threshold or 0.0)
    info = {"model": str(path), "labels": labels, "num_layers": model_config.num_hidden_layers, "threshold": threshold,
            "precision": engine.precision, "isa": engine.isa, "scheduler": config.scheduler, "max_length": max_length,
            "limits": {"max_batch_tokens": config.max_batch_tokens, "max_queue_tokens": config.max_queue_tokens, "max_inputs": config.max_inputs,
                       "payload_limit": config.payload_limit, "max_wait_ms": config.max_wait_ms,
                       "max_queue_ms": config.max_queue_ms},
            "brownout": None if config.max_threshold is None else {"target_queue_ms": config.target_queue_ms, "max_threshold": config.max_threshold,
                                                                   "step": config.threshold_step}}
    metrics = Metrics(model_config.num_hidden_layers)
    state = ServerState(config, tokenizer, labels, max_length, model_config.num_hidden_layers, model_config.type_vocab_size > 1, info,
                        metrics=metrics)
    state.scheduler = make_scheduler(config.scheduler, engine, max_batch_tokens=config.max_batch_tokens, max_queue_tokens=config.max_queue_tokens,
                                     base_threshold=threshold, target_queue_ms=config.target_queue_ms, max_threshold=config.max_threshold,
                                     threshold_step=config.threshold_step, max_wait_ms=config.max_wait_ms, max_queue_ms=config.max_queue_ms,
                                     on_result=metrics.observe).start()
    metrics.threshold.set(threshold)
    if warm:
        warm_up(state)
    return state


def warm_up(state: ServerState) -> None:
    """One short row through the scheduler (first-call allocations, thread pools), then ready."""
    ids = state.tokenizer("warm up", truncation=True, max_length=state.max_length)
    row = Row(list(ids["input_ids"]), list(ids["token_type_ids"]) if state.has_token_types and "token_type_ids" in ids else None, 0.0)
    state.scheduler.submit([row])
    row.future.result(timeout=60)
    state.ready = True


def serve(config: ServeConfig) -> int:
    import uvicorn

    t0 = time.monotonic()
    state = build_state(config)
    app = create_app(state)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: stop being ready first, then uvicorn's graceful shutdown
            state.draining = True
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal once shut down (the process then dies of it); a drained server exits 0
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    server = DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=config.graceful_timeout, lifespan="off"))
    print(f"costeff serve: {config.model} ({state.info['precision']}, {state.info['isa']}, scheduler {config.scheduler}, threshold "
          f"{state.info['threshold']:.4g}) ready in {time.monotonic() - t0:.2f} s on http://{config.host}:{config.port}", file=sys.stderr, flush=True)
    server.run()
    state.scheduler.stop(timeout=config.graceful_timeout)
    print("costeff serve: stopped", file=sys.stderr, flush=True)
    return 0
