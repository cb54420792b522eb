#!/usr/bin/env bash
# Full CUDA build of the Python extension (csrc/cuda/*.cu with the torch binding) against the CUDA
# torch wheel, in a separate venv cached outside the checkout. No GPU needed: it proves the .cu files
# compile and link for sm_80/sm_90 and register CUDA kernels; it cannot run them.
# Built out of tree (build/cuda-ext) so the CPU build's python/costeff/_C*.so is left alone.
# Then the same with CMake (COSTEFF_WITH_CUDA=ON, libtorch of that venv) + ctest, in build/cmake-cuda.
# COSTEFF_CUDA_VENV_ONLY=1 stops after preparing the venv (a cacheable CI step);
# COSTEFF_CUDA_CMAKE=0 skips the CMake build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_SPEC="torch==2.14.1"
PY="${COSTEFF_CUDA_PYTHON:-python3}"
# Don't inherit another venv (e.g. the CPU one) when choosing the base interpreter.
if [ -n "${VIRTUAL_ENV:-}" ]; then PATH="${PATH//$VIRTUAL_ENV\/bin:/}"; unset VIRTUAL_ENV; fi
PY_VER="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
# cmake: the system's 3.25 cannot pass C++20 to nvcc 13 (CMakeLists.txt checks this).
EXTRA_PKGS=(ninja setuptools wheel numpy cmake==3.31.6)
KEY="$(printf '%s\n' "$TORCH_SPEC" "python$PY_VER" "${EXTRA_PKGS[@]}" | sha256sum | cut -c1-12)"
VENV="${COSTEFF_VENV_BASE:-$HOME/.cache/costeff}/venv-cuda-$KEY"
BUILD="${COSTEFF_CUDA_BUILD_DIR:-$ROOT/build/cuda-ext}"
CMAKE_BUILD="${COSTEFF_CUDA_CMAKE_BUILD_DIR:-$ROOT/build/cmake-cuda}"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-${COSTEFF_VENV_BASE:-$HOME/.cache/costeff}/pip-cache}"

if [ ! -f "$VENV/.complete" ]; then
    echo "[check_cuda] creating $VENV ($TORCH_SPEC, ~5.5 GB)"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --progress-bar off "$TORCH_SPEC"
    "$VENV/bin/pip" install -q --progress-bar off "${EXTRA_PKGS[@]}"
    touch "$VENV/.complete"
fi
"$VENV/bin/python" -c 'import torch, sys; v = torch.version.cuda; print("[check_cuda] torch", torch.__version__, "cuda", v); sys.exit(0 if v else "torch in the CUDA venv is a CPU build")'
[ "${COSTEFF_CUDA_VENV_ONLY:-0}" = "1" ] && exit 0

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
# nvcc comes with this machine image (/usr/local/cuda); it is not pip-installed here.
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "[check_cuda] nvcc not found at $CUDA_HOME/bin/nvcc (set CUDA_HOME, or COSTEFF_SKIP_CUDA_BUILD=1)" >&2; exit 1; }
export COSTEFF_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}" MAX_JOBS="${MAX_JOBS:-2}"
# The toolkit here has no cuBLAS/cuSPARSE headers, which ATen/cuda/CUDAContext.h includes; the wheel's
# nvidia-* dependencies ship them (nvidia/cu13/include). CPATH reaches g++ and nvcc's host preprocessing.
NV_INCLUDE="$("$VENV/bin/python" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13", "include"))')"
[ -f "$NV_INCLUDE/cusparse.h" ] || { echo "[check_cuda] cusparse.h not found under $NV_INCLUDE" >&2; exit 1; }
export CPATH="$NV_INCLUDE${CPATH:+:$CPATH}"
cd "$ROOT"
ls csrc/cuda/*.cu >/dev/null
echo "[check_cuda] building into $BUILD (archs $TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
"$VENV/bin/python" setup.py -q build_ext --build-temp "$BUILD/temp" --build-lib "$BUILD/lib"
SO="$(ls "$BUILD"/lib/costeff/_C*.so)"
"$VENV/bin/python" - "$SO" <<'PY'
import sys
import torch

torch.ops.load_library(sys.argv[1])
missing = []
for op in ("exit_head", "add_layer_norm"):
    for key in ("CPU", "CUDA"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"costeff::{op}", key):
            missing.append(f"costeff::{op} [{key}]")
if missing:
    sys.exit("[check_cuda] no kernel registered for: " + ", ".join(missing))
print("[check_cuda] OK: CUDA kernels registered for costeff::exit_head and costeff::add_layer_norm")
PY

[ "${COSTEFF_CUDA_CMAKE:-1}" = "1" ] || exit 0
# libtorch + CMake with the CUDA kernels. The wheel's CUDA libraries have no unversioned names and the
# local toolkit has no nvrtc, so torch's CMake config is pointed at them explicitly.
NV_LIB="$(dirname "$NV_INCLUDE")/lib"
echo "[check_cuda] CMake build (COSTEFF_WITH_CUDA=ON) + ctest in $CMAKE_BUILD"
"$VENV/bin/cmake" -S "$ROOT" -B "$CMAKE_BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$("$VENV/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
    -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" \
    -DCUDA_nvrtc_LIBRARY="$NV_LIB/libnvrtc.so.13" -DCOSTEFF_WITH_CUDA=ON -DCOSTEFF_BUILD_TESTS=ON
"$VENV/bin/cmake" --build "$CMAKE_BUILD" --parallel "$MAX_JOBS"
"$VENV/bin/ctest" --test-dir "$CMAKE_BUILD" --output-on-failure
echo "[check_cuda] OK: CMake CUDA build and ctest passed"
