#!/usr/bin/env bash
# Stages in target/device/wheels what a GPU host without internet needs to
# run the GPU benchmarks through the wheel: the notebookos wheel for the
# host's Python and the wheels of its dependencies, jupyter_client, nbclient,
# ipykernel (to compare with), numpy, and pytest (for the GPU tests of
# tests/test_statesync.py there).
#   bench/device_wheels.sh [PYTHON_VERSION]     # default 3.12, the H200 host's
# Then, carrying target/device: bench/gpu_interactive.sh or gpu_evidence.sh there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VER="${1:-3.12}"
OUT="$ROOT/target/device/wheels"
rm -rf "$OUT" && mkdir -p "$OUT"
"$ROOT/build-wheels.sh" --out "$OUT" "$VER"
python3 -m pip download -q --disable-pip-version-check --only-binary=:all: \
    --python-version "$VER" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$OUT" \
    ipython cloudpickle comm matplotlib-inline traitlets jupyter_client jupyter_core \
    nbclient nbformat ipykernel numpy pip pytest
du -sh "$OUT"
