"""One training loop for every stage: AdamW, linear warmup/decay, gradient clipping, seeded and
deterministic on CPU, on any device (the model's; batches come there from the loaders) and in
fp32 or bf16 autocast, evaluation each epoch with best-checkpoint selection on dev, tqdm progress and
one log line per epoch, atomic checkpoints every `save_every` steps and at epoch ends, `resume`
continuing mid-epoch exactly where the last checkpoint left off (same batches, same RNG state), and
data-parallel training when torch.distributed is initialised (torchrun: gloo on CPU, nccl on GPU,
one GPU per rank). On a GPU the loss reaches the host every `log_every` steps, not every step, so
the stream is not stalled once per step."""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from costeff.device import autocast, check_precision, module_device
from costeff.pipeline.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger("costeff")


@dataclass
class TrainConfig:
    epochs: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 0  # steps between mid-epoch checkpoints (0: epoch ends only)
    log_every: int = 50
    progress: bool = True
    max_steps_per_epoch: int = 0  # 0: full epochs (a cap is for quick presets and tests)
    exit_lr_multiplier: float = 1.0  # learning-rate factor for the intermediate exits' parameters
    precision: str = "fp32"  # "bf16": forward and loss under torch.autocast(bfloat16); weights and optimizer stay fp32
    # steps between host reads of the loss (its finiteness check, the progress bar); 0: every step on the
    # CPU, where a read costs nothing, every log_every steps on a GPU, where each read stalls the stream
    sync_every: int = 0

    def __post_init__(self):
        check_precision("TrainConfig", self.precision)
        for name in ("log_every", "sync_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "log_every" else 0):
                raise ValueError(f"TrainConfig: {name} must be an integer >= {1 if name == 'log_every' else 0}, got {v!r}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _no_decay(name: str) -> bool:
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name or "norm." in name


def fresh_head_prefixes(model: torch.nn.Module) -> tuple:
    """Name prefixes of the freshly initialised heads that may learn faster: every exit but the last,
    and the hint maps of multi_exit.StudentWithProjections."""
    prefixes = ()
    for name, module in model.named_modules():
        last = name.split(".")[-1]
        if last == "exits" and isinstance(module, torch.nn.ModuleList):
            prefixes += tuple(f"{name}.{i}." for i in range(len(module) - 1))
        elif last == "hint_projections":
            prefixes += (f"{name}.",)
    return prefixes


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, exit_lr_multiplier: float = 1.0) -> torch.optim.AdamW:
    groups = {}
    fast_prefixes = fresh_head_prefixes(model) if exit_lr_multiplier != 1.0 else ()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        fast = n.startswith(fast_prefixes) if fast_prefixes else False
        key = (_no_decay(n), fast)
        groups.setdefault(key, []).append(p)
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": 0.0 if nd else weight_decay, "lr": lr * (exit_lr_multiplier if fast else 1.0)}
         for (nd, fast), ps in sorted(groups.items())],
        lr=lr,
    )


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def train(
    model: torch.nn.Module,
    make_epoch_loader: Callable[[int], DataLoader],
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
    cfg: TrainConfig,
    output_dir: str,
    eval_fn: Optional[Callable[[torch.nn.Module], dict]] = None,
    resume: bool = False,
    stage: str = "train",
    parameters: Optional[torch.nn.Module] = None,
) -> dict:
    """Trains `model` in place; returns a summary (best dev metrics, history, paths).

    make_epoch_loader(epoch) must give the same batches for the same epoch (seeded by epoch), which
    is what makes mid-epoch resume exact. loss_fn(model, batch) -> (loss, logs). eval_fn(model) ->
    metrics with a "score" key (higher is better) used for best-checkpoint selection. `parameters`
    is the module whose parameters are optimised and checkpointed (default: model), e.g. a wrapper
    holding the student plus distillation projections."""
    owner = parameters if parameters is not None else model
    os.makedirs(output_dir, exist_ok=True)
    last_dir, best_dir = os.path.join(output_dir, "last"), os.path.join(output_dir, "best")
    seed_everything(cfg.seed)
    steps_per_epoch = len(make_epoch_loader(0))
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise ValueError(f"{stage}: the training split gives no batches")
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = make_optimizer(owner, cfg.lr, cfg.weight_decay, cfg.exit_lr_multiplier)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_score": -math.inf, "best_metrics": None, "history": []}
    if resume and os.path.exists(os.path.join(last_dir, "state.json")):
        model_state, saved = load_checkpoint(last_dir, optimizer, scheduler)
        owner.load_state_dict(model_state)
        state = saved["train"]
        if is_main_process():
            log.info("%s: resumed from %s at epoch %d step %d", stage, last_dir, state["epoch"], state["step_in_epoch"])
    device = module_device(owner)
    ddp_model = model
    if world_size() > 1:
        ids = [device.index] if device.type == "cuda" else None
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    sync_every = cfg.sync_every or (1 if device.type == "cpu" else cfg.log_every)

    def synced_loss(upto: int) -> float:
        # the one host read of the loss: every sync_every steps, before checkpoints and at the epoch's end
        value = running.item()
        if not math.isfinite(value):
            steps = f"step {upto}" if upto == synced[0] + 1 else f"steps {synced[0] + 1}-{upto}"
            raise FloatingPointError(f"{stage}: non-finite loss ({value}) at epoch {epoch + 1} {steps}")
        synced[0] = upto
        return value

    def checkpoint() -> None:
        if is_main_process():
            save_checkpoint(last_dir, owner.state_dict(), state, optimizer, scheduler, {"config": asdict(cfg), "stage": stage})
        _barrier()

    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        loader = make_epoch_loader(epoch)
        ddp_model.train()
        t0 = time.time()
        running, seen, synced = torch.zeros((), dtype=torch.float64, device=device), 0, [state["step_in_epoch"]]
        bar = tqdm(total=steps_per_epoch, initial=state["step_in_epoch"], desc=f"{stage} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and is_main_process()), leave=False, dynamic_ncols=True)
        for i, batch in enumerate(loader):
            if i >= steps_per_epoch:
                break
            if i < state["step_in_epoch"]:
                continue  # already trained on before the checkpoint we resumed from
            with autocast(device, cfg.precision):
                loss, logs = loss_fn(ddp_model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(owner.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            state["step_in_epoch"] = i + 1
            state["global_step"] += 1
            running += loss.detach()
            seen += 1
            bar.update(1)
            if seen % sync_every == 0:
                bar.set_postfix(loss=f"{synced_loss(i + 1) / seen:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if cfg.save_every and state["global_step"] % cfg.save_every == 0 and state["step_in_epoch"] < steps_per_epoch:
                synced_loss(i + 1)
                checkpoint()
        bar.close()
        running = synced_loss(state["step_in_epoch"]) if seen else 0.0
        if world_size() > 1:  # report the loss over the global batch, not rank 0's share
            t = torch.tensor([running / max(seen, 1)], dtype=torch.float64, device=device)  # NCCL reduces device tensors only
            dist.all_reduce(t)
            running, seen = t.item() / world_size(), 1
        metrics = eval_fn(unwrap(ddp_model)) if eval_fn is not None else {}
        record = {"epoch": epoch + 1, "train_loss": running / max(seen, 1), "seconds": time.time() - t0, **metrics}
        state["history"].append(record)
        score = metrics.get("score", -float(epoch))  # without eval: the latest epoch is "best"
        if score > state["best_score"]:
            state["best_score"] = score
            state["best_metrics"] = record
            if is_main_process():
                save_checkpoint(best_dir, owner.state_dict(), state, extra_json={"metrics": record, "stage": stage})
        state["epoch"] = epoch + 1
        state["step_in_epoch"] = 0
        if is_main_process():
            shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            msg = f"{stage} epoch {epoch + 1}/{cfg.epochs}: train_loss={record['train_loss']:.4f} {shown} ({record['seconds']:.0f}s)"
            log.info(msg)
            if not logging.getLogger().handlers and not log.handlers:
                print(msg, flush=True)
        checkpoint()
    summary = {"stage": stage, "best": state["best_metrics"], "history": state["history"], "best_dir": best_dir, "last_dir": last_dir}
    if is_main_process():
        with open(os.path.join(output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=float)
    return summary


def load_best(module: torch.nn.Module, output_dir: str) -> dict:
    """Loads output_dir/best into `module`; returns its recorded metrics."""
    state, saved = load_checkpoint(os.path.join(output_dir, "best"), restore_rng=False)
    module.load_state_dict(state)
    return saved.get("extra", {}).get("metrics", {})
