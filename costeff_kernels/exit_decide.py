"""The GPU runner's exit bookkeeping in one launch (costeff.inference.GpuRunner, on CUDA).

After an exit head, for the bucket's rows: which rows leave (valid and entropy < threshold, or all
valid rows at the last exit), their logits/entropy/exit layer scattered into the runner's output
buffer, the compaction destinations of the rows that stay (stayers first, each group in order), the
stayers' output rows, and the stats the host reads (rows that stay, their longest real length,
non-finite rows). In plain PyTorch these are ~20 launches of 1-4 us each on an H200; here one
program does them (bucket rows <= 256). Reference: costeff.inference.gpu_runner.exit_decide_reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from costeff_kernels import _common


@triton.jit
def _exit_decide_kernel(
    entropy_ptr, logits_ptr, row_ptr, key_ptr, threshold_ptr, out_ptr, stats_ptr, dest_ptr, new_row_ptr,
    B, L, S, stride_logits, stride_key, stride_out, layer, spare,
    LAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    r = tl.arange(0, BLOCK_B)
    in_b = r < B
    row = tl.load(row_ptr + r, mask=in_b, other=spare)
    valid = in_b & (row != spare)
    ent = tl.load(entropy_ptr + r, mask=in_b, other=0.0)
    if LAST:
        leave = valid
    else:
        leave = valid & (ent < tl.load(threshold_ptr))
    stay = valid & (leave == 0)
    # the leaving rows' outputs: [logits | entropy | exit layer] into their output rows
    c = tl.arange(0, BLOCK_C)
    vals = tl.load(logits_ptr + r[:, None] * stride_logits + c[None, :], mask=in_b[:, None] & (c < L)[None, :], other=0.0)
    vals = tl.where((c == L)[None, :], ent[:, None], vals)
    vals = tl.where((c == L + 1)[None, :], layer, vals)
    tl.store(out_ptr + row[:, None] * stride_out + c[None, :], vals, mask=leave[:, None] & (c < L + 2)[None, :])
    # the longest real length among the rows that stay (last real position + 1: any mask layout)
    row_len = tl.zeros((BLOCK_B,), dtype=tl.int32)
    for start in range(0, S, BLOCK_S):
        cols = start + tl.arange(0, BLOCK_S)
        k = tl.load(key_ptr + r[:, None] * stride_key + cols[None, :], mask=in_b[:, None] & (cols < S)[None, :], other=0)
        row_len = tl.maximum(row_len, tl.max(tl.where(k != 0, cols[None, :] + 1, 0), axis=1))
    length = tl.max(tl.where(stay, row_len, 0), axis=0)
    bad = valid & ((ent != ent) | (tl.abs(ent) == float("inf")))
    stay_i = stay.to(tl.int32)
    before = tl.cumsum(stay_i, axis=0)  # rows that stay up to and including each row
    n_stay = tl.sum(stay_i, axis=0)
    dest = tl.where(stay, before - 1, n_stay + r - before)
    tl.store(dest_ptr + r, dest.to(tl.int64), mask=in_b)
    tl.store(new_row_ptr + r, tl.where(stay, row, spare), mask=in_b)
    tl.store(stats_ptr, n_stay.to(tl.int64))
    tl.store(stats_ptr + 1, length.to(tl.int64))
    tl.store(stats_ptr + 2, tl.sum(bad.to(tl.int32), axis=0).to(tl.int64))


@_common.on_tensor_device
def exit_decide_triton(entropy: torch.Tensor, logits: torch.Tensor, row: torch.Tensor, key: torch.Tensor, threshold: torch.Tensor,
                       out: torch.Tensor, stats: torch.Tensor, layer: float, spare: int, last: bool):
    """entropy [B] float32, logits [B, L] float32, row [B] int64 (``spare`` = not a real row), key
    [B, S] bool (real tokens), threshold 0-d float32; writes the leaving rows into ``out`` [>spare,
    L + 2] and rows that stay / longest length / non-finite rows into ``stats[:3]`` (int64).
    Returns (dest, new_row): int64 [B] compaction destinations and the output row of each row after
    this exit (``spare`` unless it stays)."""
    _common.require_triton_device("exit_decide", "entropy", entropy)
    b, labels = logits.shape
    s = key.shape[1]
    if not (entropy.shape == (b,) and row.shape == (b,) and key.shape[0] == b and out.shape[1] == labels + 2 and b <= 1024):
        raise ValueError(f"exit_decide: shapes entropy {tuple(entropy.shape)}, logits {tuple(logits.shape)}, row {tuple(row.shape)}, "
                         f"key {tuple(key.shape)}, out {tuple(out.shape)} do not fit (at most 1024 rows)")
    if not (entropy.dtype == logits.dtype == out.dtype == threshold.dtype == torch.float32 and row.dtype == stats.dtype == torch.int64
            and key.dtype == torch.bool):
        raise TypeError("exit_decide: entropy/logits/out/threshold float32, row/stats int64, key bool")
    logits, key = logits.contiguous(), key.contiguous()
    if out.stride(1) != 1:
        raise ValueError("exit_decide: out must have a unit stride on its last dimension")
    dest = torch.empty(b, dtype=torch.int64, device=entropy.device)
    new_row = torch.empty_like(dest)
    block_b = max(16, triton.next_power_of_2(b))
    block_s = max(16, min(triton.next_power_of_2(max(s, 1)), 8192 // block_b))
    _exit_decide_kernel[(1,)](
        entropy, logits, row, key.view(torch.uint8), threshold, out, stats, dest, new_row,
        b, labels, s, logits.stride(0), key.stride(0), out.stride(0), float(layer), int(spare),
        LAST=bool(last), BLOCK_B=block_b, BLOCK_C=max(16, triton.next_power_of_2(labels + 2)), BLOCK_S=block_s,
    )
    return dest, new_row
