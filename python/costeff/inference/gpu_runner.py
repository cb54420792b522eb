"""Entropy early exit on a GPU: the exit decision, the row compaction and the bookkeeping stay on the
device, inside one CUDA graph per (segment, batch bucket, length bucket), captured once and replayed.

``CostEffForSequenceClassification.early_exit`` is the reference this runner is tested against (same
exit layers away from the threshold, fp32 logits within 1e-5). What it does differently:

- Rows and columns live in fixed-size buckets (powers of two): a batch of 23 rows of at most 37
  tokens runs as 32 x 64; rows that are not real (bucket padding, rows that have left) are carried
  as invalid and never written out. Fixed shapes are what a CUDA graph replays.
- The state between segments lives in buffers the runner owns (hidden states, masks, rows, outputs,
  at the largest bucket's size): segment k's graph reads its buckets' corner of them, and after its
  exit scatters the rows that leave into the output buffer and writes the rows that stay back,
  compacted to the front (a cumulative-sum permutation written with index_copy_: no sort, no
  gather, no boolean indexing). Everything a
  call does on the device besides staging the inputs and copying the outputs out is in the graphs:
  measured on an H200, the host time of ~40 eager launches per segment was the cost, not the math.
- One small tensor per segment (rows that stay, their longest real length, non-finite rows; with
  the input checks at the first segment) is read on the host after the replay: the segment's one
  host sync, which picks the next, smaller buckets or ends the call.
- Precision ``bf16``: the embeddings and layers in bfloat16 (matmuls and attention through
  torch.nn.functional: cuBLAS and SDPA), LayerNorm sums and the exit heads in float32, as
  costeff's autocast policy; ``fp32``: everything in float32.

The same code runs on the CPU without graphs (what CI tests); ``graphs=None`` turns them on on CUDA.
A runner is not thread-safe: its buffers hold one call's state.
"""
from __future__ import annotations

import copy
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from costeff.device import resolve_device
from costeff.models.modeling_costeff import (CostEffForSequenceClassification, EarlyExitOutput, check_input_shape, exit_input,
                                             pools_mean, segment_spans)
from costeff.ops._checks import check_threshold
from costeff.ops._registry import has_compiled_kernel
from costeff.ops.add_layer_norm import add_layer_norm
from costeff.ops.exit_head import exit_head_logits_entropy

PRECISIONS = ("fp32", "bf16")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket(n: int, sizes: Sequence[int]) -> int:
    """The smallest size in ``sizes`` (ascending) holding ``n``; the largest when none does."""
    for s in sizes:
        if s >= n:
            return s
    return sizes[-1]


def length_buckets(max_len: int, smallest: int = 8) -> tuple:
    """Powers of two from ``smallest`` up to ``max_len``, and ``max_len`` itself."""
    sizes, s = [], smallest
    while s < max_len:
        sizes.append(s)
        s *= 2
    return tuple(sizes) + (max_len,)


def compaction_dest(stay: torch.Tensor) -> torch.Tensor:
    """Where each row goes when the rows that stay move to the front, each group in its original
    order: a permutation from cumulative sums (no host sync, unlike boolean indexing or nonzero; no
    sort)."""
    before = stay.cumsum(0)  # rows that stay up to and including each row
    return torch.where(stay, before - 1, before[-1] + torch.arange(stay.shape[0], device=stay.device) - before)


def scatter_target(leave: torch.Tensor, rows: torch.Tensor, spare: int) -> torch.Tensor:
    """Output row of each bucket row: its original row when it leaves now, else ``spare`` (an extra
    output row that is thrown away)."""
    return torch.where(leave, rows, spare)


def exit_decide_reference(entropy: torch.Tensor, logits: torch.Tensor, row: torch.Tensor, key: torch.Tensor, threshold: torch.Tensor,
                          out: torch.Tensor, stats: torch.Tensor, layer: float, spare: int, last: bool):
    """The exit bookkeeping of one segment (costeff_kernels/exit_decide.py does it in one launch): the
    rows that leave (valid rows with entropy < threshold; every valid row at the last exit) are
    written into their output rows of ``out`` as [logits | entropy | exit layer]; ``stats[:3]`` gets
    the rows that stay, their longest real length and the non-finite rows. A row is valid when its
    output row is not ``spare``. Returns (dest, new_row): where each row goes when the rows that stay
    move to the front, and each row's output row after this exit (``spare`` unless it stays)."""
    valid = row != spare
    leave = valid if last else valid & (entropy < threshold)
    out.index_copy_(0, scatter_target(leave, row, spare), torch.cat([logits.float(), entropy.float()[:, None], torch.full_like(entropy[:, None], layer)], 1))
    stay = valid ^ leave  # leave is within valid
    positions = torch.arange(1, key.shape[1] + 1, device=key.device)
    length = torch.where(key & stay[:, None], positions, 0).amax()
    torch.stack([stay.sum(), length, (valid & ~torch.isfinite(entropy)).sum()], out=stats[:3])
    return compaction_dest(stay), torch.where(stay, row, spare)


class GpuRunner:
    """Early exit of a costeff classifier with on-device compaction and CUDA graphs.

    ``GpuRunner(model, device="cuda", precision="bf16")``; call it like ``model.early_exit``:
    ``runner(input_ids, attention_mask, token_type_ids, threshold=...)`` -> EarlyExitOutput (logits
    float32, exit_layer int64, entropy float32, on the runner's device, rows in input order).
    ``syncs`` counts the host syncs of the last call (at most one per exit segment)."""

    def __init__(self, model: CostEffForSequenceClassification, device: str = "auto", precision: str = "fp32",
                 graphs: Optional[bool] = None, batch_buckets: Sequence[int] = BATCH_BUCKETS,
                 length_sizes: Optional[Sequence[int]] = None, fused_exit: Optional[bool] = None):
        if not isinstance(model, CostEffForSequenceClassification):
            raise TypeError(f"GpuRunner needs a costeff CostEffForSequenceClassification, got {type(model).__name__}")
        if precision not in PRECISIONS:
            raise ValueError(f"GpuRunner: precision must be one of {PRECISIONS}, got {precision!r}")
        buckets = tuple(batch_buckets)
        if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"GpuRunner: batch_buckets must be ascending distinct integers >= 1, got {batch_buckets!r}")
        self.device = resolve_device(device, "GpuRunner")
        self.precision = precision
        self.graphs = self.device.type == "cuda" if graphs is None else bool(graphs)
        if self.graphs and self.device.type != "cuda":
            raise ValueError("GpuRunner: CUDA graphs need a CUDA device")
        cfg = model.config
        self.config = cfg
        self.max_len = cfg.max_position_embeddings - (cfg.position_offset or 0)
        self.batch_buckets = buckets
        self.length_sizes = tuple(length_sizes) if length_sizes else length_buckets(self.max_len)
        if list(self.length_sizes) != sorted(set(self.length_sizes)) or self.length_sizes[-1] > self.max_len or self.length_sizes[0] < 1:
            raise ValueError(f"GpuRunner: length_sizes must be ascending, within [1, {self.max_len}], got {length_sizes!r}")
        m = copy.deepcopy(model).eval().to(self.device)
        for p in m.parameters():
            p.requires_grad_(False)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        if precision == "bf16":
            m.costeff.to(torch.bfloat16)  # the exits stay float32: entropies decide
        self.model = m
        # residual add + LayerNorm: costeff's fused kernel where it is compiled for the device (sums and
        # normalisation in float32, one launch instead of five); else PyTorch on float32 copies of the
        # parameters, the same arithmetic
        self._fused_norm = has_compiled_kernel("add_layer_norm", "CUDA" if self.device.type == "cuda" else "CPU")
        self._norms = [tuple((n.weight if self._fused_norm else n.weight.float(), n.bias if self._fused_norm else n.bias.float(), n.eps)
                             for n in (layer.attention_norm, layer.ffn_norm)) for layer in m.costeff.layers]
        self.spans = segment_spans(cfg)
        self.exit_layers = cfg.exit_layers()
        self._kernels = self._fused_kernels(fused_exit)  # (exit_decide, exit_pool_head) Triton launchers, or None
        self._graphs: dict = {}
        self._pool = None
        self.syncs = 0
        # the state between segments, at the largest bucket's size; row ``spare`` of the output takes
        # the writes of the rows that do not leave
        dev, mb, ml = self.device, buckets[-1], self.max_len
        self.spare = mb
        self._in = torch.zeros(3, mb, ml, dtype=torch.long, device=dev)  # ids, mask, types (only [:, :b, :s] is read)
        self._size = torch.zeros(2, dtype=torch.long, device=dev)  # b, s of the chunk
        self._size_host = torch.zeros(2, dtype=torch.long, pin_memory=dev.type == "cuda")
        self._threshold = torch.zeros((), dtype=torch.float32, device=dev)
        self._threshold_value = None
        self._hidden = torch.zeros(mb, ml, cfg.hidden_size, dtype=self.dtype, device=dev)
        self._mask = torch.zeros(mb, ml, dtype=torch.bool, device=dev)
        self._iota = torch.arange(mb, device=dev)
        self._positions = torch.arange(1, ml + 1, device=dev)
        self._row = torch.zeros(mb, dtype=torch.long, device=dev)
        self._out = torch.zeros(mb + 1, cfg.num_labels + 2, dtype=torch.float32, device=dev)  # logits, entropy, exit layer
        self._stats = torch.zeros(9, dtype=torch.long, device=dev)

    def __repr__(self) -> str:
        return (f"GpuRunner(device={str(self.device)!r}, precision={self.precision!r}, graphs={self.graphs}, "
                f"exits={len(self.spans)}, captured={len(self._graphs)})")

    # -- the math of one segment (fixed shapes: what a graph captures) ---------------------------

    def _layer(self, i: int, h: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        layer = self.model.costeff.layers[i]
        (w1, b1, e1), (w2, b2, e2) = self._norms[i]
        att = layer.attention
        b, s, width = h.shape
        if att.num_heads:
            qkv = F.linear(h, att.qkv_weight, att.qkv_bias).view(b, s, 3, att.num_heads, att.head_size).permute(2, 0, 3, 1, 4)
            ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=key_mask[:, None, None, :])
            a = F.linear(ctx.transpose(1, 2).reshape(b, s, -1), att.out_weight, att.out_bias)
        else:
            a = att.out_bias.expand_as(h)
        h1 = self._add_norm(a, h, w1, b1, e1)
        ffn = layer.ffn
        f = F.linear(F.gelu(F.linear(h1, ffn.in_weight, ffn.in_bias)), ffn.out_weight, ffn.out_bias) if ffn.in_weight.shape[0] \
            else ffn.out_bias.expand_as(h1)
        return self._add_norm(f, h1, w2, b2, e2)

    def _add_norm(self, x: torch.Tensor, residual: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
        if self._fused_norm:
            return add_layer_norm(x.contiguous(), residual, weight, bias, eps)
        return F.layer_norm(x.float() + residual.float(), (x.shape[-1],), weight, bias, eps).to(residual.dtype)

    def _segment(self, k: int, h: torch.Tensor, key_mask: torch.Tensor):
        start, end = self.spans[k]
        for i in range(start, end):
            h = self._layer(i, h, key_mask)
        ex = self.model.exits[k]
        last = end == self.config.num_hidden_layers
        if self._kernels and ex.pooler is None:
            logits, entropy = self._kernels[1](h, key_mask, ex.classifier.weight, ex.classifier.bias, ex.activation,
                                               pools_mean(self.config, last))
            return logits, entropy, h
        x = exit_input(h.float(), key_mask, self.config, last)
        pw = ex.pooler.weight if ex.pooler is not None else None
        pb = ex.pooler.bias if ex.pooler is not None else None
        logits, entropy = exit_head_logits_entropy(x, ex.classifier.weight, ex.classifier.bias, pw, pb, ex.activation)
        return logits, entropy, h

    def _fused_kernels(self, fused: Optional[bool]):
        """The exit head and the exit bookkeeping as one Triton launch each (costeff_kernels/exit_pool_head.py,
        exit_decide.py) on CUDA where Triton is installed; else (None) their PyTorch references.
        ``fused=True`` asks for the kernels (on the CPU only under TRITON_INTERPRET=1)."""
        import importlib.util
        import os

        if fused is None:
            fused = self.device.type == "cuda" and importlib.util.find_spec("triton") is not None
        if not fused:
            return None
        if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError("GpuRunner: fused_exit=True needs a CUDA device (or TRITON_INTERPRET=1 on the CPU)")
        from costeff_kernels.exit_decide import exit_decide_triton
        from costeff_kernels.exit_pool_head import exit_pool_head_triton
        return exit_decide_triton, exit_pool_head_triton

    def _step(self, k: int, bb: int, ll: int) -> None:
        """Segment k on the (bb, ll) corner of the state buffers: the layers, the exit, the outputs
        of the rows that leave, the compacted rows that stay, the stats for the host. Fixed shapes
        and no host sync: what one CUDA graph captures. A row is valid while its output row is not
        ``spare``. Written for few launches: each costs 1-4 us on the GPU at these sizes."""
        cfg, spare = self.config, self.spare
        if k == 0:
            positions = self._positions[:ll]  # 1..ll
            iota = self._iota[:bb]
            valid = iota < self._size[0]
            inside = valid[:, None] & (positions <= self._size[1])
            ids, mask, types = torch.where(inside, self._in[:, :bb, :ll], 0).unbind(0)
            real = inside & (mask == 1)
            key = torch.where(valid[:, None], real, positions == 1)  # bucket padding: rows of one token
            ids_lo, ids_hi = torch.aminmax(ids)
            types_lo, types_hi = torch.aminmax(types)
            checks = [ids_lo, ids_hi, mask.clamp(0, 1).ne(mask).sum(), (valid & ~real.any(1)).sum(), types_lo, types_hi]
            # clamped until the checks are read, so that a bad id cannot fault the embedding lookup
            h = self.model.costeff.embeddings(ids.clamp(0, cfg.vocab_size - 1), types.clamp(0, cfg.type_vocab_size - 1), False, False, key)
            row_of = torch.where(valid, iota, spare)
        else:
            h = self._hidden[:bb, :ll].contiguous()
            key = self._mask[:bb, :ll].clone()  # a copy: the compaction below writes back over this corner
            row_of = self._row[:bb]
            checks = []
        logits, entropy, h = self._segment(k, h, key)
        last = k == len(self.spans) - 1
        exit_decide = self._kernels[0] if self._kernels else exit_decide_reference
        dest, new_row = exit_decide(entropy.float(), logits.float(), row_of, key, self._threshold, self._out, self._stats,
                                          float(self.exit_layers[k]), spare, last)
        if checks:
            torch.stack(checks, out=self._stats[3:9])
        if not last:
            self._hidden[:bb, :ll].index_copy_(0, dest, h)
            self._mask[:bb, :ll].index_copy_(0, dest, key)
            self._row[:bb].index_copy_(0, dest, new_row)

    # -- graphs ------------------------------------------------------------------------------------

    def _state(self) -> tuple:
        return self._in, self._size, self._hidden, self._mask, self._row, self._out, self._stats

    def _eager_step(self, k: int, bb: int, ll: int) -> None:
        """``_step`` run eagerly; if a fused exit kernel fails there (a Triton compile error on an
        untried GPU), say so and use the PyTorch references from then on (the step writes no state
        before the exit bookkeeping, so it is simply rerun)."""
        try:
            self._step(k, bb, ll)
        except Exception as exc:  # noqa: BLE001 - any failure of the kernel path; the rerun raises what is not its fault
            if self._kernels is None:
                raise
            warnings.warn(f"GpuRunner: the fused exit kernels failed ({type(exc).__name__}: {str(exc)[:500]}); "
                          "using their PyTorch references", RuntimeWarning, stacklevel=2)
            self._kernels = None
            self._step(k, bb, ll)

    def _run(self, k: int, bb: int, ll: int) -> None:
        """Segment k at buckets (bb, ll): eagerly, or by replaying its graph (captured on first use;
        the warm-up runs change the state buffers, so the call's state is put back after them)."""
        if not self.graphs:
            self._eager_step(k, bb, ll)
            return
        graph = self._graphs.get((k, bb, ll))
        if graph is None:
            saved = [t.clone() for t in self._state()]
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the capture (cuBLAS handles, SDPA kernel choice, Triton compile)
                    self._eager_step(k, bb, ll)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # one memory pool for all graphs: they run one after another and keep nothing in it between runs
            with torch.cuda.graph(graph, pool=self._pool):
                self._step(k, bb, ll)
            for t, v in zip(self._state(), saved):
                t.copy_(v)
            self._graphs[(k, bb, ll)] = graph
        graph.replay()

    # -- the call ----------------------------------------------------------------------------------

    def _read(self, n: int) -> list:
        """The segment's stats: reading them is the segment's one host sync."""
        self.syncs += 1
        return self._stats[:n].tolist()

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 token_type_ids: Optional[torch.Tensor] = None, threshold: float = 0.0) -> EarlyExitOutput:
        threshold = check_threshold("GpuRunner", threshold)
        self.syncs = 0
        staged = self._check_and_stage(input_ids, attention_mask, token_type_ids)
        if self._threshold_value != threshold:
            self._threshold.fill_(threshold)
            self._threshold_value = threshold
        b, labels, mb = staged.shape[1], self.config.num_labels, self.batch_buckets[-1]
        if b <= mb:
            self._run_chunk(staged)
            out = self._out[:b].clone()
        else:
            out = torch.empty(b, labels + 2, dtype=torch.float32, device=self.device)
            for start in range(0, b, mb):
                stop = min(b, start + mb)
                self._run_chunk(staged[:, start:stop])
                out[start:stop].copy_(self._out[:stop - start])
        return EarlyExitOutput.of(out[:, :labels], out[:, labels + 1].long(), out[:, labels])

    def _check_and_stage(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        """Shape and dtype rules of ``prepare_inputs`` on the host; the value rules (id range, 0/1
        mask, no empty row) are checked on the device and read with the first segment's sync.
        Returns ids, mask and types stacked as one (3, b, s) int64 tensor on the device."""
        check_input_shape(self.config, input_ids)
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and (not isinstance(t, torch.Tensor) or t.shape != input_ids.shape):
                raise ValueError(f"GpuRunner: {name} must be a Tensor of the shape of input_ids {list(input_ids.shape)}")
            if t is not None and (t.is_complex() or (name == "token_type_ids" and (t.dtype.is_floating_point or t.dtype == torch.bool))):
                raise TypeError(f"GpuRunner: {name} has dtype {t.dtype}")
        ids = input_ids.to(self.device, non_blocking=True).long()
        if attention_mask is None:
            mask = torch.ones_like(ids)
        else:
            mask = attention_mask.to(self.device, non_blocking=True)
            if mask.dtype.is_floating_point:  # a value other than 0/1 must not become one by truncation
                mask = torch.where((mask == 0) | (mask == 1), mask, 2.0)
            mask = mask.long()
        types = torch.zeros_like(ids) if token_type_ids is None else token_type_ids.to(self.device, non_blocking=True).long()
        return torch.stack([ids, mask, types])

    def _run_chunk(self, staged: torch.Tensor) -> None:
        _, b, s = staged.shape
        self._in[:, :b, :s].copy_(staged)
        self._size_host[0], self._size_host[1] = b, s
        self._size.copy_(self._size_host, non_blocking=True)
        bb, ll = bucket(b, self.batch_buckets), bucket(s, self.length_sizes)
        n = len(self.spans)
        for k in range(n):
            self._run(k, bb, ll)
            got = self._read(9 if k == 0 else 3)
            if k == 0:
                self._raise_on_bad_input(*got[3:])
            n_stay, length, n_nonfinite = got[:3]
            if n_nonfinite:
                raise ValueError("GpuRunner: non-finite logits (NaN/Inf) in some rows: check the inputs and the weights for NaN/Inf")
            if k == n - 1 or n_stay == 0:
                return
            bb, ll = bucket(n_stay, self.batch_buckets), bucket(length, self.length_sizes)

    def _raise_on_bad_input(self, lo, hi, n_bad, n_empty, tlo, thi) -> None:
        cfg = self.config
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"GpuRunner: input_ids must be in [0, vocab_size={cfg.vocab_size}), got values in [{lo}, {hi}]")
        if n_bad:
            raise ValueError("GpuRunner: attention_mask must hold 0/1 (1 = real token); additive masks are not accepted")
        if n_empty:
            raise ValueError(f"GpuRunner: {n_empty} attention_mask rows have no real token (all padding); remove them from the batch")
        if tlo < 0 or thi >= cfg.type_vocab_size:
            raise ValueError(f"GpuRunner: token_type_ids must be in [0, type_vocab_size={cfg.type_vocab_size})")


__all__ = ["GpuRunner", "bucket", "length_buckets", "compaction_dest", "scatter_target", "exit_decide_reference", "BATCH_BUCKETS"]
