"""Stage 1: the teacher. Fine-tune the backbone on the task, or import a classifier the user has
already fine-tuned (``--teacher DIR``)."""
from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import torch
from transformers import AutoModelForSequenceClassification

from costeff.pipeline.checkpoint import replace_dir, temp_dir
from costeff.pipeline.evaluate_utils import model_inputs, predict_logits, score_logits
from costeff.pipeline.trainer import TrainConfig, load_best, train


def _is_generic(names: Sequence[str]) -> bool:
    """transformers' placeholder names (LABEL_0, LABEL_1, ...): the head's ids carry no names."""
    return all(re.fullmatch(r"LABEL_\d+", str(n)) for n in names)


def classifier_label_order(config, task_names: Sequence[str], where: str) -> tuple[list[int], tuple]:
    """How a task's labels map onto a fine-tuned classifier's head: (ids, names), ``ids[task id]`` the
    head's id of that label and ``names`` the label names in the head's order (the classifier's own,
    or the task's when the head has only placeholder names). Names match case-insensitively; any
    other difference is an error, since the head's ids would mean other labels."""
    n = int(config.num_labels)
    theirs = [str(config.id2label[i]) for i in range(n)] if getattr(config, "id2label", None) and len(config.id2label) == n else []
    if n != len(task_names):
        named = f" ({', '.join(theirs)})" if theirs and not _is_generic(theirs) else ""
        raise ValueError(f"--teacher {where}: its head has {n} labels{named}, the task has {len(task_names)} "
                         f"({', '.join(map(str, task_names))}); a teacher must be fine-tuned on the task it is compressed for")
    if not theirs or _is_generic(theirs):
        return list(range(n)), tuple(task_names)
    index = {name.lower(): i for i, name in enumerate(theirs)}
    if len(index) != n or {str(t).lower() for t in task_names} != set(index):
        raise ValueError(f"--teacher {where}: its labels {theirs} are not the task's {list(map(str, task_names))}; rename them in "
                         "its config.json (id2label/label2id, in the head's order) or give the task data with the same label names")
    return [index[str(t).lower()] for t in task_names], tuple(theirs)


def import_teacher(path: str, loaders, output_dir: str, metric: str, device="cpu", where: Optional[str] = None):
    """A classifier fine-tuned elsewhere as the teacher: checked (a supported family, the task's labels,
    which ``loaders`` already carry in its head's order), scored on dev and saved with the run's
    tokenizer to output_dir/model like a fine-tuned one. Returns (model, summary)."""
    from costeff.models import family_of

    where = where or path
    model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager")
    family_of(model)
    classifier_label_order(model.config, loaders.label_names, where)
    maps = loaders.label_maps()
    model.config.id2label, model.config.label2id = maps["id2label"], maps["label2id"]
    model.to(device).eval()
    logits, labels = predict_logits(lambda b: model(**model_inputs(b)).logits, loaders.dev)
    dev = score_logits(logits, labels, metric)
    parent = os.path.abspath(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = temp_dir(parent, "model")
    model.save_pretrained(tmp)
    loaders.save_tokenizer(tmp)
    replace_dir(tmp, os.path.join(parent, "model"))
    return model, {"stage": "teacher", "imported_from": os.path.abspath(path), "best": dev, "history": []}


def finetune_teacher(backbone: str, num_labels: int, metric: str, loaders, cfg: TrainConfig, output_dir: str, resume: bool = False,
                     device="cpu"):
    """loaders: object with .train(epoch) -> DataLoader and .dev -> DataLoader (batches on ``device``,
    where the model trains). Saves the best model (on dev) with save_pretrained to output_dir/model
    and returns (model, summary)."""
    torch.manual_seed(cfg.seed)
    labels = loaders.label_maps() if hasattr(loaders, "label_maps") else {}
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=num_labels, attn_implementation="eager", **labels)
    model.to(device)

    def loss_fn(m, batch):
        out = m(**model_inputs(batch), labels=batch["labels"])
        return out.loss, {}

    def eval_fn(m):
        m.eval()
        logits, labels = predict_logits(lambda b: m(**model_inputs(b)).logits, loaders.dev)
        return score_logits(logits, labels, metric)

    summary = train(model, loaders.train, loss_fn, cfg, os.path.join(output_dir, "train"), eval_fn, resume, stage="teacher")
    load_best(model, os.path.join(output_dir, "train"))
    model.save_pretrained(os.path.join(output_dir, "model"))
    if hasattr(loaders, "save_tokenizer"):
        loaders.save_tokenizer(os.path.join(output_dir, "model"))
    return model, summary
