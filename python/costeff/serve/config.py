"""Every knob of ``costeff serve`` with its checks, written once (the CLI and tests build it)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from costeff.ops._checks import check_threshold

SCHEDULERS = ("layer", "batch")
LOOPS = ("asyncio", "uvloop")
PRECISIONS = ("fp32", "bf16", "int8")


@dataclass
class ServeConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8080
    scheduler: Optional[str] = None  # "layer": continuous batching per layer (EngineSession); "batch": whole requests; None: layer where the model has an engine
    precision: Optional[str] = None  # None: fp32 (an ONNX export: the precision it was exported in)
    threads: int = 0  # intra-op threads of the engine (0: the cores this process may use, less one for the event loop)
    threshold: Optional[float] = None  # None: the directory's calibrated inference_threshold (0 without one)
    max_batch_tokens: int = 4096  # real tokens in flight in the engine at once
    max_queue_tokens: int = 0  # tokens admitted (queued + in flight) before 429; 0: 8 x max_batch_tokens
    max_queue_ms: float = 1000.0  # 429 when a new request would wait longer than this for what is ahead (0: no limit)
    max_wait_ms: float = 2.0  # batch scheduler: how long a batch waits to fill
    inline_max_tokens: int = 256  # an idle server runs a request up to this many tokens at once on the event loop (0: never)
    busy_poll_us: int = 0  # the event loop polls instead of sleeping for this long after each response (0: off)
    loop: str = "asyncio"  # the event loop under uvicorn: asyncio accepts waiting connections at once, uvloop lets them queue in the kernel
    max_inputs: int = 256  # inputs per request
    max_concurrent_requests: int = 512  # requests in the server at once; over it 429 at once (TEI's flag of the same name)
    payload_limit: int = 2 * 1024 * 1024  # request body bytes
    api_key: Optional[str] = None  # Bearer token for everything but /health
    graceful_timeout: float = 30.0  # SIGTERM: seconds in-flight requests get to finish
    target_queue_ms: Optional[float] = None  # brownout: above this queueing delay the threshold rises
    max_threshold: Optional[float] = None  # brownout ceiling (nats)
    threshold_step: float = 0.05  # brownout: nats per adjustment

    def __post_init__(self):
        def positive_int(name, low=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"serve: {name.replace('_', '-')} must be an integer >= {low}, got {v!r}")

        for name in ("max_batch_tokens", "max_inputs", "payload_limit", "max_concurrent_requests"):
            positive_int(name)
        positive_int("threads", 0)
        positive_int("max_queue_tokens", 0)
        positive_int("inline_max_tokens", 0)
        positive_int("busy_poll_us", 0)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"serve: port must be in [0, 65535], got {self.port}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"serve: scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.loop not in LOOPS:
            raise ValueError(f"serve: loop must be one of {LOOPS}, got {self.loop!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"serve: precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("max_wait_ms", "max_queue_ms", "graceful_timeout", "threshold_step"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"serve: {name.replace('_', '-')} must be a finite number >= 0, got {v!r}")
        if self.threshold is not None:
            check_threshold("serve", self.threshold, "--threshold")
        if (self.target_queue_ms is None) != (self.max_threshold is None):
            raise ValueError("serve: brownout needs both --target-queue-ms and --max-threshold")
        if self.max_threshold is not None:
            check_threshold("serve", self.max_threshold, "--max-threshold")
            if not (isinstance(self.target_queue_ms, (int, float)) and self.target_queue_ms > 0):
                raise ValueError(f"serve: target-queue-ms must be > 0, got {self.target_queue_ms!r}")
        if self.max_queue_tokens == 0:
            self.max_queue_tokens = 8 * self.max_batch_tokens
        if self.max_queue_tokens < self.max_batch_tokens:
            raise ValueError("serve: max-queue-tokens must be >= max-batch-tokens")
