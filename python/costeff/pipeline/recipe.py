"""The recipe from a target: `costeff pipeline --speedup X --max-drop D` derives the knobs a user would
otherwise set by hand from the teacher's shape, the task's data and the target. docs/pipeline.md
("A target, not a recipe") says why each rule is what it is; the numbers below come from the measured
runs it cites.

- static compression S = min(X, STATIC_LIMIT): the width cut at full depth. Past about 7x the
  students measured here lost accuracy fast (12 layers: 7.1x static, 0.71 points below the teacher;
  8.8x, 3.7 points), so a larger X is left to early exit (the calibrated threshold), which the 6-layer
  students reached 12-15x with.
- widths: heads and FFN neurons kept per layer cut in the same proportion (the measured recipes kept
  1/6 of the heads and 1/6-1/8 of the FFN), heads rounded to whole heads, the FFN then solved so
  that the student's analytic FLOPs at full depth, over the training split's real lengths, are the
  teacher's / S.
- embedding rank: hidden / 6, in multiples of 8 (64 for hidden 384, the measured default).
- allocation: "global" (heads and neurons ranked across layers) from DEEP_FROM_LAYERS (8) layers up: on
  12 layers it was better at the same totals (+0.3 points on dev, +2.4 on test); on 6 layers "uniform"
  is what was measured.
- teacher assistant: DEEP_TA_EPOCHS (2) epochs from DEEP_FROM_LAYERS layers up, at least the preset's.
  The student learns every exit from the TA; with 12 exits pulling on the shared layers, one TA epoch
  left the last exit 1.0-1.5 points below the teacher on dev, two epochs 0.4-0.5 (6 layers, one epoch:
  -0.8 to +0.5). The epoch with the best last-exit dev score is kept.
- healing steps: HEALING_EPOCHS epochs of training steps spread over the pruning events (the
  12-layer runs gained 1.2 points from 24 to 48 steps per event, 1.5 epochs in all, nothing more at
  96).
- representation distillation: 2 x S + 2 epochs (16 at 7x: the 12-layer student gained 1.8 points
  on dev from 1 to 16 epochs), never fewer than the preset's.
- teacher-output cache: on when the cached states fit in CACHE_MEMORY_SHARE of the available memory.
- exits: on every layer (an exit costs under 1% of a layer's FLOPs; the threshold decides which fire).
- parameters (``params_fraction`` F): the embedding rank comes down in steps of 8 until the student
  holds at most F of the teacher's parameters; when rank 8 is not enough, the word rows the training
  split never uses are dropped too (``prune_vocabulary``), and the rank solved again. The widths stay
  what the speed-up asked (most of a small student's parameters are its word embedding).

Only what the user did not set is derived: an explicit flag always wins."""
from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Optional, Sequence

from costeff.models.flops import flops_per_sample

log = logging.getLogger("costeff")

STATIC_LIMIT = 7.0
HEALING_EPOCHS = 1.5
CACHE_MEMORY_SHARE = 0.3
DEEP_FROM_LAYERS = 8
DEEP_TA_EPOCHS = 2

@dataclass(frozen=True)
class Target:
    """What the user asks for. speedup: analytic FLOPs per dev example, the teacher's over the
    student's (with early exit); max_drop: metric points below the teacher on dev."""

    speedup: Optional[float] = None
    max_drop: float = 1.0
    params_fraction: Optional[float] = None  # the student's parameters over the teacher's, at most

    def __post_init__(self):
        if self.params_fraction is not None and not (isinstance(self.params_fraction, (int, float)) and 0 < self.params_fraction <= 1):
            raise ValueError(f"target: params_fraction must be a number in (0, 1], got {self.params_fraction!r}")
        if self.speedup is not None and not (isinstance(self.speedup, (int, float)) and 1.0 <= self.speedup < math.inf):
            raise ValueError(f"target: speedup must be a number >= 1 (the teacher's FLOPs over the student's), got {self.speedup!r}")
        if not (isinstance(self.max_drop, (int, float)) and 0.0 <= self.max_drop < math.inf):
            raise ValueError(f"target: max_drop must be a number of metric points >= 0, got {self.max_drop!r}")


def mean_gflops(config, lengths: Counter, exit_layer: Optional[int] = None) -> float:
    """Analytic GFLOPs per example averaged over a length histogram (length -> count)."""
    n = sum(lengths.values())
    return sum(c * flops_per_sample(config, length, exit_layer) for length, c in lengths.items()) / n / 1e9


def _student_config(base, heads: int, ffn: int, rank: Optional[int]):
    return replace_config(base, num_attention_heads=[min(heads, h) for h in base.num_attention_heads],
                          intermediate_size=[min(ffn, f) for f in base.intermediate_size], embedding_rank=rank)


def replace_config(config, **fields):
    """A copy of a CostEffConfig with ``fields`` changed (per-layer lists as given)."""
    return type(config)(**{**config.to_dict(), **fields})


def embedding_rank_for(hidden_size: int) -> int:
    return max(8, int(round(hidden_size / 6 / 8)) * 8)


def solve_widths(base, lengths: Counter, static: float, rank: Optional[int]) -> tuple[int, int, float]:
    """(heads, ffn, achieved static compression) per layer for a full-depth student at ``static``x
    fewer FLOPs than ``base`` (the converted teacher, exit on the last layer only) over ``lengths``.
    Heads and FFN are cut in the same proportion as nearly as whole heads allow; the FFN absorbs the
    rounding. When even one head and one neuron per layer cost more than the budget, that is the
    answer (the rest is left to early exit)."""
    teacher = replace_config(base, exit_start=base.num_hidden_layers)
    budget = mean_gflops(teacher, lengths) / static
    heads_full, ffn_full = max(base.num_attention_heads), max(base.intermediate_size)
    best = None
    for heads in range(1, heads_full + 1):
        at0 = mean_gflops(_student_config(base, heads, 0, rank), lengths)
        per_neuron = mean_gflops(_student_config(base, heads, 1, rank), lengths) - at0
        ffn = int(math.floor((budget - at0) / per_neuron)) if per_neuron > 0 else ffn_full
        if ffn < 1:
            continue
        ffn = min(ffn, ffn_full)
        gap = abs(math.log((heads / heads_full) / (ffn / ffn_full)))
        if best is None or gap < best[0]:
            best = (gap, heads, ffn)
    if best is None:
        heads, ffn = 1, 1
    else:
        _, heads, ffn = best
    achieved = mean_gflops(teacher, lengths) / mean_gflops(_student_config(base, heads, ffn, rank), lengths)
    return heads, ffn, achieved


def available_memory_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def teacher_cache_bytes(base, lengths: Counter) -> int:
    """What --cache-teacher-outputs keeps: every hidden state (embeddings + each layer) at real tokens in
    float16 and every exit's logits in float32, per training example."""
    tokens = sum(length * c for length, c in lengths.items())
    examples = sum(lengths.values())
    return tokens * (base.num_hidden_layers + 1) * base.hidden_size * 2 + examples * base.num_hidden_layers * base.num_labels * 4


def fit_parameters(base, student, fraction: float, vocabulary_rows: Optional[int], max_length: Optional[int],
                   fixed_rank: bool = False) -> tuple[Optional[int], bool, dict]:
    """(embedding rank, prune the vocabulary?, counts): the largest rank (multiple of 8, at most the
    student's) with which the student holds at most ``fraction`` of the teacher's parameters, first
    with the whole vocabulary, then with ``vocabulary_rows`` word rows and positions up to
    ``max_length``. A ValueError says how close the smallest student comes."""
    from costeff.models.flops import parameter_count

    teacher = parameter_count(replace_config(base, exit_start=base.num_hidden_layers))
    top = student.embedding_rank or base.hidden_size
    ranks = [student.embedding_rank] if fixed_rank else list(range(8 * (top // 8), 7, -8))
    tried = []
    for prune in (False, True):
        if prune and not vocabulary_rows:
            break
        extra = {}
        if prune:
            extra = {"pruned_vocab_size": min(vocabulary_rows, base.vocab_size)}
            if max_length:
                extra["max_position_embeddings"] = min(base.max_position_embeddings, max_length + (base.position_offset or 0))
        for rank in ranks:
            params = parameter_count(replace_config(student, embedding_rank=rank, **extra))
            tried.append(params)
            if params <= fraction * teacher:
                return rank, prune, {"student": params, "teacher": teacher}
    raise ValueError(f"target: --params-fraction {fraction:g} is out of reach at these widths: the smallest student holds "
                     f"{min(tried):,} parameters, {min(tried) / teacher:.3f} of the teacher's {teacher:,}")


def speedup_for_latency(base, train_ids: Sequence[Sequence[int]], latency_ms: float, precision: str, examples: int = 64,
                        rounds: int = 3, timer: Optional[Callable] = None) -> tuple[float, str]:
    """(speed-up, why): the FLOPs speed-up the widths are derived from for a latency target. The
    teacher's shape runs here on the C++ engine at ``precision`` (random weights: latency does not
    depend on them; its exit on the last layer only; batch 1 over ``examples`` training examples of
    real length); the speed-up is its time over the target, at least 1. Latency falls less than FLOPs
    (every call has fixed costs), so this only sizes the widths; the calibrated threshold is what meets
    the latency, as measured on the student. ``timer(fn) -> seconds per example`` is injectable."""
    import torch

    from costeff.inference import InferenceEngine
    from costeff.inference.timing import time_interleaved
    from costeff.models import CostEffForSequenceClassification

    if not (0 < latency_ms < math.inf):
        raise ValueError(f"target: latency_ms must be a number of ms > 0, got {latency_ms!r}")
    rows = [torch.tensor([list(r)], dtype=torch.long) for r in list(train_ids)[:examples]]
    if not rows:
        raise ValueError("target: the training split is empty")
    torch.manual_seed(0)
    engine = InferenceEngine.from_model(CostEffForSequenceClassification(replace_config(base, exit_start=base.num_hidden_layers)).eval(),
                                        precision)

    def block():
        for r in rows:
            engine(r)
        return len(rows)

    seconds = timer(block) if timer is not None else time_interleaved({"teacher": block}, rounds)["teacher"]["median"]
    teacher_ms = 1000 * seconds
    speedup = max(1.0, teacher_ms / latency_ms)
    return speedup, (f"latency target {latency_ms:g} ms: the teacher's shape takes {teacher_ms:.3f} ms per example here (engine "
                     f"{precision}, batch 1, {len(rows)} training examples), so {speedup:.2f}x fewer FLOPs sizes the widths; the "
                     f"threshold is calibrated on measured latency")


def derive_recipe(c, target: Target, base, train_lengths: Iterable[int], explicit: Sequence[str] = (),
                  memory_bytes: Optional[int] = None, vocabulary_rows: Optional[int] = None) -> tuple[object, dict]:
    """(PipelineConfig with the derived fields, the derivation: each field's value and why).
    ``base``: the teacher converted to costeff's config (:func:`costeff.models.converted_config`);
    ``train_lengths``: the training split's token counts; ``explicit``: fields the user set, kept;
    ``vocabulary_rows``: distinct token ids of the training split with the special tokens (for
    ``params_fraction``)."""
    lengths = Counter(int(n) for n in train_lengths)
    if not lengths:
        raise ValueError("derive_recipe: the training split is empty")
    examples = sum(lengths.values())
    layers = base.num_hidden_layers
    speedup = target.speedup if target.speedup is not None else 1.0
    static = min(speedup, STATIC_LIMIT)
    derived, why = {}, {}
    rank = c.embedding_rank if "embedding_rank" in explicit else embedding_rank_for(base.hidden_size)
    derived["embedding_rank"], why["embedding_rank"] = rank, f"hidden {base.hidden_size} / 6 in multiples of 8"
    teacher_gflops = mean_gflops(replace_config(base, exit_start=layers), lengths)
    if target.speedup is not None:
        heads, ffn, achieved = solve_widths(base, lengths, static, rank)
        derived["heads"], derived["ffn"] = heads, ffn
        why["heads"] = why["ffn"] = (f"static compression {static:.2f}x = min(speedup {speedup:g}, {STATIC_LIMIT:g}); heads and FFN cut "
                                     f"in one proportion; {achieved:.2f}x at full depth over the training lengths")
    else:  # no speed asked: the preset's (or the user's) widths
        heads, ffn = c.heads, c.ffn
        achieved = teacher_gflops / mean_gflops(_student_config(base, heads, ffn, rank), lengths)
        static = achieved
    deep = layers >= DEEP_FROM_LAYERS
    allocation = "global" if deep else "uniform"
    derived["prune_allocation"] = allocation
    why["prune_allocation"] = f"{layers} layers: {'ranked across layers' if allocation == 'global' else 'per layer'} (global from {DEEP_FROM_LAYERS})"
    derived["ta_pred_epochs"] = max(c.ta_pred_epochs, DEEP_TA_EPOCHS) if deep else c.ta_pred_epochs
    why["ta_pred_epochs"] = (f"{layers} layers: {DEEP_TA_EPOCHS} epochs from {DEEP_FROM_LAYERS} layers up (the student learns every "
                             f"exit from the TA), at least the preset's {c.ta_pred_epochs}")
    events = max(max(base.num_attention_heads) - heads, 1)
    steps_per_epoch = math.ceil(examples / c.batch_size)
    steps = min(160, max(16, round(HEALING_EPOCHS * steps_per_epoch / events)))
    derived["prune_steps_per_event"] = steps
    why["prune_steps_per_event"] = f"{HEALING_EPOCHS:g} epochs ({steps_per_epoch} steps each) over {events} pruning events, within [16, 160]"
    repr_epochs = max(c.student_repr_epochs, int(round(2 * static + 2)))
    derived["student_repr_epochs"] = repr_epochs
    why["student_repr_epochs"] = f"2 x static {static:.2f} + 2, at least the preset's {c.student_repr_epochs}"
    need = teacher_cache_bytes(base, lengths)
    memory = available_memory_bytes() if memory_bytes is None else memory_bytes
    cache = memory is not None and need <= CACHE_MEMORY_SHARE * memory
    derived["cache_teacher_outputs"] = cache
    why["cache_teacher_outputs"] = (f"{need / 2**30:.2f} GiB of teacher outputs vs {CACHE_MEMORY_SHARE:g} x "
                                    f"{'unknown' if memory is None else f'{memory / 2**30:.1f} GiB'} available")
    derived["exit_start"], why["exit_start"] = 1, "an exit on every layer (under 1% of a layer's FLOPs each)"
    if target.params_fraction is not None:
        student = _student_config(base, c.heads if "heads" in explicit else heads, c.ffn if "ffn" in explicit else ffn, rank)
        rank, vocabulary, params = fit_parameters(base, student, target.params_fraction, vocabulary_rows, c.max_length,
                                                  fixed_rank="embedding_rank" in explicit)
        derived["embedding_rank"], derived["prune_vocabulary"] = rank, vocabulary
        why["embedding_rank"] = why["prune_vocabulary"] = (f"{params['student']:,} parameters, {params['student'] / params['teacher']:.3f} "
                                                           f"of the teacher's {params['teacher']:,} (at most {target.params_fraction:g})")
    kept = {k: v for k, v in derived.items() if k not in explicit}
    recipe = {k: {"value": getattr(c, k) if k in explicit else v, "why": "set by the user" if k in explicit else why[k]}
              for k, v in derived.items()}
    recipe["static_compression"] = {"value": achieved, "why": why.get("heads", "the preset's widths")}
    return replace(c, **kept), recipe
