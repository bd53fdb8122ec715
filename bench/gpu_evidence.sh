#!/usr/bin/env bash
# On the GPU host, from the repository root, after bench/device_build.sh has
# staged target/device/ here: installs IPython and jupyter_client from the
# staged wheels into the host's Python and runs bench/gpu_evidence.py.
#   PYTHON=/opt/torch/.venv/bin/python bench/gpu_evidence.sh OUT_DIR
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUTDIR="${1:-$ROOT/test-output/gpu}"
"$PY" -m pip install -q --no-index --find-links "$ROOT/target/device/wheels" \
    ipython comm matplotlib-inline traitlets jupyter_client
export PYTHONPATH="$ROOT/python-shim${PYTHONPATH:+:$PYTHONPATH}"
"$PY" "$ROOT/bench/gpu_evidence.py" --kernel "$ROOT/target/device/notebookos-kernel" --out "$OUTDIR"
