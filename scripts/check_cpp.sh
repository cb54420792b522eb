#!/usr/bin/env bash
# libtorch (CMake) build of costeff_ops + the C++ test under ctest, then a kernels-only nvcc compile
# of every csrc/cuda/*.cu for sm_80 and sm_90. Uses the torch of the active Python environment.
#   COSTEFF_BUILD_DIR  build directory (default: <repo>/build/cmake)
#   CMAKE_BUILD_PARALLEL_LEVEL  build jobs (default 2)
#   COSTEFF_SKIP_NVCC=1  skip the nvcc step (a machine without the CUDA toolkit)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${COSTEFF_BUILD_DIR:-$ROOT/build/cmake}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
PY="${PYTHON:-python}"
TORCH_PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
NVCC="${CUDACXX:-${CUDA_HOME:-/usr/local/cuda}/bin/nvcc}"

echo "[check_cpp] torch cmake prefix: $TORCH_PREFIX"
echo "[check_cpp] 1/2 libtorch build + ctest in $BUILD"
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
    -DCOSTEFF_BUILD_TESTS=ON -DCOSTEFF_WITH_CUDA=OFF -DCOSTEFF_CUDA_OBJECTS_ONLY=OFF
cmake --build "$BUILD"
ctest --test-dir "$BUILD" --output-on-failure

if [ "${COSTEFF_SKIP_NVCC:-0}" = "1" ]; then
    echo "[check_cpp] COSTEFF_SKIP_NVCC=1: skipping the nvcc kernels-only compile"
    exit 0
fi
[ -x "$NVCC" ] || { echo "[check_cpp] nvcc not found at $NVCC (set CUDA_HOME or COSTEFF_SKIP_NVCC=1)" >&2; exit 1; }
echo "[check_cpp] 2/2 nvcc kernels-only compile of csrc/cuda/*.cu for sm_80, sm_90 ($("$NVCC" --version | tail -1))"
# A separate build dir: enabling CUDA changes the project's languages.
cmake -S "$ROOT" -B "$BUILD-cuda-objects" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
    -DCMAKE_CUDA_COMPILER="$NVCC" -DCOSTEFF_CUDA_OBJECTS_ONLY=ON -DCOSTEFF_BUILD_TESTS=OFF
cmake --build "$BUILD-cuda-objects" --target costeff_cuda_kernels
objects=$(find "$BUILD-cuda-objects" -name '*.cu.o' | wc -l)
sources=$(ls "$ROOT"/csrc/cuda/*.cu | wc -l)
[ "$objects" -eq "$sources" ] || { echo "[check_cpp] expected $sources CUDA objects, found $objects" >&2; exit 1; }
echo "[check_cpp] OK: ctest passed, $objects CUDA objects compiled for sm_80 and sm_90"
