"""Tokenization with the backbone's tokenizer and dynamic-padding data loaders (optional length
bucketing: batches of similar lengths, shuffled as batches, so padding stays small)."""
from __future__ import annotations

from typing import Iterator

import datasets
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def tokenize(dd: datasets.DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> datasets.DatasetDict:
    """Adds input_ids/attention_mask/token_type_ids (truncated to max_length, unpadded) and labels."""
    if max_length < 4:
        raise ValueError(f"max_length must be at least 4 tokens, got {max_length}")
    first = next(iter(dd.values()))  # every split has the same columns
    has_pair = "text_pair" in first.column_names

    def encode(batch):
        enc = tokenizer(batch["text"], batch["text_pair"] if has_pair else None, truncation=True, max_length=max_length)
        enc["labels"] = batch["label"]
        return enc

    out = dd.map(encode, batched=True, remove_columns=first.column_names, desc="tokenizing", load_from_cache_file=False)
    return out.with_format(columns=[c for c in MODEL_COLUMNS if c in next(iter(out.values())).column_names])


class GlobalBatchSampler(Sampler[list]):
    """Seeded global batches, each split across data-parallel ranks (rank r takes batch[r::world]).

    Every rank sees the same global batches a single process would, so data-parallel training
    averages gradients over exactly the single-process batch. With bucket_by_length, indices are
    grouped into batches of similar length inside chunks of 50 batches, then batches are shuffled."""

    def __init__(self, lengths, batch_size: int, seed: int = 0, shuffle: bool = True, bucket_by_length: bool = False,
                 rank: int = 0, world: int = 1, bucket_factor: int = 50):
        if batch_size < world:
            raise ValueError(f"batch size {batch_size} is smaller than the number of processes {world}")
        self.lengths = list(lengths)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.bucket_by_length, self.rank, self.world, self.bucket_factor = bucket_by_length, rank, world, bucket_factor

    def global_batches(self) -> list:
        n = len(self.lengths)
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        if not self.bucket_by_length:
            return [idx[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        chunk = self.batch_size * self.bucket_factor
        batches = []
        for start in range(0, n, chunk):
            part = sorted(idx[start:start + chunk], key=lambda i: self.lengths[i])
            batches += [part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        if self.shuffle:
            order = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in order]
        return batches

    def __iter__(self) -> Iterator[list]:
        for b in self.global_batches():
            part = b[self.rank::self.world]
            if part:
                yield part

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size


class WithExampleIndex(torch.utils.data.Dataset):
    """``ds`` whose rows also carry ``example_index`` (the row's position in ``ds``), so per-example
    state (the distillation's teacher-output cache) can follow a row through shuffled batches."""

    def __init__(self, ds: datasets.Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return {**self.ds[i], "example_index": i}


def make_loader(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    bucket_by_length: bool = False,
    rank: int = 0,
    world: int = 1,
    with_index: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """Dynamic padding (to the longest row of each batch); the batch order is a pure function of seed.
    with_index: batches also hold ``example_index`` (LongTensor, each row's position in ``ds``).
    pin_memory: batches in page-locked memory, for non-blocking copies to a GPU."""
    if len(ds) == 0:
        raise ValueError("cannot build a data loader over an empty split")
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    lengths = [len(x) for x in ds["input_ids"]] if bucket_by_length else [0] * len(ds)
    sampler = GlobalBatchSampler(lengths, batch_size, seed, shuffle, bucket_by_length, rank, world)
    return DataLoader(WithExampleIndex(ds) if with_index else ds, batch_sampler=sampler, collate_fn=collate, pin_memory=pin_memory)
