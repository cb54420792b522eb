#!/usr/bin/env bash
# The main job on a fresh machine: sets up the cached venv, builds costeff, then runs the COST-EFF
# pipeline (demo preset: MiniLM-L6 + Rotten Tomatoes, 15-45 minutes on 2 CPU cores) and prints
# the Pareto table and the path of the plot. Extra arguments go to `costeff pipeline`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$COSTEFF_ROOT"
python -m costeff.cli pipeline --preset demo --output "${COSTEFF_RUN_DIR:-$COSTEFF_ROOT/runs/demo}" --threads "${COSTEFF_THREADS:-2}" "$@"
