"""Stage 3: exit-aware importance and iterative slenderization (COST-EFF's width pruning).

Importance: a first-order Taylor estimate of the loss change when a structure is removed. Over a
pass on training batches (dropout off, no optimizer step) |grad| is accumulated per parameter; a
parameter's score is |acc|grad| * weight|. A head's score sums its columns of the attention output
projection, an FFN neuron's its row of the input projection and column of the output projection.
The loss is "exit-aware" (0.9 * soft-CE of every exit against the TA's matching exit + 0.1 * hard CE
of every exit + hidden-state MSE) or, for the ablation, the last exit's losses only.

Schedule: E events (E = the largest number of heads a layer must lose), each removing one head per
layer while the FFN size and the embedding rank shrink linearly towards their targets. With the
"global" allocation an event keeps the same totals (heads, FFN neurons) but ranks them across
layers, so layers that matter more keep more (a layer may lose all its heads). The "one_shot"
schedule (an ablation) jumps to the final sizes in a single event and trains for all the steps the
iterative schedule would have spread over its events. Scores are
recomputed before every event; between events the student trains (representation-only for the first
share of the steps, then prediction + representation) with a fresh AdamW (shapes changed) whose
learning rate restarts at `lr` and decays linearly. Each event is checkpointed (save_pretrained, then
an atomic rename), and a resumed run continues after the last finished event."""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from costeff.device import autocast, check_precision, module_device
from costeff.models import CostEffForSequenceClassification, slenderize
from costeff.pipeline.checkpoint import atomic_write_json, replace_dir, temp_dir
from costeff.pipeline.losses import exitwise_soft_cross_entropy, hard_cross_entropy, hidden_mse, soft_cross_entropy
from costeff.pipeline.evaluate_utils import model_inputs
from costeff.pipeline.multi_exit import teacher_outputs
from costeff.pipeline.trainer import is_main_process, make_optimizer

log = logging.getLogger("costeff")


@dataclass
class PruneTarget:
    heads: int  # attention heads kept per layer
    ffn: int  # FFN neurons kept per layer
    embedding_rank: Optional[int]  # None: keep the embedding unfactorized


def importance_loss(student, teacher, batch, exit_aware: bool = True, temperature: float = 1.0) -> torch.Tensor:
    t_exits, t_states = teacher_outputs(teacher, batch)
    s = student(**model_inputs(batch), output_hidden_states=True)
    labels = batch["labels"]
    if exit_aware:
        soft = exitwise_soft_cross_entropy(s.exit_logits, t_exits, temperature)
        hard = sum(hard_cross_entropy(lg, labels) for lg in s.exit_logits)
        rep = hidden_mse(s.hidden_states, t_states, batch["attention_mask"])
    else:
        soft = soft_cross_entropy(s.exit_logits[-1], t_exits[-1], temperature)
        hard = hard_cross_entropy(s.exit_logits[-1], labels)
        rep = hidden_mse(s.hidden_states[-1:], t_states[-1:], batch["attention_mask"])
    return 0.9 * soft + 0.1 * hard + rep


def importance_scores(student: CostEffForSequenceClassification, teacher, batches, exit_aware: bool = True,
                      temperature: float = 1.0, precision: str = "fp32") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: head scores [num_heads] and FFN neuron scores [intermediate] (on the CPU; the
    gradients are taken on the student's device, in ``precision``)."""
    device = module_device(student)
    was_training = student.training
    student.eval()  # dropout off, as the official scoring pass
    params = {n: p for n, p in student.named_parameters()}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    n_batches = 0
    for batch in batches:
        student.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = importance_loss(student, teacher, batch, exit_aware, temperature)
        loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                acc[n] += p.grad.abs()
        n_batches += 1
    student.zero_grad(set_to_none=True)
    student.train(was_training)
    if n_batches == 0:
        raise ValueError("importance_scores: no batches to score on")
    heads, ffn = [], []
    cfg = student.config
    for i, layer in enumerate(student.costeff.layers):
        pre = f"costeff.layers.{i}."
        out_w = (acc[pre + "attention.out_weight"] * layer.attention.out_weight).abs().detach()
        nh, d = cfg.num_attention_heads[i], cfg.attention_head_size[i]
        heads.append(out_w.view(out_w.shape[0], nh, d).sum((0, 2)).cpu() if nh else torch.zeros(0))
        in_w = (acc[pre + "ffn.in_weight"] * layer.ffn.in_weight).abs().detach()
        o_w = (acc[pre + "ffn.out_weight"] * layer.ffn.out_weight).abs().detach()
        ffn.append((in_w.sum(1) + o_w.sum(0)).cpu())
    return heads, ffn


def global_top_indices(scores: list[torch.Tensor], k: int) -> list[list[int]]:
    """The k highest scores over all layers, as each layer's kept indices in ascending order (ties:
    lower layer, then lower index first)."""
    flat = [(-float(v), layer, j) for layer, s in enumerate(scores) for j, v in enumerate(s.tolist())]
    keep = [[] for _ in scores]
    for _, layer, j in sorted(flat)[:max(k, 0)]:
        keep[layer].append(j)
    return [sorted(indices) for indices in keep]


def top_indices(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, in ascending index order (ties: lower index first)."""
    return global_top_indices([scores], k)[0]


ALLOCATIONS = ("uniform", "global")
SCHEDULES = ("iterative", "one_shot")


def plan_events(student: CostEffForSequenceClassification, target: PruneTarget) -> list[dict]:
    """The per-event sizes: heads drop by one per event, FFN and rank shrink linearly."""
    cfg = student.config
    n_events = max(max(h - target.heads for h in cfg.num_attention_heads), 1)
    full_rank = cfg.embedding_rank or cfg.embedding_width  # ELECTRA: the tables are narrower than hidden
    target_rank = None if target.embedding_rank is None else min(target.embedding_rank, full_rank)
    events = []
    for e in range(1, n_events + 1):
        frac = e / n_events
        rank = None
        if target_rank is not None and target_rank < full_rank:
            rank = round(full_rank - (full_rank - target_rank) * frac)
        events.append({
            "heads": [max(min(target.heads, h), h - e) for h in cfg.num_attention_heads],
            "ffn": [round(f - (f - min(target.ffn, f)) * frac) for f in cfg.intermediate_size],
            "embedding_rank": rank,
        })
    return events


def iterative_prune(
    student: CostEffForSequenceClassification,
    teacher,
    data,
    target: PruneTarget,
    output_dir: str,
    steps_per_event: int,
    lr: float = 2e-5,
    repr_share: float = 0.5,
    score_batches: int = 8,
    exit_aware: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    allocation: str = "uniform",
    schedule: str = "iterative",
    precision: str = "fp32",
) -> tuple[CostEffForSequenceClassification, list]:
    """Prunes on the student's device (slenderized students are moved back there) in ``precision``."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"iterative_prune: allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"iterative_prune: schedule must be one of {SCHEDULES}, got {schedule!r}")
    check_precision("iterative_prune", precision)
    device = module_device(student)
    os.makedirs(output_dir, exist_ok=True)
    cur = os.path.join(output_dir, "current")
    state_path = os.path.join(cur, "prune_state.json")  # inside the checkpoint: model and state swap together
    events = plan_events(student, target)
    if schedule == "one_shot":  # the final sizes at once, trained for the whole schedule's steps
        steps_per_event *= len(events)
        events = events[-1:]
    done, history = 0, []
    if resume and os.path.exists(state_path):
        with open(state_path) as f:
            st = json.load(f)
        done, history = st["events_done"], st["history"]
        if done:
            student = CostEffForSequenceClassification.from_pretrained(cur).to(device)
            log.info("prune: resumed after event %d/%d", done, len(events))
    torch.manual_seed(seed + done)
    epoch_counter = [done * 1000]

    def batches():
        while True:
            epoch_counter[0] += 1
            yield from data.train(epoch_counter[0])

    stream = batches()
    bar = tqdm(total=len(events), initial=done, desc="prune events", disable=not (progress and is_main_process()), dynamic_ncols=True)
    for e in range(done, len(events)):
        ev = events[e]
        scoring = [next(stream) for _ in range(score_batches)]
        head_scores, ffn_scores = importance_scores(student, teacher, scoring, exit_aware, temperature, precision)
        if allocation == "global":
            heads_keep = global_top_indices(head_scores, sum(ev["heads"]))
            ffn_keep = global_top_indices(ffn_scores, sum(ev["ffn"]))
        else:
            heads_keep = [top_indices(s, k) for s, k in zip(head_scores, ev["heads"])]
            ffn_keep = [top_indices(s, k) for s, k in zip(ffn_scores, ev["ffn"])]
        rank = ev["embedding_rank"]
        cur_rank = student.config.embedding_rank or student.config.embedding_width
        student = slenderize(student, heads_keep, ffn_keep, embedding_rank=rank if rank is not None and rank < cur_rank else None)
        student.to(device).train()
        opt = make_optimizer(student, lr, 0.01)
        sched = get_linear_schedule_with_warmup(opt, 0, steps_per_event)
        total = torch.zeros((), dtype=torch.float64, device=device)  # read once per event: no host sync per step
        for step in range(steps_per_event):
            batch = next(stream)
            with autocast(device, precision):
                t_exits, t_states = teacher_outputs(teacher, batch)
                s = student(**model_inputs(batch), output_hidden_states=True)
                loss = hidden_mse(s.hidden_states, t_states, batch["attention_mask"])
                if step >= repr_share * steps_per_event:
                    loss = loss + exitwise_soft_cross_entropy(s.exit_logits, t_exits, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.detach()
        total = total.item()
        if not math.isfinite(total):
            raise FloatingPointError(f"prune event {e + 1}: non-finite training loss ({total})")
        record = {"event": e + 1, "heads": ev["heads"][0], "ffn": ev["ffn"][0], "embedding_rank": student.config.embedding_rank,
                  "params": sum(p.numel() for p in student.parameters()), "steps": steps_per_event, "train_loss": total / max(steps_per_event, 1),
                  "heads_per_layer": list(student.config.num_attention_heads), "ffn_per_layer": list(student.config.intermediate_size)}
        history.append(record)
        if is_main_process():
            tmp = temp_dir(output_dir, "current")
            student.save_pretrained(tmp)
            if hasattr(data, "save_tokenizer"):
                data.save_tokenizer(tmp)
            atomic_write_json(os.path.join(tmp, "prune_state.json"), {"events_done": e + 1, "events": len(events), "history": history})
            replace_dir(tmp, cur)
            sizes = (f"heads {record['heads_per_layer']}, ffn {record['ffn_per_layer']}" if allocation == "global"
                     else f"heads {record['heads']}, ffn {record['ffn']}")
            log.info("prune event %d/%d: %s, embedding rank %s, %d params, loss %.4f",
                     e + 1, len(events), sizes, record["embedding_rank"], record["params"], record["train_loss"])
        bar.update(1)
    bar.close()
    return student, history
