#!/usr/bin/env bash
# On the GPU host, from the repository root, after bench/device_build.sh has
# staged target/device/ here: installs the staged wheels (the shim's
# dependencies, jupyter_client, ipykernel) into the host's Python and runs
# bench/gpu_interactive.py.
#   PYTHON=python3 bench/gpu_interactive.sh OUT_DIR
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUTDIR="${1:-$ROOT/test-output/gpu}"
"$PY" -m pip install -q --no-index --find-links "$ROOT/target/device/wheels" \
    ipython comm matplotlib-inline traitlets jupyter_client cloudpickle ipykernel numpy 2>&1 | tail -3
export PYTHONPATH="$ROOT/python-shim${PYTHONPATH:+:$PYTHONPATH}"
"$PY" "$ROOT/bench/gpu_interactive.py" --kernel "$ROOT/target/device/notebookos-kernel" --out "$OUTDIR"
