"""Stage 1: the teacher. Fine-tune the backbone on the task, or import a classifier the user has
already fine-tuned (``--teacher DIR``)."""
from __future__ import annotations

import os
from typing import Optional

import torch
from transformers import AutoModelForSequenceClassification

from costeff.data.tasks import head_label_names, head_label_order
from costeff.pipeline.checkpoint import replace_dir, temp_dir
from costeff.pipeline.evaluate_utils import model_inputs, predict_logits, score_logits
from costeff.pipeline.trainer import TrainConfig, load_best, train


def import_teacher(path: str, loaders, output_dir: str, metric: str, device="cpu", where: Optional[str] = None):
    """A classifier fine-tuned elsewhere as the teacher: checked (a supported family, the task's labels,
    which ``loaders`` already carry in its head's order), scored on dev and saved with the run's
    tokenizer to output_dir/model like a fine-tuned one. Returns (model, summary)."""
    from costeff.models import family_of

    where = where or path
    model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager")
    family_of(model)
    head_label_order(head_label_names(model.config), loaders.label_names, f"--teacher {where}")
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
