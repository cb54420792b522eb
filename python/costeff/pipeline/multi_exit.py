"""Stages 2 and 4: multi-exit distillation.

- The TA (teacher assistant): the full-width backbone with an exit on every layer, distilled from
  the fine-tuned teacher: representation-only first, then prediction: (sum over exits of
  soft-CE(exit, teacher final) + sum over exits of hard CE) / 2, as the official code's train_ta.
- The slim student, distilled from the TA: representation-only first (hidden-state MSE, with learned
  projections where widths differ), then prediction + representation: soft-CE of every student exit
  against the TA's corresponding exit, plus the hidden-state MSE.
Gradient equilibrium (the model config's flag) is on for both, as in the official code.

Two options for stronger shallow exits (TA only, both off by default; docs/pipeline.md has their
measured effect): an exit warm-up phase that trains the intermediate exits alone on the frozen trunk
before joint training, and a hint loss that asks each intermediate exit's input state to predict,
through a learned linear map (discarded after training), the teacher's final state pooled the same way."""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

from costeff.models import CostEffForSequenceClassification
from costeff.models.modeling_costeff import exit_input
from costeff.pipeline.evaluate_utils import model_inputs, score_logits
from costeff.pipeline.losses import exitwise_soft_cross_entropy, hidden_mse, soft_cross_entropy
from costeff.pipeline.trainer import TrainConfig, fresh_head_prefixes, load_best, train, unwrap

log = logging.getLogger("costeff")


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, batch: dict):
    """(exit logits tuple, hidden states) of an HF BERT classifier or a costeff model, in eval mode."""
    teacher.eval()
    out = teacher(**model_inputs(batch), output_hidden_states=True)
    exits = getattr(out, "exit_logits", None) or (out.logits,)
    return exits, out.hidden_states


class TeacherOutputCache:
    """``teacher_outputs`` memoized per example. The teacher is frozen, in eval mode and under no_grad,
    so an example's outputs are the same in every epoch; from the second epoch on, distillation skips
    the teacher's forward pass (about half of a student step). Each example keeps its exit logits and
    its hidden states at real-token positions, the states in float16 (half the memory; relative
    rounding 5e-4, far below the representation loss; float32 where float16 would overflow).

    Batches need ``example_index`` (``RunData.train(epoch, with_index=True)``); one cache per split,
    since indices are positions in a split. Batches without indices go to the teacher."""

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher
        self.store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.nbytes = 0
        self.hits = self.misses = 0

    def __call__(self, batch: dict):
        index = batch.get("example_index")
        if index is None:
            return teacher_outputs(self.teacher, batch)
        ids = index.tolist()
        mask = batch["attention_mask"].bool()
        if all(i in self.store for i in ids):
            self.hits += 1
            return self._gather(ids, mask)
        self.misses += 1
        exits, states = teacher_outputs(self.teacher, batch)
        self._put(ids, mask, exits, states)
        return exits, states

    def _put(self, ids, mask, exits, states) -> None:
        mask = mask.cpu()  # the cache lives in host memory, whatever device the teacher runs on
        if (mask[:, 1:] > mask[:, :-1]).any():
            # exit_input reads position 0 as the CLS state, which a left-padded row does not have
            raise ValueError("TeacherOutputCache: batches must be right-padded (tokenizer.padding_side='right')")
        logits = torch.stack(exits, 1).float().cpu()
        stacked = torch.stack(states).cpu()  # [states, batch, tokens, hidden]
        for r, i in enumerate(ids):
            h = stacked[:, r, mask[r]]
            h16 = h.to(torch.float16)
            kept = h16 if torch.isfinite(h16).all() else h.clone()
            self.store[i] = (logits[r].clone(), kept)
            self.nbytes += kept.nbytes + logits[r].nbytes

    def _gather(self, ids, mask):
        device = mask.device
        logits = torch.stack([self.store[i][0] for i in ids]).to(device, non_blocking=True)
        packed = torch.cat([self.store[i][1] for i in ids], dim=1).to(device, non_blocking=True).float()  # [states, real tokens, hidden]
        states = packed.new_zeros(packed.shape[0], *mask.shape, packed.shape[-1])
        states[:, mask] = packed
        return tuple(logits.unbind(1)), tuple(states.unbind(0))


class StudentWithProjections(nn.Module):
    """The student plus per-state linear maps student width -> teacher width (identity when equal)
    and, with ``hints``, one map per intermediate exit for the hint loss, so all train and checkpoint
    together."""

    def __init__(self, student: CostEffForSequenceClassification, teacher_hidden: int, hints: bool = False):
        super().__init__()
        self.student = student
        hs = student.config.hidden_size
        n = student.config.num_hidden_layers + 1
        self.projections = nn.ModuleList(nn.Linear(hs, teacher_hidden) for _ in range(n)) if hs != teacher_hidden else None
        self.hint_projections = nn.ModuleList(nn.Linear(hs, teacher_hidden) for _ in range(student.config.num_exits - 1)) if hints else None

    def forward(self, **kw):
        return self.student(**kw)


def _repr_loss(wrapper, student_states, teacher_states, mask):
    return hidden_mse(student_states, teacher_states, mask, unwrap(wrapper).projections)


def exit_hint_loss(wrapper: StudentWithProjections, student_states, teacher_states, mask) -> torch.Tensor:
    """Sum over intermediate exits of MSE(hint map(the state the exit reads), the teacher's final
    state pooled the same way) / the target's mean square (so the weight does not depend on the
    backbone's scale): a feature target richer than the label for the shallow layers."""
    m = unwrap(wrapper)
    cfg = m.student.config
    target = exit_input(teacher_states[-1], mask, cfg, last=False).detach()
    scale = target.pow(2).mean().clamp_min(1e-12)
    total = target.new_zeros(())
    for proj, layer in zip(m.hint_projections, cfg.exit_layers()[:-1]):
        total = total + (proj(exit_input(student_states[layer], mask, cfg, last=False)) - target).pow(2).mean() / scale
    return total


def _dev_repr_score(wrapper: StudentWithProjections, teacher_out, loader) -> dict:
    wrapper.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            _, t_states = teacher_out(batch)
            s = wrapper.student(**model_inputs(batch), output_hidden_states=True)
            total += _repr_loss(wrapper, s.hidden_states, t_states, batch["attention_mask"]).item()
            n += 1
    return {"dev_repr_loss": total / max(n, 1), "score": -total / max(n, 1)}


def dev_exit_scores(student: CostEffForSequenceClassification, loader, metric: str, score: str = "last") -> dict:
    """Dev metric of every exit; ``score`` (what selects the best checkpoint) is the last exit's
    metric, or with score="intermediate" the mean over the other exits."""
    student.eval()
    with torch.no_grad():
        per_exit = [[] for _ in range(student.config.num_exits)]
        labels = []
        for batch in loader:
            out = student(**model_inputs(batch))
            for i, lg in enumerate(out.exit_logits):
                per_exit[i].append(lg.float())
            labels.append(batch["labels"])
    labels = torch.cat(labels)
    res = score_logits(torch.cat(per_exit[-1]), labels, metric)
    for i, lg in enumerate(per_exit):
        res[f"exit{student.config.exit_layers()[i]}_{metric}"] = score_logits(torch.cat(lg), labels, metric)[metric]
    if score == "intermediate" and len(per_exit) > 1:
        res["score"] = sum(res[f"exit{layer}_{metric}"] for layer in student.config.exit_layers()[:-1]) / (len(per_exit) - 1)
    return res


def distill(
    student: CostEffForSequenceClassification,
    teacher: nn.Module,
    data,
    repr_cfg: TrainConfig,
    pred_cfg: TrainConfig,
    output_dir: str,
    mode: str,
    temperature: float = 1.0,
    resume: bool = False,
    stage: str = "distill",
    exit_warmup_cfg: TrainConfig | None = None,
    exit_hint_weight: float = 0.0,
    cache_teacher_outputs: bool = False,
) -> tuple[CostEffForSequenceClassification, dict]:
    """mode "ta": prediction loss = (sum soft-CE vs the teacher's final logits + sum hard CE) / 2.
    mode "student": prediction loss = sum soft-CE vs the teacher's matching exits + representation.
    Runs the exit warm-up (exit_warmup_cfg.epochs, the prediction loss with only the intermediate exits
    trainable), the representation-only phase (repr_cfg.epochs, may be 0), then the prediction phase;
    exit_hint_weight > 0 adds that times exit_hint_loss to the prediction loss. cache_teacher_outputs
    computes the teacher's outputs once per example (TeacherOutputCache), for all phases."""
    if mode not in ("ta", "student"):
        raise ValueError(f"distill: mode must be 'ta' or 'student', got {mode!r}")
    if exit_hint_weight < 0:
        raise ValueError(f"distill: exit_hint_weight must be >= 0, got {exit_hint_weight}")
    t_hidden = getattr(teacher.config, "hidden_size")
    wrapper = StudentWithProjections(student, t_hidden, hints=exit_hint_weight > 0 and student.config.num_exits > 1)
    summaries = {}
    if cache_teacher_outputs:
        train_out, dev_out = TeacherOutputCache(teacher), TeacherOutputCache(teacher)
        train_batches, dev_batches = (lambda epoch: data.train(epoch, with_index=True)), (lambda: data.split("dev", with_index=True))
    else:
        train_batches, dev_batches = data.train, (lambda: data.dev)
        train_out = dev_out = lambda batch: teacher_outputs(teacher, batch)

    def repr_loss_fn(m, batch):
        _, t_states = train_out(batch)
        s = m(**model_inputs(batch), output_hidden_states=True)
        return _repr_loss(m, s.hidden_states, t_states, batch["attention_mask"]), {}

    def pred_loss_fn(m, batch):
        t_exits, t_states = train_out(batch)
        s = m(**model_inputs(batch), output_hidden_states=True, labels=batch["labels"] if mode == "ta" else None)
        if mode == "ta":
            soft = sum(soft_cross_entropy(lg, t_exits[-1], temperature) for lg in s.exit_logits)
            loss = (soft + s.loss) / 2
        else:
            soft = exitwise_soft_cross_entropy(s.exit_logits, t_exits, temperature)
            loss = soft + _repr_loss(m, s.hidden_states, t_states, batch["attention_mask"])
        if unwrap(m).hint_projections is not None:
            loss = loss + exit_hint_weight * exit_hint_loss(m, s.hidden_states, t_states, batch["attention_mask"])
        return loss, {}

    if exit_warmup_cfg is not None and exit_warmup_cfg.epochs > 0 and student.config.num_exits > 1:
        out = os.path.join(output_dir, "exit_warmup")
        trainable = fresh_head_prefixes(wrapper)
        frozen = [p for n, p in wrapper.named_parameters() if p.requires_grad and not n.startswith(trainable)]
        for p in frozen:
            p.requires_grad_(False)
        try:
            summaries["exit_warmup"] = train(wrapper, train_batches, pred_loss_fn, exit_warmup_cfg, out,
                                             lambda m: dev_exit_scores(m.student, data.dev, data.metric, score="intermediate"),
                                             resume, stage=f"{stage}/exit_warmup")
            load_best(wrapper, out)
        finally:
            for p in frozen:
                p.requires_grad_(True)
    if repr_cfg.epochs > 0:
        out = os.path.join(output_dir, "repr")
        summaries["repr"] = train(wrapper, train_batches, repr_loss_fn, repr_cfg, out,
                                  lambda m: _dev_repr_score(m, dev_out, dev_batches()), resume, stage=f"{stage}/repr")
        load_best(wrapper, out)
    if pred_cfg.epochs > 0:
        out = os.path.join(output_dir, "pred")
        summaries["pred"] = train(wrapper, train_batches, pred_loss_fn, pred_cfg, out,
                                  lambda m: dev_exit_scores(m.student, data.dev, data.metric), resume, stage=f"{stage}/pred")
        load_best(wrapper, out)
    if cache_teacher_outputs:
        info = summaries["teacher_cache"] = {"examples": len(train_out.store), "bytes": train_out.nbytes,
                                             "cached_batches": train_out.hits, "teacher_batches": train_out.misses}
        log.info("%s: teacher outputs cached for %d training examples (%.2f GB); %d of %d batches read the cache", stage,
                 info["examples"], info["bytes"] / 1e9, info["cached_batches"], info["cached_batches"] + info["teacher_batches"])
    student.save_pretrained(os.path.join(output_dir, "model"))
    if hasattr(data, "save_tokenizer"):
        data.save_tokenizer(os.path.join(output_dir, "model"))
    if wrapper.projections is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in wrapper.projections.state_dict().items()}, os.path.join(output_dir, "projections.safetensors"))
    return student, summaries
