"""The two schedulers of ``costeff serve`` without HTTP: Poisson arrivals straight into
``LayerScheduler`` and ``BatchScheduler`` over the same engine, in one process.

``bench_serve.py`` measures the server a user runs, but on a 2-core machine its numbers mix the
scheduling with the cost of HTTP, JSON and the load client. Here a thread plays the event loop: it
submits each request at its drawn arrival time (an idle scheduler runs it at once, as the server does)
and a done-callback records when its last row is answered. Per request size (``--per-request``): the
capacity of each scheduler (a closed loop of ``--concurrency`` requests in flight), then open-loop
loads as fractions of the lower of the two capacities, so both see the same traffic; per point the
achieved rate, mean / p50 / p90 / p99 latency and the average exit layer. Table + JSON
(benchmarks/results/scheduler.json).

  python benchmarks/bench_scheduler.py [--run runs/demo] [--per-request 1,16] [--loads 0.5,0.8]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (os.path.join(ROOT, "python"), ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)


class Load:
    """Requests of ``k`` rows drawn from the tokenized sentences, submitted as the server's handler does
    (at once on an idle scheduler, else queued); latency from the drawn arrival to the last row's answer."""

    def __init__(self, rows, k: int, seed: int):
        self.rows, self.k, self.rng = rows, k, random.Random(seed)
        self.lock = threading.RLock()
        self.latencies, self.layers = [], []

    def request(self):
        from costeff.serve.schedulers import Row

        return [Row(*self.rows[self.rng.randrange(len(self.rows))], None) for _ in range(self.k)]

    def submit(self, scheduler, arrival: float, again=None) -> None:
        rows = self.request()
        left = [len(rows)]

        def done(future):
            with self.lock:
                left[0] -= 1
                if not future.cancelled() and future.exception() is None:
                    self.layers.append(future.result().exit_layer)
                if left[0] == 0:
                    self.latencies.append(time.monotonic() - arrival)
                    if again is not None:
                        again()

        for r in rows:
            r.future.add_done_callback(done)
        if again is not None or not scheduler.run_inline(rows):  # the closed loop resubmits from the worker: never inline there
            scheduler.submit(rows)


def capacity(make, rows, k: int, concurrency: int, seconds: float) -> float:
    """Requests/s with ``concurrency`` requests always in flight."""
    scheduler = make()
    load = Load(rows, k, seed=1)
    end = time.monotonic() + seconds

    def again():
        if time.monotonic() < end:
            load.submit(scheduler, time.monotonic(), again)

    t0 = time.monotonic()
    for _ in range(concurrency):
        load.submit(scheduler, t0, again)
    while time.monotonic() < end:
        time.sleep(0.05)
    scheduler.stop(timeout=30)
    return len(load.latencies) / (time.monotonic() - t0)


def open_loop(make, rows, k: int, rate: float, seconds: float, seed: int) -> dict:
    scheduler = make()
    load = Load(rows, k, seed)
    rng = random.Random(seed + 1)
    t0 = at = time.monotonic()
    n = 0
    while at - t0 < seconds:
        at += rng.expovariate(rate)
        delay = at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        load.submit(scheduler, at)
        n += 1
    while len(load.latencies) < n and time.monotonic() - at < 60:
        time.sleep(0.01)
    elapsed = time.monotonic() - t0
    scheduler.stop(timeout=30)
    lat = sorted(load.latencies)
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    return {"offered_per_s": rate, "requests": n, "answered": len(lat), "achieved_per_s": len(lat) / elapsed,
            "mean_ms": 1000 * statistics.fmean(lat), "p50_ms": 1000 * q[49], "p90_ms": 1000 * q[89], "p99_ms": 1000 * q[98],
            "avg_exit_layer": statistics.fmean(load.layers) if load.layers else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=os.path.join(ROOT, "runs", "demo"), help="trained run: its student/model is served")
    ap.add_argument("--precision", default="int8", choices=("fp32", "bf16", "int8"))
    ap.add_argument("--threads", type=int, default=1, help="the engine's intra-op threads (the server's default on 2 cores)")
    ap.add_argument("--per-request", default="1,16", help="sentences per request, comma-separated")
    ap.add_argument("--loads", default="0.5,0.8", help="fractions of the lower capacity of the two schedulers")
    ap.add_argument("--seconds", type=float, default=5.0, help="per load point")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight for the capacity")
    ap.add_argument("--max-batch-tokens", type=int, default=4096)
    ap.add_argument("--max-wait-ms", type=float, default=2.0, help="the batch scheduler's wait to fill")
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "scheduler.json"))
    args = ap.parse_args(argv)

    import torch

    from _harness import cpu_model
    from bench_serve import test_sentences
    from costeff.inference import InferenceEngine
    from costeff.inference.model_dir import DirTokenizer, read_engine_config
    from costeff.serve.schedulers import make_scheduler

    torch.set_num_threads(args.threads)
    model = os.path.join(args.run, "student", "model")
    engine = InferenceEngine.from_pretrained(model, args.precision)
    config = read_engine_config(model)
    threshold = float(config.inference_threshold or 0.0)
    tok = DirTokenizer(model)
    texts, _ = test_sentences(args.sentences)
    ids, types = tok.encode(texts, max_length=tok.max_length(config.max_positions))
    rows = [(x, t if config.type_vocab_size > 1 else None) for x, t in zip(ids, types)]

    def maker(kind):
        return lambda: make_scheduler(kind, engine, max_batch_tokens=args.max_batch_tokens, max_queue_tokens=1 << 40, base_threshold=threshold,
                                      max_wait_ms=args.max_wait_ms, max_queue_ms=0, inline_max_tokens=256).start()

    gc.collect()
    gc.freeze()  # as costeff serve does after start-up: no full collection over torch's objects mid-run
    kinds = ("layer", "batch")
    results = []
    for k in (int(x) for x in args.per_request.split(",")):
        caps = {kind: capacity(maker(kind), rows, k, args.concurrency, args.seconds) for kind in kinds}
        reference = min(caps.values())
        print(f"[bench_scheduler] {k} per request: capacity " + ", ".join(f"{kind} {c:.0f}/s" for kind, c in caps.items()), flush=True)
        for frac in (float(x) for x in args.loads.split(",")):
            for i, kind in enumerate(kinds if len(results) % 2 == 0 else kinds[::-1]):  # alternate which goes first
                point = open_loop(maker(kind), rows, k, frac * reference, args.seconds, seed=int(1000 * frac) + k)
                point.update(scheduler=kind, per_request=k, load=frac, capacity_per_s=caps[kind], reference_per_s=reference)
                results.append(point)
                print(f"  {kind:5s} {frac:>4.0%} of {reference:.0f}/s: {point['achieved_per_s']:6.0f}/s  mean {point['mean_ms']:7.2f}  "
                      f"p50 {point['p50_ms']:7.2f}  p99 {point['p99_ms']:7.2f} ms  exit {point['avg_exit_layer']:.2f}", flush=True)
    print("\n| per request | load | scheduler | offered /s | achieved /s | mean ms | p50 ms | p90 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: (r["per_request"], r["load"], r["scheduler"] != "layer")):
        print(f"| {r['per_request']} | {r['load']:.0%} | {r['scheduler']} | {r['offered_per_s']:.0f} | {r['achieved_per_s']:.0f} | {r['mean_ms']:.2f} | "
              f"{r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} |")
    meta = {"cpu": cpu_model(), "run": args.run, "precision": args.precision, "threads": args.threads, "threshold": threshold,
            "max_batch_tokens": args.max_batch_tokens, "max_wait_ms": args.max_wait_ms, "seconds_per_point": args.seconds,
            "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/bench_scheduler.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": results}, f, indent=2)
    os.replace(tmp, args.out)
    print(f"[bench_scheduler] {meta['cpu']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
