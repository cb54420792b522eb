"""Entropy early exit on a GPU: the exit decision and the row compaction stay on the device, and each
exit segment replays a CUDA graph captured once per (segment, batch bucket, length bucket).

``CostEffForSequenceClassification.early_exit`` is the reference this runner is tested against (same
exit layers away from the threshold, fp32 logits within 1e-5). What it does differently:

- Rows and columns live in fixed-size buckets (powers of two): a batch of 23 rows of at most 37
  tokens runs as 32 x 64; rows that are not real (bucket padding, rows that have left) are carried
  as invalid and never written out. Fixed shapes are what a CUDA graph replays.
- After each exit, the rows that stay are moved to the front by a stable sort on the device and the
  outputs of the rows that leave are scattered into place (rows that stay write to a spare row), with
  no boolean indexing. One small tensor (rows that stay, their longest real length, non-finite rows)
  is then read on the host: the one sync of the segment, which picks the next buckets (smaller as
  rows leave) or ends the call. The first segment's sync also carries the input checks.
- Precision ``bf16``: the embeddings and layers in bfloat16 (matmuls and attention through
  torch.nn.functional: cuBLAS and SDPA), LayerNorm sums and the exit heads in float32, as
  costeff's autocast policy; ``fp32``: everything in float32.

The same code runs on the CPU without graphs (what CI tests); ``graphs=None`` turns them on on CUDA.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from costeff.device import resolve_device
from costeff.models.modeling_costeff import (CostEffForSequenceClassification, EarlyExitOutput, check_input_shape, exit_input,
                                             segment_spans)
from costeff.ops._checks import check_threshold
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


def compact_order(stay: torch.Tensor) -> torch.Tensor:
    """Row order that puts the rows that stay first, each group in its original order (a stable sort
    on the device: no host sync, unlike boolean indexing or nonzero)."""
    return torch.argsort((~stay).to(torch.int8), stable=True)


def scatter_target(leave: torch.Tensor, rows: torch.Tensor, spare: int) -> torch.Tensor:
    """Output row of each bucket row: its original row when it leaves now, else ``spare`` (an extra
    output row that is thrown away)."""
    return torch.where(leave, rows, torch.full_like(rows, spare))


class GpuRunner:
    """Early exit of a costeff classifier with on-device compaction and CUDA graphs.

    ``GpuRunner(model, device="cuda", precision="bf16")``; call it like ``model.early_exit``:
    ``runner(input_ids, attention_mask, token_type_ids, threshold=...)`` -> EarlyExitOutput (logits
    float32, exit_layer int64, entropy float32, on the runner's device, rows in input order).
    ``syncs`` counts the host syncs of the last call (at most one per exit segment)."""

    def __init__(self, model: CostEffForSequenceClassification, device: str = "auto", precision: str = "fp32",
                 graphs: Optional[bool] = None, batch_buckets: Sequence[int] = BATCH_BUCKETS,
                 length_sizes: Optional[Sequence[int]] = None):
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
        # LayerNorm parameters in float32 once (the sums are normalised in float32 at either precision)
        self._norms = [tuple((n.weight.float(), n.bias.float(), n.eps) for n in (layer.attention_norm, layer.ffn_norm))
                       for layer in m.costeff.layers]
        self.spans = segment_spans(cfg)
        self.exit_layers = cfg.exit_layers()
        self._graphs: dict = {}
        self.syncs = 0

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
        h1 = F.layer_norm(a.float() + h.float(), (width,), w1, b1, e1).to(h.dtype)
        ffn = layer.ffn
        f = F.linear(F.gelu(F.linear(h1, ffn.in_weight, ffn.in_bias)), ffn.out_weight, ffn.out_bias) if ffn.in_weight.shape[0] \
            else ffn.out_bias.expand_as(h1)
        return F.layer_norm(f.float() + h1.float(), (width,), w2, b2, e2).to(h.dtype)

    def _segment(self, k: int, h: torch.Tensor, key_mask: torch.Tensor):
        start, end = self.spans[k]
        for i in range(start, end):
            h = self._layer(i, h, key_mask)
        ex = self.model.exits[k]
        x = exit_input(h.float(), key_mask, self.config, end == self.config.num_hidden_layers)
        pw = ex.pooler.weight if ex.pooler is not None else None
        pb = ex.pooler.bias if ex.pooler is not None else None
        logits, entropy = exit_head_logits_entropy(x, ex.classifier.weight, ex.classifier.bias, pw, pb, ex.activation)
        return logits, entropy, h

    def _first(self, ids, key_mask, types):
        h = self.model.costeff.embeddings(ids, types, False, False, key_mask)
        return self._segment(0, h, key_mask)

    # -- graphs ------------------------------------------------------------------------------------

    def _run(self, k: int, inputs: tuple):
        """Segment k on ``inputs`` (ids, mask, types for k = 0, else hidden, mask): eagerly, or by
        replaying the graph of its shapes (captured on first use)."""
        fn = self._first if k == 0 else (lambda h, mask: self._segment(k, h, mask))
        if not self.graphs:
            return fn(*inputs)
        key = (k, *inputs[0].shape[:2])
        entry = self._graphs.get(key)
        if entry is None:
            static = tuple(t.clone() for t in inputs)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the capture (cuBLAS handles, SDPA kernel choice)
                    fn(*static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn(*static)
            entry = self._graphs[key] = (graph, static, out)
        graph, static, out = entry
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        graph.replay()
        return out

    # -- the call ----------------------------------------------------------------------------------

    def _read(self, t: torch.Tensor) -> list:
        self.syncs += 1
        return t.tolist()

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 token_type_ids: Optional[torch.Tensor] = None, threshold: float = 0.0) -> EarlyExitOutput:
        threshold = check_threshold("GpuRunner", threshold)
        self.syncs = 0
        ids, mask, types = self._check_shapes(input_ids, attention_mask, token_type_ids)
        b = ids.shape[0]
        n = len(self.exit_layers)
        cfg = self.config
        logits_out = torch.zeros(b + 1, cfg.num_labels, dtype=torch.float32, device=self.device)  # + the spare row
        entropy_out = torch.zeros(b + 1, dtype=torch.float32, device=self.device)
        layer_out = torch.zeros(b + 1, dtype=torch.long, device=self.device)
        for start in range(0, b, self.batch_buckets[-1]):
            stop = min(b, start + self.batch_buckets[-1])
            self._run_chunk(ids[start:stop], mask[start:stop], types[start:stop], start, threshold, logits_out, entropy_out, layer_out, b, n)
        return EarlyExitOutput.of(logits_out[:b], layer_out[:b], entropy_out[:b])

    def _check_shapes(self, input_ids, attention_mask, token_type_ids):
        """Shape and dtype rules of ``prepare_inputs`` on the host; the value rules (id range, 0/1
        mask, no empty row) are checked on the device and read with the first segment's sync."""
        check_input_shape(self.config, input_ids)
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and (not isinstance(t, torch.Tensor) or t.shape != input_ids.shape):
                raise ValueError(f"GpuRunner: {name} must be a Tensor of the shape of input_ids {list(input_ids.shape)}")
            if t is not None and (t.is_complex() or (name == "token_type_ids" and (t.dtype.is_floating_point or t.dtype == torch.bool))):
                raise TypeError(f"GpuRunner: {name} has dtype {t.dtype}")
        ids = input_ids.to(self.device, non_blocking=True).long()
        mask = (torch.ones_like(ids) if attention_mask is None else attention_mask.to(self.device, non_blocking=True))
        types = torch.zeros_like(ids) if token_type_ids is None else token_type_ids.to(self.device, non_blocking=True).long()
        return ids, mask, types

    def _run_chunk(self, ids, mask, types, offset, threshold, logits_out, entropy_out, layer_out, spare, n):
        cfg = self.config
        b, s = ids.shape
        key = mask.bool()
        # the value rules, read with the first segment's sync; until then ids and types are clamped so
        # that a bad id cannot fault the embedding lookup on the device
        bad_mask = ((mask != 0) & (mask != 1)).sum() if mask.dtype != torch.bool else torch.zeros((), dtype=torch.long, device=self.device)
        checks = torch.stack([ids.min(), ids.max(), bad_mask.long(), (~key.any(1)).sum(), types.min(), types.max()])
        bb, ll = bucket(b, self.batch_buckets), bucket(s, self.length_sizes)
        # bucket padding: rows of one real token (id 0), marked invalid and never written out
        pad_ids = torch.zeros(bb, ll, dtype=torch.long, device=self.device)
        pad_mask = torch.zeros(bb, ll, dtype=torch.bool, device=self.device)
        pad_mask[:, 0] = True
        pad_types = torch.zeros(bb, ll, dtype=torch.long, device=self.device)
        pad_ids[:b, :s] = ids.clamp(0, cfg.vocab_size - 1)
        pad_mask[:b, :s] = key
        pad_types[:b, :s] = types.clamp(0, cfg.type_vocab_size - 1)
        valid = torch.zeros(bb, dtype=torch.bool, device=self.device)
        valid[:b] = True
        row_of = torch.full((bb,), spare, dtype=torch.long, device=self.device)
        row_of[:b] = torch.arange(offset, offset + b, device=self.device)
        inputs, mask_now = (pad_ids, pad_mask, pad_types), pad_mask
        for k in range(n):
            logits, entropy, hidden = self._run(k, inputs)
            last = k == n - 1
            finite = torch.isfinite(entropy)
            leave = valid if last else valid & (entropy < threshold)
            target = scatter_target(leave, row_of, spare)
            logits_out.index_copy_(0, target, logits.float())
            entropy_out.index_copy_(0, target, entropy.float())
            layer_out.index_fill_(0, target, self.exit_layers[k])
            stay = valid & ~leave
            cols = torch.arange(mask_now.shape[1], device=self.device)
            length_stay = torch.where(mask_now & stay[:, None], cols + 1, 0).amax()
            stats = torch.stack([stay.sum(), length_stay, (valid & ~finite).sum()])
            if k == 0:
                stats = torch.cat([stats, checks])
            got = self._read(stats)  # the segment's one host sync
            if k == 0:
                self._raise_on_bad_input(*got[3:])
            n_stay, length, n_nonfinite = got[:3]
            if n_nonfinite:
                raise ValueError("GpuRunner: non-finite logits (NaN/Inf) in some rows: check the inputs and the weights for NaN/Inf")
            if last or n_stay == 0:
                return
            nb, nl = bucket(n_stay, self.batch_buckets), bucket(length, self.length_sizes)
            order = compact_order(stay)[:nb]  # buckets only shrink as rows leave: nb <= the current bucket
            valid, row_of = stay[order], row_of[order]
            hidden, mask_now = hidden[order, :nl].contiguous(), mask_now[order, :nl].contiguous()
            inputs = (hidden, mask_now)

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


__all__ = ["GpuRunner", "bucket", "length_buckets", "compact_order", "scatter_target", "BATCH_BUCKETS"]
