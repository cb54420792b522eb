# Sourced by scripts/demo.sh and scripts/test.sh: makes (once) and activates a venv cached outside
# the checkout, keyed by the requirement files, then builds costeff in place.
set -euo pipefail
COSTEFF_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_BASE="${COSTEFF_VENV_BASE:-$HOME/.cache/costeff}"
REQ_KEY="$(cat "$COSTEFF_ROOT"/requirements/torch.txt "$COSTEFF_ROOT"/requirements/dev.txt "$COSTEFF_ROOT"/requirements/nodeps.txt "$COSTEFF_ROOT"/requirements/onnx.txt | sha256sum | cut -c1-12)"
VENV="$VENV_BASE/venv-$REQ_KEY"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$VENV_BASE/pip-cache}"
if [ ! -f "$VENV/.complete" ]; then
    echo "[costeff] creating venv $VENV"
    rm -rf "$VENV"
    mkdir -p "$VENV_BASE"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --progress-bar off --upgrade pip
    # torch first and alone: a bare torch requirement elsewhere could pull a multi-GB CUDA build.
    "$VENV/bin/pip" install -q --progress-bar off -r "$COSTEFF_ROOT/requirements/torch.txt"
    "$VENV/bin/pip" install -q --progress-bar off -r "$COSTEFF_ROOT/requirements/dev.txt"
    "$VENV/bin/pip" install -q --progress-bar off --no-deps -r "$COSTEFF_ROOT/requirements/nodeps.txt"
    "$VENV/bin/pip" install -q --progress-bar off -r "$COSTEFF_ROOT/requirements/onnx.txt"
    touch "$VENV/.complete"
fi
# The server stack, added to an existing venv without rebuilding it (keyed by its own file).
SERVE_KEY="$(sha256sum "$COSTEFF_ROOT/requirements/serve.txt" | cut -c1-12)"
if [ ! -f "$VENV/.serve-$SERVE_KEY" ]; then
    "$VENV/bin/pip" install -q --progress-bar off -r "$COSTEFF_ROOT/requirements/serve.txt"
    touch "$VENV/.serve-$SERVE_KEY"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export MAX_JOBS="${MAX_JOBS:-2}"
if [ "${COSTEFF_SKIP_BUILD:-0}" != "1" ]; then
    echo "[costeff] building the extension (pip install --no-build-isolation -e .)"
    (cd "$COSTEFF_ROOT" && pip install -q --no-build-isolation --no-deps -e .)
fi
