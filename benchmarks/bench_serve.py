"""Load benchmark of ``costeff serve``: open-loop Poisson clients over keep-alive HTTP on loopback.

For each system (a ``costeff serve`` process: layer scheduler int8 and fp32, batch scheduler int8 by
default), first its capacity (sentences/s with ``--concurrency`` closed-loop clients), then offered
loads from 10% to 150% of that capacity, each for ``--seconds`` (and at most ``--max-requests``
requests): achieved throughput, p50/p90/p99/p99.9 latency, status counts, average exit layer,
accuracy of the served answers against the labels, server CPU seconds and peak RSS. One sentence per
request (Rotten Tomatoes test sentences). Table + JSON (benchmarks/results/serve.json) + a
latency-vs-throughput plot. Systems run one after the other, each alone on the machine.

  python benchmarks/bench_serve.py --model runs/demo/student/model [--systems layer:int8,layer:fp32,batch:int8]

Not yet here: the HF and ONNX Runtime teachers behind the same server code.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (os.path.join(ROOT, "python"), ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

LOADS = (0.1, 0.5, 0.8, 1.0, 1.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_usage(pid: int) -> tuple[float, float]:
    """(CPU seconds, peak RSS MiB) of a Linux process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 1024
    return cpu, rss


def test_sentences(limit: int):
    from costeff.data import load_task

    dd, _, _, names = load_task("rotten_tomatoes", seed=0)
    test = dd["test"]
    return list(test["text"][:limit]), [str(names[y]) for y in test["label"][:limit]]  # label names, as the server answers


def start_server(model: str, scheduler: str, precision: str, threads: int, extra: list[str]):
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "costeff.cli", "serve", "--model", model, "--port", str(port), "--scheduler", scheduler,
                             "--precision", precision, "--threads", str(threads), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"costeff serve exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(base + "/ready", timeout=1).status_code == 200:
                return proc, base, time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.05)


async def closed_loop(base: str, texts: list[str], concurrency: int, seconds: float) -> float:
    import httpx

    done = 0
    stop = time.monotonic() + seconds

    async def worker(k):
        nonlocal done
        i = k
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            while time.monotonic() < stop:
                r = await c.post("/predict", json={"inputs": texts[i % len(texts)]})
                if r.status_code == 200:
                    done += 1
                i += concurrency

    t0 = time.monotonic()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return done / (time.monotonic() - t0)


async def open_loop(base: str, texts, labels, rate: float, seconds: float, max_requests: int, seed: int = 0) -> dict:
    import httpx

    rng = random.Random(seed)
    n = min(max_requests, max(1, int(rate * seconds)))
    lat, statuses, layers, correct = [], {}, [], 0
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as c:
        async def one(i):
            nonlocal correct
            t0 = time.monotonic()
            try:
                r = await c.post("/predict", json={"inputs": texts[i % len(texts)]})
                code = r.status_code
            except httpx.HTTPError as exc:
                code = type(exc).__name__
                r = None
            statuses[str(code)] = statuses.get(str(code), 0) + 1
            if code == 200:
                lat.append(time.monotonic() - t0)
                a = r.json()
                layers.append(a["exit_layer"])
                correct += int(a["label"] == labels[i % len(labels)])

        tasks, t_start = [], time.monotonic()
        at = t_start
        for i in range(n):
            at += rng.expovariate(rate)
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t_start
    q = statistics.quantiles(lat, n=1000) if len(lat) >= 2 else [float("nan")] * 999
    ok = statuses.get("200", 0)
    return {"offered_per_s": rate, "requests": n, "achieved_per_s": ok / elapsed, "p50_ms": 1000 * q[499], "p90_ms": 1000 * q[899],
            "p99_ms": 1000 * q[989], "p999_ms": 1000 * q[998], "mean_ms": 1000 * statistics.fmean(lat) if lat else float("nan"),
            "statuses": statuses, "avg_exit_layer": statistics.fmean(layers) if layers else None, "accuracy": correct / ok if ok else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "runs", "demo", "student", "model"))
    ap.add_argument("--systems", default="layer:int8,layer:fp32,batch:int8", help="scheduler:precision, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16, help="closed-loop clients of the capacity measurement")
    ap.add_argument("--seconds", type=float, default=5.0, help="per load point")
    ap.add_argument("--max-requests", type=int, default=5000)
    ap.add_argument("--loads", default=",".join(map(str, LOADS)), help="fractions of the measured capacity")
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "serve.json"))
    args = ap.parse_args(argv)
    from _harness import cpu_model

    texts, labels = test_sentences(args.sentences)
    rows = []
    for system in args.systems.split(","):
        scheduler, precision = system.split(":")
        proc, base, ready_s = start_server(args.model, scheduler, precision, args.threads, [])
        try:
            capacity = asyncio.run(closed_loop(base, texts, args.concurrency, args.seconds))
            print(f"[bench_serve] {system}: ready in {ready_s:.1f} s, capacity {capacity:.0f} sentences/s", flush=True)
            for frac in (float(x) for x in args.loads.split(",")):
                cpu0, _ = proc_usage(proc.pid)
                point = asyncio.run(open_loop(base, texts, labels, frac * capacity, args.seconds, args.max_requests))
                cpu1, rss = proc_usage(proc.pid)
                point.update(system=system, load=frac, capacity_per_s=capacity, server_cpu_s=cpu1 - cpu0, server_rss_mib=rss, ready_s=ready_s)
                rows.append(point)
                print(f"  load {frac:>4.0%}: {point['achieved_per_s']:7.0f}/s  p50 {point['p50_ms']:7.2f}  p99 {point['p99_ms']:7.2f} ms  "
                      f"statuses {point['statuses']}  exit {point['avg_exit_layer']}  acc {point['accuracy']}", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    meta = {"cpu": cpu_model(), "model": args.model, "threads": args.threads, "seconds_per_point": args.seconds, "date": time.strftime("%Y-%m-%d")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    os.replace(tmp, args.out)
    plot(rows, args.out.replace(".json", ".png"))
    print(f"[bench_serve] {meta['cpu']}; wrote {args.out}")
    return 0


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system in dict.fromkeys(r["system"] for r in rows):
        pts = sorted((r["achieved_per_s"], r["p99_ms"]) for r in rows if r["system"] == system)
        ax.plot(*zip(*pts), marker="o", label=f"{system} p99")
        pts = sorted((r["achieved_per_s"], r["p50_ms"]) for r in rows if r["system"] == system)
        ax.plot(*zip(*pts), marker=".", linestyle="--", label=f"{system} p50")
    ax.set_xlabel("achieved throughput (sentences/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
