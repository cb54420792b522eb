"""Builds and runs ``costeff serve``: the engine of a model directory, its scheduler, a warm-up, the
app on uvicorn; SIGTERM/SIGINT drain (not ready, new requests 503, in-flight ones finish within
``graceful_timeout``), then exit 0."""
from __future__ import annotations

import contextlib
import gc
import logging
import os
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


def engine_threads(config: ServeConfig) -> int:
    """``--threads``, or by default every core this process may use but one: the event loop (HTTP,
    JSON, tokenization) needs a core of its own, or it queues requests where admission cannot see them."""
    if config.threads:
        return config.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


class ModelSpec:
    """What ``costeff serve --model DIR`` runs, by the kind of directory:

    - a costeff model directory: the C++ engine (``--precision fp32|bf16|int8``), either scheduler;
    - a ``costeff export --format onnx`` directory: its segments on ONNX Runtime (its precision was fixed
      at export), the batch scheduler;
    - a plain fine-tuned ``*ForSequenceClassification`` directory (no early exit): PyTorch fp32 or ONNX
      Runtime int8, the batch scheduler; the baseline a user would serve without costeff."""

    def __init__(self, config: ServeConfig):
        from costeff.inference.classifier_runner import ClassifierRunner, is_classifier_directory
        from costeff.inference.model_dir import engine_config_from, is_onnx_directory, read_engine_config

        path = Path(config.model)
        if not path.is_dir():
            raise FileNotFoundError(f"serve: model directory {path} does not exist")
        if is_onnx_directory(path) or is_classifier_directory(path):
            if config.scheduler == "layer":
                raise ValueError(f"serve: {path} runs whole requests (an ONNX export or a plain classifier has no engine session): "
                                 "use --scheduler batch")
        if is_onnx_directory(path):
            from costeff.inference.onnx_runner import OnnxEarlyExit

            self.runner = OnnxEarlyExit(path, threads=engine_threads(config))
            if config.precision not in (None, self.runner.precision):
                raise ValueError(f"serve: {path} is an ONNX export in {self.runner.precision}; --precision {config.precision} needs another export")
            self.kind, self.isa = "onnxruntime", None
            self.config = engine_config_from(self.runner.config, self.runner.config.inference_threshold)
        elif is_classifier_directory(path):
            self.runner = ClassifierRunner(path, config.precision or "fp32", threads=engine_threads(config))
            self.kind, self.isa = "pytorch" if self.runner.precision == "fp32" else "onnxruntime", None
            self.config = engine_config_from(self.runner.config, None)
        else:
            from costeff.inference.engine import InferenceEngine

            self.config = read_engine_config(path)  # the engine's own reader: no transformers
            self.runner = InferenceEngine.from_pretrained(path, config.precision or "fp32")
            self.kind, self.isa = "engine", self.runner.isa
        self.precision = self.runner.precision


def build_state(config: ServeConfig, warm: bool = True) -> ServerState:
    """The runner and scheduler of ``config.model``, warmed up (ready) unless ``warm`` is False."""
    from costeff.inference.model_dir import DirTokenizer

    torch.set_num_threads(engine_threads(config))
    path = Path(config.model)
    spec = ModelSpec(config)
    tokenizer = DirTokenizer(path)
    cfg = spec.config
    max_length = tokenizer.max_length(cfg.max_positions)
    threshold = config.threshold if config.threshold is not None else float(cfg.inference_threshold or 0.0)
    scheduler = config.scheduler or ("layer" if spec.kind == "engine" else "batch")
    info = {"model": str(path), "runtime": spec.kind, "threads": torch.get_num_threads(), "labels": cfg.labels, "num_layers": cfg.num_hidden_layers, "threshold": threshold,
            "precision": spec.precision, "isa": spec.isa, "scheduler": scheduler, "max_length": max_length,
            "limits": {"max_batch_tokens": config.max_batch_tokens, "max_queue_tokens": config.max_queue_tokens, "max_inputs": config.max_inputs,
                       "payload_limit": config.payload_limit, "max_wait_ms": config.max_wait_ms,
                       "max_queue_ms": config.max_queue_ms, "inline_max_tokens": config.inline_max_tokens, "busy_poll_us": config.busy_poll_us, "loop": config.loop, "max_concurrent_requests": config.max_concurrent_requests},
            "brownout": None if config.max_threshold is None else {"target_queue_ms": config.target_queue_ms, "max_threshold": config.max_threshold,
                                                                   "step": config.threshold_step}}
    metrics = Metrics(cfg.num_hidden_layers)
    state = ServerState(config, tokenizer, cfg.labels, max_length, cfg.num_hidden_layers, cfg.type_vocab_size > 1, info, metrics=metrics)
    state.scheduler = make_scheduler(scheduler, spec.runner, max_batch_tokens=config.max_batch_tokens, max_queue_tokens=config.max_queue_tokens,
                                     base_threshold=threshold, target_queue_ms=config.target_queue_ms, max_threshold=config.max_threshold,
                                     threshold_step=config.threshold_step, max_wait_ms=config.max_wait_ms, max_queue_ms=config.max_queue_ms,
                                     inline_max_tokens=config.inline_max_tokens).start()
    metrics.threshold.set(threshold)
    if warm:
        warm_up(state)
    return state


def warm_up(state: ServerState) -> None:
    """One short row through the scheduler (first-call allocations, thread pools), then ready."""
    ids, types = state.tokenizer.encode(["warm up"], max_length=state.max_length)
    row = Row(ids[0], types[0] if state.has_token_types else None, 0.0)
    state.scheduler.submit([row])
    row.future.result(timeout=60)
    state.ready = True


def serve(config: ServeConfig) -> int:
    import uvicorn

    t0 = time.monotonic()
    state = build_state(config)
    app = create_app(state)
    # What start-up made (torch, the model, the tokenizer: ~180k objects) stays out of every later
    # collection: a full one over it paused the event loop for 63 ms here, in every request waiting then.
    gc.collect()
    gc.freeze()

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

    server = DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, loop=config.loop, log_level="warning", access_log=False, proxy_headers=False,
                                           timeout_graceful_shutdown=config.graceful_timeout, lifespan="off"))
    print(f"costeff serve: {config.model} ({state.info['runtime']} {state.info['precision']}, scheduler {state.info['scheduler']}, threshold "
          f"{state.info['threshold']:.4g}) ready in {time.monotonic() - t0:.2f} s on http://{config.host}:{config.port}", file=sys.stderr, flush=True)
    server.run()
    state.scheduler.stop(timeout=config.graceful_timeout)
    print("costeff serve: stopped", file=sys.stderr, flush=True)
    return 0
