"""The one timing method behind every latency number (the evaluate stage, benchmarks/_harness.py,
benchmarks/bench_anchors.py): the candidates take turns round by round, each round timing one block of
work per candidate with a wall clock, and the result is the median over rounds. Load from other
processes on a shared machine then hits all candidates alike, and the median ignores the rounds that
lost the CPU. CPU execution is synchronous, so a wall clock around the calls is exact."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def time_interleaved(blocks: dict[str, Callable[[], int]], rounds: int, warmup: int = 1,
                     clock: Callable[[], float] = time.perf_counter, settle_s: float = 0.0) -> dict[str, dict]:
    """``blocks[name]()`` runs one block of work and returns how many units it did (samples, calls).
    Returns, per name, the median / quartiles / min over ``rounds`` of seconds per unit, plus
    ``rounds`` and ``units`` (per block). ``clock`` is injectable for deterministic tests.
    ``settle_s``: an untimed pause before each block, so that worker threads the previous candidate
    left spinning (ONNX Runtime's pool spins for tens of ms after a run) are asleep and do not steal
    the cores from the next one (measured: the engine ran 2x slower right after ONNX Runtime)."""
    if rounds < 1:
        raise ValueError(f"time_interleaved: rounds must be >= 1, got {rounds}")
    units = {}
    for name, block in blocks.items():
        for _ in range(warmup):
            units[name] = block()
        if warmup == 0:
            units[name] = None
    samples: dict[str, list[float]] = {name: [] for name in blocks}
    for _ in range(rounds):
        for name, block in blocks.items():
            if settle_s > 0:
                time.sleep(settle_s)
            t0 = clock()
            n = block()
            dt = clock() - t0
            if not n:
                raise ValueError(f"time_interleaved: block {name!r} did no work (returned {n!r})")
            units[name] = n
            samples[name].append(dt / n)
    out = {}
    for name, xs in samples.items():
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        out[name] = {"median": statistics.median(xs), "q25": q[0], "q75": q[2], "min": min(xs), "rounds": len(xs), "units": units[name]}
    return out
