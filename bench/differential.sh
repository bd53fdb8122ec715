#!/usr/bin/env bash
# Every notebook of the differential corpus (tests/differential.py) through
# ipykernel and notebookos (3 replicas; cells on replica 1, then on a peer),
# every output compared; the report goes to bench/results/differential.json.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then "${PYTHON:-python3}" -m venv .venv; fi
.venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt -e python-shim
PYO3_PYTHON="$ROOT/.venv/bin/python" cargo build -q -p notebookos-kernel
mkdir -p bench/results
.venv/bin/python tests/differential.py --json bench/results/differential.json "$@"
