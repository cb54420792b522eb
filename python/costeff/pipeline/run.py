"""The whole pipeline and its presets. Each stage reads the previous stage's artifacts from the run
directory, so stages can also be run one by one (`costeff teacher|ta|prune|distill|evaluate`).

Run directory layout: teacher/model (HF BERT), ta/model, prune/current, student/model (costeff
multi-exit models, save_pretrained + safetensors), eval/pareto.{json,csv,png}, run.json."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from transformers import AutoModelForSequenceClassification

from costeff._extension import extension_loaded
from costeff.device import check_device_spec, check_precision
from costeff.ops._checks import check_threshold
from costeff.inference import InferenceEngine
from costeff.inference.engine import PRECISIONS as ENGINE_PRECISIONS
from costeff.inference.calibrate import calibrate_on_batches, target_report, write_calibration
from costeff.models import (
    CostEffForSequenceClassification,
    converted_config,
    count_parameters,
    from_pretrained_encoder,
    parameter_count,
    prune_vocabulary,
)
from costeff.models.configuration_costeff import EXIT_POOLINGS
from costeff.pipeline.checkpoint import atomic_write_json, replace_dir, temp_dir
from costeff.pipeline.evaluate_utils import model_inputs, predict_logits, score_logits
from costeff.pipeline.evaluate import (
    DEFAULT_THRESHOLD_FRACTIONS,
    add_latency,
    add_ratios,
    evaluate_hf_teacher,
    fractions_of_ln2,
    latency_batches,
    sweep_costeff,
    sweep_thresholds,
    write_results,
)
from costeff.pipeline.multi_exit import distill
from costeff.pipeline.prune import ALLOCATIONS, SCHEDULES, PruneTarget, iterative_prune
from costeff.pipeline.teacher import finetune_teacher, import_teacher
from costeff.pipeline.trainer import TrainConfig, is_main_process

log = logging.getLogger("costeff")


@dataclass
class PipelineConfig:
    """Every knob of the pipeline; presets below fill it for the demo and the full run."""
    # data
    max_length: Optional[int] = 128  # None: the length covering 95% of the training inputs (multiple of 8, within the positions)
    batch_size: int = 32
    eval_batch_size: int = 64
    max_train_examples: int = 0
    max_eval_examples: int = 0
    bucket_by_length: bool = False
    split_seed: int = 0  # the train/dev/test split of tasks without fixed splits; `seed` varies training only
    # teacher
    teacher: Optional[str] = None  # an already fine-tuned *ForSequenceClassification directory: stage 1 imports it
    teacher_epochs: int = 3
    teacher_lr: float = 5e-5
    # TA (multi-exit, full width)
    exit_start: int = 1
    exit_pooling: str = "cls"  # "cls" (COST-EFF default) or "mean" (token average) for intermediate exits
    exit_lr_multiplier: float = 1.0  # lr factor for the freshly initialised intermediate exits (TA stage)
    ta_init: str = "pretrained"  # "pretrained" (official) or "teacher"
    ta_repr_epochs: int = 1
    ta_pred_epochs: int = 3
    ta_lr: float = 5e-5
    exit_warmup_epochs: int = 0  # TA: epochs training only the intermediate exits on the frozen trunk, before joint training
    exit_hint_weight: float = 0.0  # TA: weight of the hint loss (intermediate exits' states -> the teacher's final state)
    teacher_assistant: bool = True  # False ("no TA" ablation): prune the teacher with fresh exits, distill from the teacher
    gradient_equilibrium: bool = True  # the multi-exit models' training forward (TA, inherited by the student)
    # slenderization target (per layer) and schedule
    heads: int = 2
    ffn: int = 256
    embedding_rank: Optional[int] = 64
    prune_steps_per_event: int = 100
    prune_score_batches: int = 16
    prune_lr: float = 3e-5
    prune_repr_share: float = 0.5
    exit_aware: bool = True
    prune_allocation: str = "uniform"  # "uniform": every layer keeps heads/ffn; "global": same totals, ranked across layers
    prune_schedule: str = "iterative"  # "iterative" (one head per layer per event) or "one_shot" (one event, the same steps)
    # student distillation from the TA
    student_repr_epochs: int = 4
    student_pred_epochs: int = 3
    student_repr_lr: float = 1e-4
    student_pred_lr: float = 5e-5
    temperature: float = 1.0
    cache_teacher_outputs: bool = False  # TA and student distillation: the teacher's outputs computed once per example (memory for time)
    prune_vocabulary: bool = False  # after distillation: word rows of the training split's tokens only, positions up to max_length
    # evaluation
    thresholds: Optional[tuple] = None  # sweep thresholds in nats; None: threshold_fractions x ln(num_labels)
    threshold_fractions: tuple = DEFAULT_THRESHOLD_FRACTIONS
    latency_examples: int = 256
    latency_rounds: int = 5  # interleaved timing rounds (median)
    engine_precisions: tuple = ENGINE_PRECISIONS  # C++ engine rows of the student in the sweep
    # the target: at most max_drop metric points below the teacher on dev (None: no calibration) and, when
    # given, speedup x fewer analytic FLOPs than the teacher (costeff.pipeline.recipe derives the rest)
    max_drop: Optional[float] = 1.5
    speedup: Optional[float] = None
    params_fraction: Optional[float] = None  # at most this share of the teacher's parameters
    # at most latency_ms per example on this machine (C++ engine at latency_precision, batch 1), measured
    latency_ms: Optional[float] = None
    latency_precision: str = "int8"
    # training loop
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_steps_per_epoch: int = 0
    save_every: int = 200
    seed: int = 0
    progress: bool = True
    # where training runs (costeff.device: auto = CUDA when visible) and in what precision (bf16: autocast)
    device: str = "auto"
    precision: str = "fp32"
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        # a negative count or rate would otherwise train nothing, or diverge, without a word
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 4):
            raise ValueError(f"PipelineConfig: max_length must be None (from the data) or an integer >= 4, got {self.max_length!r}")
        bounds = {1: ("batch_size", "eval_batch_size", "exit_start", "prune_score_batches", "latency_rounds"),
                  0: ("max_train_examples", "max_eval_examples", "teacher_epochs", "ta_repr_epochs", "ta_pred_epochs", "exit_warmup_epochs",
                      "heads", "ffn", "prune_steps_per_event", "student_repr_epochs", "student_pred_epochs", "latency_examples",
                      "max_steps_per_epoch", "save_every")}
        for low, names in bounds.items():
            for name in names:
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, int) or v < low:
                    raise ValueError(f"PipelineConfig: {name} must be an integer >= {low}, got {v!r}")
        for name in ("teacher_lr", "ta_lr", "prune_lr", "student_repr_lr", "student_pred_lr", "temperature", "exit_lr_multiplier"):
            if not 0 < float(getattr(self, name)) < math.inf:
                raise ValueError(f"PipelineConfig: {name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name, (low, high) in {"exit_hint_weight": (0.0, math.inf), "weight_decay": (0.0, math.inf), "max_grad_norm": (0.0, math.inf),
                                  "prune_repr_share": (0.0, 1.0), "warmup_ratio": (0.0, 1.0)}.items():
            if not low <= float(getattr(self, name)) <= high:
                raise ValueError(f"PipelineConfig: {name} must be in [{low}, {high}], got {getattr(self, name)!r}")
        if self.embedding_rank is not None and (not isinstance(self.embedding_rank, int) or self.embedding_rank < 1):
            raise ValueError(f"PipelineConfig: embedding_rank must be None (no factorization) or an integer >= 1, got {self.embedding_rank!r}")
        for name, known in {"exit_pooling": EXIT_POOLINGS, "ta_init": ("pretrained", "teacher"), "prune_allocation": ALLOCATIONS,
                            "prune_schedule": SCHEDULES}.items():
            if getattr(self, name) not in known:
                raise ValueError(f"PipelineConfig: {name} must be one of {known}, got {getattr(self, name)!r}")
        for t in self.thresholds or ():
            check_threshold("PipelineConfig", t, "thresholds")
        check_device_spec("PipelineConfig", self.device)
        check_precision("PipelineConfig", self.precision)
        if self.max_drop is not None and not 0 <= self.max_drop < math.inf:
            raise ValueError(f"PipelineConfig: max_drop must be None or a number of points >= 0, got {self.max_drop!r}")
        if self.speedup is not None and not 1 <= self.speedup < math.inf:
            raise ValueError(f"PipelineConfig: speedup must be None or a number >= 1, got {self.speedup!r}")
        if self.params_fraction is not None and not 0 < self.params_fraction <= 1:
            raise ValueError(f"PipelineConfig: params_fraction must be None or a number in (0, 1], got {self.params_fraction!r}")
        if self.latency_ms is not None and not 0 < self.latency_ms < math.inf:
            raise ValueError(f"PipelineConfig: latency_ms must be None or a number of ms > 0, got {self.latency_ms!r}")
        if self.latency_precision not in ENGINE_PRECISIONS:
            raise ValueError(f"PipelineConfig: latency_precision must be one of {ENGINE_PRECISIONS}, got {self.latency_precision!r}")
        if self.latency_ms is not None and self.max_drop is None:
            raise ValueError("PipelineConfig: latency_ms needs max_drop (the threshold meeting both is calibrated against the teacher)")
        if self.speedup is not None and self.max_drop is None:
            raise ValueError("PipelineConfig: speedup needs max_drop (the threshold meeting both is calibrated against the teacher)")


PRESETS = {
    # Fits in 20 minutes on a 2-core CPU: all training sentences at the length that covers 95% of them
    # (48 tokens on Rotten Tomatoes; length-bucketed),
    # two teacher epochs, one TA epoch initialised from the teacher (the official code starts the TA
    # from the pretrained encoder, which needs several), 10 pruning events, four distillation epochs.
    # Intermediate exits read the token average (MiniLM was trained with mean pooling: its early CLS
    # states carry little) and learn 20x faster than the trunk: in 60 TA steps exits 1-4 reached
    # 60-81% dev accuracy this way, against the majority class (59%) after 125 steps with CLS and one
    # learning rate.
    "demo": dict(max_length=None, max_train_examples=0, batch_size=32, bucket_by_length=True, teacher_epochs=2, teacher_lr=1e-4,
                 ta_init="teacher", exit_pooling="mean", exit_lr_multiplier=20.0, ta_repr_epochs=0, ta_pred_epochs=1, ta_lr=5e-5,
                 prune_steps_per_event=24, prune_score_batches=4, prune_lr=1e-4, student_repr_epochs=1, student_pred_epochs=3,
                 student_repr_lr=2e-4, student_pred_lr=1e-4, threshold_fractions=fractions_of_ln2((0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)), latency_examples=64,
                 save_every=0),
    # The real settings (the official run.sh scaled to MiniLM-L6 and Rotten Tomatoes). The slim
    # student's learning rates (prune 1e-4, distill 2e-4 / 1e-4) were picked on dev: with the 3e-5 /
    # 1e-4 / 5e-5 defaults its best dev accuracy was 82.48%, with these 83.72% (docs/pipeline.md).
    "full": dict(max_length=128, bucket_by_length=True, exit_pooling="mean", exit_lr_multiplier=20.0, teacher_epochs=3, teacher_lr=5e-5, ta_init="pretrained", ta_repr_epochs=2, ta_pred_epochs=4,
                 prune_steps_per_event=160, prune_score_batches=32, prune_lr=1e-4, student_repr_epochs=8, student_pred_epochs=4,
                 student_repr_lr=2e-4, student_pred_lr=1e-4),
    # For tests: a handful of steps per stage.
    "tiny": dict(max_length=24, max_train_examples=96, max_eval_examples=48, batch_size=16, teacher_epochs=1, ta_init="teacher",
                 ta_repr_epochs=1, ta_pred_epochs=1, prune_steps_per_event=2, prune_score_batches=1, student_repr_epochs=1,
                 student_pred_epochs=1, thresholds=(0.0, 0.3, 10.0), latency_examples=8, latency_rounds=2, save_every=0),
}


def preset(name: str, **overrides) -> PipelineConfig:
    """The preset's PipelineConfig with ``overrides`` applied as given (``embedding_rank=None``: no factorization)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return replace(PipelineConfig(), **{**PRESETS[name], **overrides})


def _train_cfg(c: PipelineConfig, epochs: int, lr: float, exit_lr_multiplier: float = 1.0) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=lr, weight_decay=c.weight_decay, warmup_ratio=c.warmup_ratio, max_grad_norm=c.max_grad_norm,
                       seed=c.seed, save_every=c.save_every, progress=c.progress, max_steps_per_epoch=c.max_steps_per_epoch,
                       exit_lr_multiplier=exit_lr_multiplier, precision=c.precision)


def stage_teacher(c: PipelineConfig, data, backbone: str, out: str, resume: bool = False) -> dict:
    if c.teacher is not None:
        _, summary = import_teacher(c.teacher, data, os.path.join(out, "teacher"), data.metric, device=data.device)
        log.info("teacher: imported %s (dev %s %.2f)", c.teacher, data.metric, 100 * summary["best"][data.metric])
        return summary
    _, summary = finetune_teacher(backbone, data.num_labels, data.metric, data, _train_cfg(c, c.teacher_epochs, c.teacher_lr),
                                  os.path.join(out, "teacher"), resume, device=data.device)
    return summary


def load_teacher(out: str, attn_implementation: str = "eager", device="cpu"):
    path = os.path.join(out, "teacher", "model")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no fine-tuned teacher at {path}: run `costeff teacher --output {out}` first")
    return AutoModelForSequenceClassification.from_pretrained(path, attn_implementation=attn_implementation).to(device).eval()


def load_costeff(out: str, stage: str, sub: str = "model", device="cpu") -> CostEffForSequenceClassification:
    path = os.path.join(out, stage, sub)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no {stage} model at {path}: run `costeff {stage} --output {out}` first")
    return CostEffForSequenceClassification.from_pretrained(path).to(device).eval()


def stage_ta(c: PipelineConfig, data, backbone: str, out: str, resume: bool = False) -> dict:
    teacher = load_teacher(out, device=data.device)
    torch.manual_seed(c.seed)
    init = teacher if c.ta_init == "teacher" else backbone
    ta = multi_exit_from(init, teacher, c, data.num_labels).to(data.device)
    _, summary = distill(ta, teacher, data, _train_cfg(c, c.ta_repr_epochs, c.ta_lr, c.exit_lr_multiplier),
                         _train_cfg(c, c.ta_pred_epochs, c.ta_lr, c.exit_lr_multiplier),
                         os.path.join(out, "ta"), mode="ta", temperature=c.temperature, resume=resume, stage="ta",
                         exit_warmup_cfg=_train_cfg(c, c.exit_warmup_epochs, c.ta_lr, c.exit_lr_multiplier), exit_hint_weight=c.exit_hint_weight,
                         cache_teacher_outputs=c.cache_teacher_outputs)
    return summary


def multi_exit_from(init, teacher, c: PipelineConfig, num_labels: int) -> CostEffForSequenceClassification:
    """``init`` (the teacher or the pretrained backbone) converted to multi-exit with fresh exits and
    the teacher's label names."""
    model = from_pretrained_encoder(init, num_labels=num_labels, exit_start=c.exit_start, gradient_equilibrium=c.gradient_equilibrium,
                                    exit_pooling=c.exit_pooling)
    model.config.id2label, model.config.label2id = dict(teacher.config.id2label), dict(teacher.config.label2id)
    return model


def distillation_reference(c: PipelineConfig, out: str, device="cpu"):
    """What pruning and student distillation learn from: the TA, or the fine-tuned teacher itself
    (every student exit against its final logits) when the TA is switched off."""
    return load_costeff(out, "ta", device=device) if c.teacher_assistant else load_teacher(out, device=device)


def stage_prune(c: PipelineConfig, data, out: str, resume: bool = False) -> dict:
    reference = distillation_reference(c, out, data.device)
    if c.teacher_assistant:
        student = load_costeff(out, "ta", device=data.device).train()
    else:
        torch.manual_seed(c.seed)
        student = multi_exit_from(reference, reference, c, data.num_labels).to(data.device).train()
    target = PruneTarget(heads=c.heads, ffn=c.ffn, embedding_rank=c.embedding_rank)
    student, history = iterative_prune(student, reference, data, target, os.path.join(out, "prune"), c.prune_steps_per_event, c.prune_lr,
                                       c.prune_repr_share, c.prune_score_batches, c.exit_aware, c.temperature, c.seed, resume, c.progress,
                                       c.prune_allocation, c.prune_schedule, c.precision)
    return {"events": history}


def stage_distill(c: PipelineConfig, data, out: str, resume: bool = False) -> dict:
    reference = distillation_reference(c, out, data.device)
    student = load_costeff(out, "prune", "current", device=data.device).train()
    # without a TA the intermediate exits have only had the pruning steps: they get the TA stage's faster rate
    exit_lr = 1.0 if c.teacher_assistant else c.exit_lr_multiplier
    _, summary = distill(student, reference, data, _train_cfg(c, c.student_repr_epochs, c.student_repr_lr, exit_lr),
                         _train_cfg(c, c.student_pred_epochs, c.student_pred_lr, exit_lr), os.path.join(out, "student"), mode="student",
                         temperature=c.temperature, resume=resume, stage="student", cache_teacher_outputs=c.cache_teacher_outputs)
    if is_main_process() and c.prune_vocabulary:
        summary["vocabulary"] = prune_student_vocabulary(os.path.join(out, "student", "model"), data, c.max_length)
    if is_main_process() and c.max_drop is not None:
        # the threshold a user gets by default: the target against the teacher on dev
        model_dir = os.path.join(out, "student", "model")
        timed, predictor = None, None
        if c.latency_ms is not None:  # measured here, as a user runs it: the engine at batch 1 on real dev examples
            from costeff.inference.predict import Predictor

            predictor = Predictor(model_dir, c.latency_precision, threshold=0.0)
            timed = latency_batches(data, "dev", c.latency_examples, batch_sizes=(1,))[1]
        cal = calibrate_on_batches(model_dir, data.dev, data.metric, max_drop=c.max_drop, write=False, device=data.device,
                                   teacher=teacher_reference(out, data), speedup=c.speedup, latency_ms=c.latency_ms,
                                   timed_batches=timed, predictor=predictor)
        if c.latency_ms is not None:
            cal.update(precision=c.latency_precision, batch_size=1)
            cal["criterion"]["precision"] = c.latency_precision
        write_calibration(model_dir, cal, data.num_labels)
        log.info("calibrated threshold %.4f nats: dev %s %.2f (teacher %.2f, full depth %.2f), %.2fx fewer FLOPs, average exit layer "
                 "%.2f: %s", cal["threshold"], data.metric, cal["dev_metric"], cal["teacher_dev_metric"], cal["full_depth_dev_metric"],
                 cal["target"]["speedup"], cal["avg_exit_layer"], describe_target(c, cal["target"], cal["closest"]))
        summary["calibration"] = cal
    return summary


def teacher_reference(out: str, data, split: str = "dev") -> dict:
    """What the target is measured against: the teacher's metric on ``split`` (points) and its
    converted config (its analytic FLOPs)."""
    path = os.path.join(out, "teacher", "model")
    teacher = load_teacher(out, device=data.device)
    logits, labels = predict_logits(lambda b: teacher(**model_inputs(b)).logits, data.split(split))
    return {"metric": 100 * score_logits(logits, labels, data.metric)[data.metric], "config": converted_config(path, exit_start=None)}


def describe_target(c: PipelineConfig, verdict: dict, closest: Optional[dict]) -> str:
    """One line: the target, and whether this point meets it (else the closest point on each side)."""
    want = f"at most {c.max_drop:g} points below the teacher" + (f" at >= {c.speedup:g}x fewer FLOPs" if c.speedup else "")
    if c.latency_ms is not None:
        want += f" at <= {c.latency_ms:g} ms per example (engine {c.latency_precision}, batch 1)"

    def ms(p):
        return f", {p['latency_ms']:.3f} ms" if p.get("latency_ms") is not None else ""

    if verdict["met"]:
        return f"target met ({want}): {-verdict['drop']:+.2f} points vs the teacher, {verdict['speedup']:.2f}x fewer FLOPs{ms(verdict)}"
    line = f"target NOT met ({want}): {-verdict['drop']:+.2f} points vs the teacher, {verdict['speedup']:.2f}x fewer FLOPs{ms(verdict)}"
    for side, p in (closest or {}).items():
        line += f"; closest {side.replace('meets_', 'within ').replace('_', ' ')}: " + (
            "none" if p is None else f"T={p['threshold']:.4f}, {-p['drop']:+.2f} points, {p['speedup']:.2f}x{ms(p)}")
    return line


def prune_student_vocabulary(path: str, data, max_length: int) -> dict:
    """Rewrites the model directory ``path`` with the word-embedding rows of the training split's
    tokens and the tokenizer's special tokens only (any other token reads [UNK]'s row) and the
    position table cut to ``max_length`` tokens (what the saved tokenizer truncates to)."""
    tok = data.tokenizer
    if tok.unk_token_id is None:
        raise ValueError("prune_vocabulary: the tokenizer has no unknown token, so tokens outside the training split would have "
                         "no row; train without --prune-vocabulary")
    model = CostEffForSequenceClassification.from_pretrained(path)
    ids = set(tok.all_special_ids)
    for row in data.encoded["train"]["input_ids"]:
        ids.update(row)
    positions = min(model.config.max_position_embeddings, max_length + (model.config.position_offset or 0))
    pruned = prune_vocabulary(model, sorted(ids), tok.unk_token_id, positions)
    tmp = temp_dir(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    pruned.save_pretrained(tmp)
    data.save_tokenizer(tmp)
    replace_dir(tmp, path)
    before, after = count_parameters(model), count_parameters(pruned)
    log.info("vocabulary pruned to the training split: %d of %d word rows, %d positions; %d -> %d parameters",
             pruned.config.pruned_vocab_size, model.config.word_rows, positions, before, after)
    return {"word_rows": pruned.config.pruned_vocab_size, "vocab_size": model.config.vocab_size, "max_position_embeddings": positions,
            "params_before": before, "params_after": after}


def threshold_grid(c: PipelineConfig, num_labels: int) -> tuple:
    """The sweep's entropy thresholds in nats: ``thresholds`` as given, or the fractions of ln C."""
    return tuple(c.thresholds) if c.thresholds else sweep_thresholds(c.threshold_fractions, num_labels)


def stage_evaluate(c: PipelineConfig, data, out: str, split: str = "test") -> dict:
    # HF's default (sdpa) attention for the shipped teacher, what a user would run (TA training keeps
    # eager); the attention implementation does not matter to the weight conversion
    device = data.device
    teacher = load_teacher(out, attn_implementation="sdpa", device=device)
    student = load_costeff(out, "student", device=device)
    thresholds = threshold_grid(c, data.num_labels)
    teacher_costeff = from_pretrained_encoder(teacher, exit_start=teacher.config.num_hidden_layers).to(device).eval()
    timed = latency_batches(data, split, c.latency_examples)  # the same batches time every model
    models = [teacher, teacher_costeff, student]
    systems = [evaluate_hf_teacher(teacher, teacher_costeff.config, data, split, "teacher (HF)")]
    systems += sweep_costeff(teacher_costeff, data, split, (0.0,), "teacher (costeff kernels)")
    if c.teacher_assistant:
        models.append(load_costeff(out, "ta", device=device))
        systems += sweep_costeff(models[-1], data, split, thresholds, "TA early exit (DeeBERT)")
    systems += sweep_costeff(student, data, split, (0.0,), "slim static")
    systems += sweep_costeff(student, data, split, [t for t in thresholds if t > 0], "COST-EFF slim")
    calibrated = student.config.inference_threshold
    if extension_loaded():
        for precision in c.engine_precisions:
            engine = InferenceEngine.from_model(student, precision)
            systems += sweep_costeff(student, data, split, thresholds, f"COST-EFF engine {precision}", engine=engine)
            if calibrated is not None:  # what `costeff predict` runs by default
                systems += sweep_costeff(student, data, split, (calibrated,), f"COST-EFF engine {precision} (calibrated)", engine=engine)
    else:
        print("[costeff] evaluate: costeff._C is not built, so the engine rows are left out")
        if calibrated is not None:
            systems += sweep_costeff(student, data, split, (calibrated,), "COST-EFF slim (calibrated)")
    if device.type != "cpu":
        # the metrics came from the device; the latency columns are CPU latency, what the engine rows are
        # compared on (GPU latency: benchmarks/bench_gpu.py)
        log.info("evaluate: metrics computed on %s; latency is measured on the CPU", device)
        for m in models:
            m.to("cpu")
    add_latency(systems, timed, c.latency_rounds)
    rows = [row for row, _ in systems]
    add_ratios(rows, rows[0])
    paths = write_results(rows, data.metric, os.path.join(out, "eval"), f"{data.metric} vs cost on {split}")
    sizes = {
        # the converted teacher's layers hold exactly the teacher's encoder weights, whatever the family
        "teacher": {"total": count_parameters(teacher), "encoder": count_parameters(teacher_costeff.costeff.layers)},
        "student": {"total": count_parameters(student), "encoder": count_parameters(student.costeff.layers)},
        "student_config_params": parameter_count(student.config),
    }
    sizes["encoder_ratio"] = sizes["teacher"]["encoder"] / sizes["student"]["encoder"]
    sizes["total_ratio"] = sizes["teacher"]["total"] / sizes["student"]["total"]
    result = {"rows": rows, "paths": paths, "params": sizes, "metric": data.metric, "split": split}
    cal_path = os.path.join(out, "student", "model", "calibration.json")
    if calibrated is not None and os.path.exists(cal_path):
        with open(cal_path) as f:
            cal = json.load(f)
        if cal.get("criterion", {}).get("against") == "teacher":  # the pipeline's target: how it holds on this split
            crit = cal["criterion"]
            target = replace(c, max_drop=crit["max_drop"], speedup=crit["speedup"], latency_ms=crit.get("latency_ms"),
                             latency_precision=crit.get("precision", c.latency_precision))
            measured = None
            if target.latency_ms is not None:  # the calibrated engine row of this split, timed above at batch 1
                row = next((r for r in rows if r["model"] == f"COST-EFF engine {target.latency_precision} (calibrated)"), None)
                measured = None if row is None else row.get("latency_ms_b1")
            report = target_report(student.to(device), data.split(split), data.metric, teacher_reference(out, data, split), calibrated,
                                   target.max_drop, target.speedup, target.latency_ms, measured)
            result["target"] = {"dev": {**cal["target"], "closest": cal["closest"], "line": describe_target(target, cal["target"], cal["closest"])},
                                split: {**report, "line": describe_target(target, report, report["closest"])}}
            log.info("target on dev: %s", result["target"]["dev"]["line"])
            log.info("target on %s: %s", split, result["target"][split]["line"])
    if is_main_process():
        atomic_write_json(os.path.join(out, "eval", "summary.json"), result)
        write_model_card(os.path.join(out, "student", "model"), student.config, rows, sizes, data.metric, split)
    return result


def write_model_card(path: str, config, rows: list[dict], sizes: dict, metric: str, split: str) -> None:
    """README.md of the student's model directory: what it is, the measured rows of this evaluation and
    how to run it (written atomically)."""
    layers = config.num_hidden_layers
    keep = [r for r in rows if r["model"] in ("teacher (HF)", "slim static") or "(calibrated)" in r["model"]]
    lines = [
        "# COST-EFF slenderized multi-exit classifier", "",
        f"{layers} layers, hidden {config.hidden_size}, attention heads per layer {config.num_attention_heads} "
        f"(size {config.attention_head_size[0]}), FFN {config.intermediate_size}, word-embedding rank {config.embedding_rank}; "
        f"an exit after every layer from layer {config.exit_start} (intermediate exits read the {config.exit_pooling} state). "
        f"Labels: {', '.join(str(config.id2label[i]) for i in range(config.num_labels))}.", "",
        f"Parameters: {sizes['student']['total']:,} (encoder layers {sizes['student']['encoder']:,}); the teacher it was "
        f"distilled from: {sizes['teacher']['total']:,} (encoder {sizes['teacher']['encoder']:,}).", "",
        f"Calibrated entropy threshold: {config.inference_threshold} nats (`inference_threshold`; see calibration.json)."
        if config.inference_threshold is not None else "Not calibrated: `costeff predict` runs every input to the last layer.", "",
        f"Measured by `costeff evaluate` on the {split} split (latency per sample on the machine that ran it):", "",
        f"| model | threshold | {metric} | avg exit layer | GFLOPs | ms b1 | ms/sample b32 |", "|---|---|---|---|---|---|---|",
    ]
    for r in keep:
        t = "-" if r["threshold"] is None else f"{r['threshold']:.4g}"
        lines.append(f"| {r['model']} | {t} | {100 * r[metric]:.2f} | {r['avg_exit_layer']:.2f} | {r['avg_gflops']:.4f} | "
                     f"{r.get('latency_ms_b1', float('nan')):.3f} | {r.get('latency_ms_b32', float('nan')):.3f} |")
    lines += ["", "Use:", "", "```bash", f"echo \"some text\" | costeff predict --model {path} --precision int8",
              f"costeff export --model {path} --output {path}-onnx   # ONNX graphs that keep the early exit", "```", "",
              "```python", "from costeff.inference import InferenceEngine",
              f"engine = InferenceEngine.from_pretrained({path!r}, precision=\"int8\")", "```", ""]
    tmp = os.path.join(path, "README.md.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, os.path.join(path, "README.md"))


RUN_CONFIG = "run_config.json"
DEFAULT_TASK = "rotten_tomatoes"


def write_run_config(out: str, c: PipelineConfig, backbone: str, recipe: Optional[dict], data_args: Optional[dict]) -> None:
    """run_config.json: the config, the backbone, what a target derived and the data arguments (task,
    data_dir, CSV columns), so that a later command or benchmark reopens the run on its own task."""
    if is_main_process():
        atomic_write_json(os.path.join(out, RUN_CONFIG), {"config": c.__dict__, "backbone": backbone, "recipe": recipe,
                                                         "data": data_args or {"task": DEFAULT_TASK}})


def task_arguments(data_args: dict) -> tuple[str, Optional[str], dict]:
    """(task, data_dir, the column options of --task csv) of recorded or given data arguments."""
    return data_args["task"], data_args.get("data_dir"), {k: v for k, v in data_args.items() if k not in ("task", "data_dir")}


def read_run_data_args(run_dir: str) -> Optional[dict]:
    """The data arguments a run recorded (see write_run_config), or None when it has no run_config.json.
    Runs written before the data arguments were recorded: the task of their config if any, else the default."""
    path = os.path.join(run_dir, RUN_CONFIG)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    data = saved.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("task"), str):
        return {"task": saved.get("config", {}).get("task", DEFAULT_TASK)}
    return data


def mark_done(out: str, stage: str, seconds: float) -> None:
    """Marks a finished stage, so `pipeline --resume` skips it."""
    if is_main_process():
        with open(os.path.join(out, f".{stage}.done"), "w") as f:
            f.write(f"{seconds:.1f}\n")


def run_pipeline(c: PipelineConfig, data, backbone: str, out: str, resume: bool = False, stages=("teacher", "ta", "prune", "distill", "evaluate"),
                 recipe: Optional[dict] = None, data_args: Optional[dict] = None) -> dict:
    """``recipe``: what a target derived (costeff.pipeline.recipe); ``data_args``: the task and its data
    arguments as given; both recorded with the config (write_run_config)."""
    os.makedirs(out, exist_ok=True)
    timings, result = {}, {}
    write_run_config(out, c, backbone, recipe, data_args)
    for stage in stages:
        t0 = time.time()
        done_marker = os.path.join(out, f".{stage}.done")
        if resume and os.path.exists(done_marker) and stage != "evaluate":
            log.info("%s: already finished, skipped (--resume)", stage)
            continue
        if stage == "ta" and not c.teacher_assistant:
            log.info("ta: skipped (no teacher assistant: pruning starts from the teacher with fresh exits)")
            continue
        log.info("=== stage %s ===", stage)
        if stage == "teacher":
            result[stage] = stage_teacher(c, data, backbone, out, resume)
        elif stage == "ta":
            result[stage] = stage_ta(c, data, backbone, out, resume)
        elif stage == "prune":
            result[stage] = stage_prune(c, data, out, resume)
        elif stage == "distill":
            result[stage] = stage_distill(c, data, out, resume)
        elif stage == "evaluate":
            result[stage] = stage_evaluate(c, data, out)
        else:
            raise ValueError(f"unknown stage {stage!r}")
        timings[stage] = time.time() - t0
        mark_done(out, stage, timings[stage])
        log.info("stage %s finished in %.0fs", stage, timings[stage])
    result["timings_s"] = timings
    if is_main_process():
        atomic_write_json(os.path.join(out, "run.json"), json.loads(json.dumps(result, default=str)))
    return result
