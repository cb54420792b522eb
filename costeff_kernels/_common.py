"""Shared pieces of the Triton kernels: dtype/precision policy, block-size helpers, and one tiled
linear (GEMM + bias + activation) kernel used by slim_ffn, slim_attention and the exit-head pooler."""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

# Read once, like triton itself does at decoration time (the interpreter cannot do 16-bit math).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

ACT_NONE = 0
ACT_GELU = 1
ACT_TANH = 2
ACT_RELU = 3
ACTIVATIONS = {"tanh": ACT_TANH, "relu": ACT_RELU, "gelu": ACT_GELU}  # the exit head's names


def require_triton_device(op: str, name: str, t: torch.Tensor) -> None:
    """Compiled Triton needs GPU tensors; only the interpreter runs on CPU tensors."""
    if not INTERPRET and t.device.type == "cpu":
        raise ValueError(
            f"costeff::{op} (Triton kernel): {name} must be a GPU tensor, got a CPU tensor "
            "(use the CPU kernels, or set TRITON_INTERPRET=1 before importing costeff_kernels)")


def on_tensor_device(launcher):
    """Runs a Triton launcher with its first tensor's GPU as the current device: Triton launches on the
    current device, so a tensor on cuda:1 while cuda:0 is current would otherwise be read from the
    wrong GPU."""
    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        guard = torch.cuda.device(t.device) if t is not None and t.device.type == "cuda" else contextlib.nullcontext()
        with guard:
            return launcher(*args, **kwargs)
    return guarded


def acc_dtype(dtype: torch.dtype):
    """Triton accumulation dtype: float64 for float64 inputs, float32 otherwise (incl. bf16/fp16)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def upcast_operands(dtype: torch.dtype) -> bool:
    """Whether tl.dot operands are cast to the accumulation dtype before the product. On a GPU 16-bit
    operands go to the tensor cores as they are (fp32 accumulation either way); the interpreter's
    bf16 arithmetic is wrong, so there everything is upcast."""
    return INTERPRET or dtype in (torch.float32, torch.float64)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul precision setting (TF32 only when torch allows it)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def pow2_block(n: int, lo: int = 16, hi: int = 64) -> int:
    """Power-of-two block for a dimension of size n, clamped to [lo, hi] (tl.dot needs >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def rows_2d(t: torch.Tensor) -> torch.Tensor:
    """A [rows, last] view of t with a unit stride on the last dimension (copies only if needed)."""
    t2 = t.reshape(-1, t.shape[-1])
    if t2.shape[-1] > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


@triton.jit
def _tanh(x):
    # tl has no tanh (and libdevice is unavailable in the interpreter): sign(x) (1 - e) / (1 + e),
    # e = exp(-2|x|) never overflows.
    e = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -y, y)


@triton.jit
def _activate(x, ACT: tl.constexpr):
    if ACT == 1:
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 2:
        x = _tanh(x)
    elif ACT == 3:
        x = tl.maximum(x, 0.0)
    return x


@triton.jit
def _linear_kernel(
    a_ptr, w_ptr, bias_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_bias, stride_cm, stride_cn,
    ACT: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # C[M, N] = act(A[M, K] @ W[N, K]^T + bias[N]), all operands with arbitrary strides (no copies for
    # transposed or sliced weights).
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(ACC)
            w = w.to(ACC)
        acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=ACC)
    acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(ACC)[None, :]
    acc = _activate(acc, ACT)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def linear(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, act: int = ACT_NONE,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """act(a @ weight.T + bias) for a [M, K], weight [N, K], bias [N] -> [M, N] in out_dtype
    (default a.dtype), accumulated in fp32 (fp64 for fp64 inputs). K may be 0 (bias only)."""
    M, K = a.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=out_dtype or a.dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    assert a.dtype == weight.dtype == bias.dtype, "linear: a, weight and bias must share one dtype"
    dtype = weight.dtype
    block_m = pow2_block(M)
    block_n = pow2_block(N)
    block_k = pow2_block(K, hi=32)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))  # rows on axis 0 (2^31 - 1 blocks; axis 1 allows 65535)
    _linear_kernel[grid](
        a, weight, bias, out, M, N, K,
        a.stride(0), a.stride(1), weight.stride(0), weight.stride(1), bias.stride(0), out.stride(0), out.stride(1),
        ACT=act, ACC=acc_dtype(dtype), UPCAST=upcast_operands(dtype),
        PRECISION=dot_precision(dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out
