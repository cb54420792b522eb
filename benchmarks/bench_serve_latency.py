"""Where a served sentence's time goes at concurrency 1: a ladder of servers, each doing one step more
than the one before, and ``costeff serve`` itself, timed in interleaved rounds with the engine's own
batch-1 call (so that a slow phase of the machine shifts every rung alike):

  engine b1        the engine on pre-tokenized sentences, in a loop, no server (the issue's reference)
  tokenize+engine  the same from the text: tokenize, pad, call (a user's own loop)
  socket           serve_floor.py --stage socket: a blocking socket answering a fixed response
  asgi             + uvicorn (httptools, asyncio) and an ASGI callable answering the same
  tokenize         + the JSON body parsed and the sentence tokenized
  engine           + the engine call and a JSON answer: the floor of a Python server
  costeff serve    + validation, admission, the scheduler, metrics, headers, the full answer (once per
                   --variant, each against the floor)

Every server alone on the server's CPUs, idle between its turns; each request sent by one blocking
keep-alive client on the client's CPUs (``bench_serve.serial``). Median over all rounds but the first; the
range of each round's own median over the engine's in that round shows the machine's drift.

  python benchmarks/bench_serve_latency.py --server-cpus 0 --client-cpus 1
"""
from __future__ import annotations

import argparse
import gc
import os
import shlex
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(ROOT, "python"), HERE]

from bench_serve import EngineBatch1, encode_post, parse_cpus, pin, serial, start_server, test_sentences  # noqa: E402

FLOORS = ("socket", "asgi", "tokenize", "engine")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=os.path.join(ROOT, "runs", "demo"), help="trained run: its student/model is served")
    ap.add_argument("--precision", default="int8", choices=("fp32", "bf16", "int8"))
    ap.add_argument("--sentences", type=int, default=300, help="sentences per block (Rotten Tomatoes test)")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds (after one to warm up)")
    ap.add_argument("--variant", action="append", default=None, metavar="FLAGS",
                    help="a `costeff serve` with these extra flags, one rung each (repeat it to compare, e.g. --variant '' "
                         "--variant '--busy-poll-us 500'; default: one, without extra flags)")
    ap.add_argument("--server-cpus", default="0", help="CPUs of every server and of the engine's own blocks")
    ap.add_argument("--client-cpus", default="1", help="CPUs of the client")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "serve_latency.json"))
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.sentences < 1:
        ap.error("--rounds and --sentences must be >= 1")
    server_cpus, client_cpus = parse_cpus(args.server_cpus), parse_cpus(args.client_cpus)
    model = os.path.join(args.run, "student", "model")
    if not os.path.isfile(os.path.join(model, "config.json")):
        sys.exit(f"bench_serve_latency: {model} is not a model directory: train a run first (bash scripts/demo.sh) or pass --run DIR")

    import torch

    from _harness import cpu_model
    from costeff.pipeline.checkpoint import atomic_write_json
    from costeff.serve.config import ServeConfig
    from costeff.serve.server import engine_threads

    pin(server_cpus)
    threads = engine_threads(ServeConfig(model="", threads=0))  # what the server runs with on these CPUs
    torch.set_num_threads(threads)
    texts, _ = test_sentences(args.sentences)
    requests = [encode_post("/predict", {"inputs": t}) for t in texts]
    engine = EngineBatch1(model, args.precision, texts)
    servers = {}
    try:
        for stage in FLOORS:
            servers[f"floor: {stage}"] = start_server(model, "floor", args.precision, threads, [], server_cpus, floor_stage=stage)[:2]
        for flags in args.variant or [""]:
            name = "costeff serve" + (f" {flags.strip()}" if flags.strip() else "")
            servers[name] = start_server(model, "layer", args.precision, 0, flags.split(), server_cpus)[:2]
        pin(client_cpus)
        gc.collect()
        gc.freeze()  # the client's collector must not pause a timed block (see bench_serve)
        ms = {"engine b1": [], "tokenize+engine": [], **{name: [] for name in servers}}
        for round_ in range(args.rounds + 1):
            pin(server_cpus)
            own, direct = engine.block(), engine.direct_block()
            pin(client_cpus)
            served = {name: serial(base, requests) for name, (_, base) in servers.items()}
            if round_:
                ms["engine b1"].append(own)
                ms["tokenize+engine"].append(direct)
                for name, t in served.items():
                    ms[name].append(t)
            print(f"[bench_serve_latency] round {round_}/{args.rounds}{' (warm-up)' if not round_ else ''}", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)

    p50 = {name: statistics.median(t for block in v for t in block) for name, v in ms.items()}
    # the spread between rounds: each round's median over the engine's median in the same round
    over = {name: [statistics.median(b) - statistics.median(e) for b, e in zip(v, ms["engine b1"])] for name, v in ms.items()}
    # the rung each step adds to: the floor's stages one on the other, every costeff serve on the whole floor
    below = {"tokenize+engine": "engine b1", **{f"floor: {b}": f"floor: {a}" for a, b in zip(FLOORS, FLOORS[1:])},
             **{name: f"floor: {FLOORS[-1]}" for name in servers if not name.startswith("floor: ")}}
    rows = []
    for name, v in p50.items():
        rows.append({"step": name, "p50_ms": v, "over_engine_ms": v - p50["engine b1"],
                     "over_engine_rounds_ms": [min(over[name]), max(over[name])],
                     "added_ms": v - p50[below[name]] if name in below else None, "n": sum(map(len, ms[name]))})
    cpu = cpu_model()
    print(f"\nconcurrency 1, {args.precision}, p50 over {args.rounds} rounds x {args.sentences} sentences; {cpu}; "
          f"server CPUs {sorted(server_cpus)}, client {sorted(client_cpus)}")
    print(f"| {'step':40s} | p50 ms | over engine b1 ms | its range over rounds | added by the step ms |\n|---|---|---|---|---|")
    for r in rows:
        added = "" if r["added_ms"] is None else f"{r['added_ms']:+.3f}"
        lo, hi = r["over_engine_rounds_ms"]
        print(f"| {r['step']:40s} | {r['p50_ms']:.3f} | {r['over_engine_ms']:+.3f} | {lo:+.3f} to {hi:+.3f} | {added} |")
    meta = {"cpu": cpu, "run": args.run, "precision": args.precision, "threads": threads, "server_cpus": sorted(server_cpus),
            "client_cpus": sorted(client_cpus), "rounds": args.rounds, "sentences": args.sentences, "date": time.strftime("%Y-%m-%d"),
            "command": shlex.join(["python", "benchmarks/bench_serve_latency.py", *(argv if argv is not None else sys.argv[1:])])}
    atomic_write_json(args.out, {"meta": meta, "rows": rows})
    print(f"[bench_serve_latency] wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
