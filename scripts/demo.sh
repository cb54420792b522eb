#!/usr/bin/env bash
# The main job on a fresh machine: sets up the cached venv, builds costeff, runs the demo.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$COSTEFF_ROOT"
python -m costeff.demo "$@"
