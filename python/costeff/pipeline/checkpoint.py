"""Atomic, pickle-free checkpoints: model and optimizer tensors in safetensors, everything else in
JSON. A checkpoint is a directory written under a temporary name and renamed into place, so a crash
leaves either the old checkpoint or the new one, never half of one."""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # not every filesystem supports directory fsync
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_dir(parent: str, name: str) -> str:
    """A fresh sibling directory to build `name` in, with the permissions a plain mkdir would give
    (mkdtemp's 0700 would otherwise survive the rename and hide checkpoints from other users)."""
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{name}-")
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def atomic_write_json(path: str, obj: Any) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # as open(path, "w") would create it, not mkstemp's 0600
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def replace_dir(tmp: str, directory: str) -> None:
    """Puts the finished directory `tmp` (a sibling of `directory`) in place of `directory`: the old
    one is renamed aside, the new one renamed in, then the old one removed. Readers see the old
    checkpoint or the new one, never a mix."""
    parent = os.path.dirname(os.path.abspath(directory))
    _fsync_dir(tmp)
    old = None
    if os.path.exists(directory):
        old = tempfile.mkdtemp(dir=parent, prefix=f".old-{os.path.basename(directory)}-")
        os.rmdir(old)
        os.replace(directory, old)
    os.replace(tmp, directory)
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _flatten_optimizer(opt_state: dict) -> tuple[dict, dict]:
    tensors, meta = {}, {"param_groups": opt_state["param_groups"], "state": {}}
    for pid, st in opt_state["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
                meta["state"][str(pid)][k] = {"tensor": f"{pid}.{k}"}
            else:
                meta["state"][str(pid)][k] = {"value": v}
    return tensors, meta


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: (tensors[v["tensor"]] if "tensor" in v else v["value"]) for k, v in st.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict, dict]:
    """Every generator a training step draws from: Python, NumPy, torch's CPU one and, once CUDA is in
    use, each GPU's (dropout on a GPU draws there)."""
    np_state = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, t in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda{i}"] = t
    return tensors, {"python": repr(random.getstate()), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def set_rng_state(tensors: dict, meta: dict) -> None:
    """Restores what rng_state saved. GPU states are restored where that GPU exists (a run started on
    a GPU resumes on the CPU with the same CPU, Python and NumPy streams, and back)."""
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"torch_cuda{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"torch_cuda{i}"], i)
    import ast

    random.setstate(ast.literal_eval(meta["python"]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


def save_checkpoint(
    directory: str,
    model_state: dict,
    train_state: dict,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    extra_json: Optional[dict] = None,
) -> str:
    """Writes directory/{model,optimizer}.safetensors + state.json atomically (rename of a temp dir)."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = temp_dir(parent, os.path.basename(directory))
    try:
        # safetensors refuses shared storage: clone views (e.g. tied embeddings) apart.
        save_file({k: v.detach().contiguous().cpu().clone() for k, v in model_state.items()}, os.path.join(tmp, MODEL_FILE))
        rng_tensors, rng_meta = rng_state()
        state = {"train": train_state, "rng": rng_meta, "extra": extra_json or {}}
        opt_tensors = {f"rng.{k}": v for k, v in rng_tensors.items()}
        if optimizer is not None:
            t, m = _flatten_optimizer(optimizer.state_dict())
            opt_tensors.update({f"optim.{k}": v for k, v in t.items()})
            state["optimizer"] = m
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        save_file(opt_tensors, os.path.join(tmp, OPTIM_FILE))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2, sort_keys=True, default=float)
            f.flush()
            os.fsync(f.fileno())
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_checkpoint(directory: str, optimizer=None, scheduler=None, restore_rng: bool = True) -> tuple[dict, dict]:
    """Returns (model_state, state json); restores optimizer/scheduler/RNG in place when given.
    Tensors are saved from and loaded to the CPU: ``module.load_state_dict`` and
    ``optimizer.load_state_dict`` copy them to wherever the parameters are, so a checkpoint written on
    a GPU resumes on a CPU and back."""
    for f in (MODEL_FILE, STATE_FILE):
        if not os.path.exists(os.path.join(directory, f)):
            raise CheckpointError(f"checkpoint {directory!r} is incomplete: missing {f}")
    try:
        model_state = load_file(os.path.join(directory, MODEL_FILE))
        with open(os.path.join(directory, STATE_FILE)) as fh:
            state = json.load(fh)
        other = load_file(os.path.join(directory, OPTIM_FILE)) if os.path.exists(os.path.join(directory, OPTIM_FILE)) else {}
    except Exception as exc:
        raise CheckpointError(f"checkpoint {directory!r} is corrupt: {exc}") from exc
    if optimizer is not None:
        if "optimizer" not in state:
            raise CheckpointError(f"checkpoint {directory!r} holds no optimizer state")
        tensors = {k[len("optim."):]: v for k, v in other.items() if k.startswith("optim.")}
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and "rng.torch_cpu" in other:
        set_rng_state({k[len("rng."):]: v for k, v in other.items() if k.startswith("rng.")}, state["rng"])
    return model_state, state
