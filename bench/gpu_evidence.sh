#!/usr/bin/env bash
# On the GPU host, from the repository root, with target/device/wheels staged
# by bench/device_wheels.sh: installs the notebookos wheel for the host's
# Python (and its dependencies, and ipykernel to compare with) from those
# files, with no Rust and no internet there, then runs bench/gpu_evidence.py.
#   PYTHON=python3 bench/gpu_evidence.sh OUT_DIR
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUTDIR="${1:-$ROOT/test-output/gpu}"
"$PY" -m pip install -q --disable-pip-version-check --no-index --find-links "$ROOT/target/device/wheels" \
    notebookos ipykernel numpy 2>&1 | tail -3
"$PY" "$ROOT/bench/gpu_evidence.py" --out "$OUTDIR"
