#!/usr/bin/env bash
# The whole test suite on a fresh machine: creates/reuses the cached venv (torch 2.13.0 CPU first,
# then the pinned deps), builds costeff in place, runs the C++/CUDA build checks, then pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k exit_head`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$COSTEFF_ROOT"
python -c "import costeff, json; print('[costeff] info:', json.dumps(costeff.info()))"
if [ "${COSTEFF_SKIP_CPP:-0}" != "1" ] && [ -f scripts/check_cpp.sh ]; then
    bash scripts/check_cpp.sh
fi
if [ "${COSTEFF_SKIP_CUDA_BUILD:-0}" != "1" ] && [ -f scripts/check_cuda.sh ]; then
    bash scripts/check_cuda.sh
fi
python -m pytest -q -ra tests "$@"
