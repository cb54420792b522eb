"""Where and in what precision work runs: the rules of ``--device`` and ``--precision``, written once
for training (costeff.pipeline), predict and the GPU runner (costeff.inference).

- device: ``auto`` (CUDA when a GPU is visible, else the CPU; under torchrun the rank's
  ``LOCAL_RANK`` GPU), ``cpu``, ``cuda`` (the rank's GPU) or ``cuda:N``.
- precision: ``fp32``, or ``bf16`` (torch.autocast in bfloat16; on the CPU too, so the path is
  tested without a GPU). Weights stay float32 either way; the costeff ops follow torch's own
  autocast lists (costeff.ops._registry.register_autocast_policy).
"""
from __future__ import annotations

import contextlib
import os
import re

import torch

DEVICE_RULE = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("fp32", "bf16")
_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def check_device_spec(where: str, spec) -> str:
    """The spelling of a device option (without asking whether it is present)."""
    m = _SPEC.match(spec) if isinstance(spec, str) else None
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ValueError(f"{where}: device must be {DEVICE_RULE}, got {spec!r}")
    return spec


def check_precision(where: str, precision) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"{where}: precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(spec: str = "auto", where: str = "device") -> torch.device:
    """The torch.device ``spec`` names; a clear error when it asks for a GPU that is not there."""
    check_device_spec(where, spec)
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    if not torch.cuda.is_available():
        built = torch.version.cuda or "no CUDA (a CPU build)"
        raise ValueError(f"{where}: {spec} asked for, but no CUDA device is visible (this torch {torch.__version__} has {built}); "
                         "use --device cpu or auto")
    index = int(spec.split(":")[1]) if ":" in spec else local_rank()
    if index >= torch.cuda.device_count():
        raise ValueError(f"{where}: {spec} asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def autocast(device: torch.device, precision: str):
    """The context that computes in ``precision`` on ``device`` (a no-op for fp32)."""
    check_precision("autocast", precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch``'s tensors on ``device`` (non-blocking: from pinned memory the copy overlaps compute)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (the CPU for a module without any)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
