"""Task data prepared once per run: tokenizer, tokenized splits, seeded per-epoch loaders
(sharded across ranks under torchrun)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import datasets
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoTokenizer

from costeff.data import load_task, make_loader, tokenize
from costeff.data.tasks import head_label_names, head_label_order, renumber_labels
from costeff.device import to_device


class OnDevice:
    """A loader whose batches arrive on ``device`` (from pinned host memory, copied without blocking)."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield to_device(batch, self.device)


@dataclass
class RunData:
    tokenizer: object
    encoded: datasets.DatasetDict
    num_labels: int
    metric: str
    label_names: tuple
    batch_size: int
    eval_batch_size: int
    seed: int
    bucket_by_length: bool = False
    device: torch.device = torch.device("cpu")  # where every loader's batches arrive (models are moved there by the stages)
    max_length: int = 128  # tokens per input the splits were truncated to

    def label_maps(self) -> dict:
        """id2label / label2id of the task's real label names, for every saved model's config."""
        return {"id2label": dict(enumerate(self.label_names)), "label2id": {n: i for i, n in enumerate(self.label_names)}}

    def save_tokenizer(self, path: str) -> None:
        """Writes the tokenizer next to a saved model, so the model directory is self-contained."""
        self.tokenizer.save_pretrained(path)

    def _rank_world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    @staticmethod
    def _on(loader, device: torch.device):
        return loader if device.type == "cpu" else OnDevice(loader, device)

    def train(self, epoch: int, with_index: bool = False):
        rank, world = self._rank_world()
        loader = make_loader(self.encoded["train"], self.tokenizer, self.batch_size, shuffle=True,
                             seed=self.seed * 100003 + epoch, bucket_by_length=self.bucket_by_length, rank=rank, world=world,
                             with_index=with_index, pin_memory=self.device.type == "cuda")
        return self._on(loader, self.device)

    def split(self, name: str, with_index: bool = False, device=None):
        """Batches of a dev/test split on the run's device (or ``device``, e.g. "cpu" for the CPU engine)."""
        # evaluation runs unsharded on every rank (dev/test are small): identical metrics everywhere
        # batches of similar length (order is irrelevant to the metrics; padding costs time)
        on = self.device if device is None else torch.device(device)
        loader = make_loader(self.encoded[name], self.tokenizer, self.eval_batch_size, shuffle=False, bucket_by_length=True,
                             with_index=with_index, pin_memory=on.type == "cuda")
        return self._on(loader, on)

    @property
    def dev(self):
        return self.split("dev")

    @property
    def test(self):
        return self.split("test")


def _has_token_types(model_path: str) -> bool:
    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return True
    return getattr(config, "type_vocab_size", 0) >= 2


def drop_token_types(tokenizer) -> None:
    """Makes ``tokenizer`` stop returning token_type_ids (also once saved and reloaded)."""
    names = [n for n in tokenizer.model_input_names if n != "token_type_ids"]
    tokenizer.model_input_names = names
    tokenizer.init_kwargs["model_input_names"] = names


COVERED_SHARE = 0.95


def covering_length(texts, pairs, tokenizer, limit: int, share: float = COVERED_SHARE) -> int:
    """The token length that covers ``share`` of the inputs, rounded up to a multiple of 8, within
    [16, limit]: what an automatic --max-length truncates to (long inputs are not cut at a
    preset's guess, short ones are not padded to 128)."""
    lengths = sorted(len(ids) for ids in tokenizer(list(texts), list(pairs) if pairs is not None else None)["input_ids"])
    if not lengths:
        raise ValueError("max_length: the training split is empty")
    at = lengths[min(len(lengths) - 1, math.ceil(share * len(lengths)) - 1)]
    return int(max(16, min(limit, 8 * math.ceil(at / 8))))


def position_limit(model_path: str) -> int:
    """The longest input the model's position table holds (RoBERTa-style tables start past the pad id)."""
    from costeff.models import converted_config

    try:
        cfg = converted_config(model_path)
    except (ValueError, OSError):
        return 512
    return int(cfg.max_position_embeddings - (cfg.position_offset or 0))


def prepare_data(
    task: str,
    tokenizer_path: str,
    max_length: Optional[int] = 128,
    batch_size: int = 32,
    eval_batch_size: int = 64,
    seed: int = 0,
    data_dir: Optional[str] = None,
    max_train_examples: int = 0,
    max_eval_examples: int = 0,
    bucket_by_length: bool = False,
    split_seed: Optional[int] = None,
    device: torch.device = torch.device("cpu"),
    teacher: Optional[str] = None,
    **task_kwargs,
) -> RunData:
    """Tokenized splits and seeded loaders. ``split_seed`` fixes the train/dev/test split (None: ``seed``),
    ``seed`` the batch order, so training seeds can vary on one test set. Batches arrive on ``device``.
    ``teacher``: a fine-tuned classifier directory whose head the labels are renumbered to (and whose
    label names the run keeps); a task whose labels its head does not have is refused.
    ``max_length`` None: :func:`covering_length` of the training split (RunData.max_length says what)."""
    split_seed = seed if split_seed is None else split_seed
    dd, num_labels, metric, names = load_task(task, data_dir=data_dir, seed=split_seed, **task_kwargs)
    if teacher is not None:
        ids, names = head_label_order(head_label_names(AutoConfig.from_pretrained(teacher)), names, f"--teacher {teacher}")
        dd = renumber_labels(dd, ids)
    if max_train_examples:
        dd["train"] = dd["train"].select(range(min(max_train_examples, len(dd["train"]))))
    if max_eval_examples:
        for s in ("dev", "test"):
            dd[s] = dd[s].select(range(min(max_eval_examples, len(dd[s]))))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if max_length is None:
        train = dd["train"]
        max_length = covering_length(train["text"], train["text_pair"] if "text_pair" in train.column_names else None, tokenizer,
                                     position_limit(tokenizer_path))
    tokenizer.model_max_length = max_length  # saved with every model: what `costeff predict` truncates to
    if not _has_token_types(tokenizer_path):  # DistilBERT, RoBERTa-style: no token_type_ids in the batches
        drop_token_types(tokenizer)
    enc = tokenize(dd, tokenizer, max_length)
    return RunData(tokenizer, enc, num_labels, metric, names, batch_size, eval_batch_size, seed, bucket_by_length, torch.device(device),
                   max_length)
