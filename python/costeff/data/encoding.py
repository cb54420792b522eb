"""Tokenization with the backbone's tokenizer and dynamic-padding data loaders (optional length
bucketing: batches of similar lengths, shuffled as batches, so padding stays small)."""
from __future__ import annotations

import random
from typing import Iterator, Optional

import datasets
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def tokenize(dd: datasets.DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> datasets.DatasetDict:
    """Adds input_ids/attention_mask/token_type_ids (truncated to max_length, unpadded) and labels."""
    if max_length < 4:
        raise ValueError(f"max_length must be at least 4 tokens, got {max_length}")
    has_pair = "text_pair" in dd["train"].column_names

    def encode(batch):
        enc = tokenizer(batch["text"], batch["text_pair"] if has_pair else None, truncation=True, max_length=max_length)
        enc["labels"] = batch["label"]
        return enc

    out = dd.map(encode, batched=True, remove_columns=dd["train"].column_names, desc="tokenizing", load_from_cache_file=False)
    return out.with_format(columns=[c for c in MODEL_COLUMNS if c in out["train"].column_names])


class LengthBucketSampler(Sampler[list]):
    """Yields batches of indices of similar length; batch order is shuffled with a seeded RNG per epoch."""

    def __init__(self, lengths, batch_size: int, seed: int = 0, shuffle: bool = True, bucket_factor: int = 50):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.bucket_factor = bucket_factor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list]:
        rng = random.Random(self.seed * 1000003 + self.epoch)
        idx = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(idx)
        chunk = self.batch_size * self.bucket_factor
        batches = []
        for start in range(0, len(idx), chunk):
            part = sorted(idx[start:start + chunk], key=lambda i: self.lengths[i])
            batches += [part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        return iter(batches)

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size


def make_loader(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    bucket_by_length: bool = False,
    sampler: Optional[Sampler] = None,
) -> DataLoader:
    if len(ds) == 0:
        raise ValueError("cannot build a data loader over an empty split")
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    if bucket_by_length and sampler is None:
        lengths = [len(x) for x in ds["input_ids"]]
        return DataLoader(ds, batch_sampler=LengthBucketSampler(lengths, batch_size, seed, shuffle), collate_fn=collate)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      generator=generator if shuffle and sampler is None else None, collate_fn=collate)
