"""Stage 1: fine-tune the backbone (a Hugging Face BERT) on the task: the teacher."""
from __future__ import annotations

import os

import torch
from transformers import AutoModelForSequenceClassification

from costeff.pipeline.evaluate_utils import model_inputs, predict_logits, score_logits
from costeff.pipeline.trainer import TrainConfig, load_best, train


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
