#!/usr/bin/env bash
# Benchmarks (timings live here, never in tests). Builds the release kernel
# and compares it with ipykernel on this machine, in one run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then "${PYTHON:-python3}" -m venv .venv; fi
.venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt -e python-shim
PYO3_PYTHON="$ROOT/.venv/bin/python" cargo build -q --release -p notebookos-kernel

SPECS="$(mktemp -d)"
trap 'rm -rf "$SPECS"' EXIT
mkdir -p "$SPECS/kernels/notebookos" "$SPECS/kernels/notebookos-signal" "$SPECS/kernels/notebookos-single" "$SPECS/kernels/python3"
cat > "$SPECS/kernels/notebookos/kernel.json" <<JSON
{"argv": ["$ROOT/target/release/notebookos-kernel", "-f", "{connection_file}"],
 "display_name": "notebookos", "language": "python", "interrupt_mode": "message",
 "env": {"NOTEBOOKOS_PYTHON": "$ROOT/.venv/bin/python"}}
JSON
sed 's/"message"/"signal"/' "$SPECS/kernels/notebookos/kernel.json" > "$SPECS/kernels/notebookos-signal/kernel.json"
sed 's/"env": {/"env": {"NOTEBOOKOS_REPLICAS": "1", /' "$SPECS/kernels/notebookos/kernel.json" > "$SPECS/kernels/notebookos-single/kernel.json"
cat > "$SPECS/kernels/python3/kernel.json" <<JSON
{"argv": ["$ROOT/.venv/bin/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
 "display_name": "ipykernel", "language": "python"}
JSON
mkdir -p bench/results
export JUPYTER_PATH="$SPECS" IPYTHONDIR="$SPECS/ipython"
# BENCHES picks some (default: all), e.g. BENCHES=interactive bash bench/run.sh
BENCHES="${BENCHES:-kernel_vs_ipykernel interactive replica_sync long_session}"
for b in $BENCHES; do
    case "$b" in
        # Message round trips against ipykernel.
        kernel_vs_ipykernel) .venv/bin/python bench/kernel_vs_ipykernel.py --json bench/results/kernel_vs_ipykernel.json "$@" ;;
        # Realistic cells: time to idle and to full replication, and memory.
        interactive) .venv/bin/python bench/interactive.py --json bench/results/interactive.json ;;
        # Time until all replicas hold a 1 GiB array a cell created.
        replica_sync) .venv/bin/python bench/replica_sync.py --json bench/results/replica_sync.json ;;
        # Memory over a 10,000-cell session, and a late joiner's catch-up.
        long_session) .venv/bin/python bench/long_session.py --json bench/results/long_session.json ;;
        *) echo "unknown bench: $b" >&2; exit 2 ;;
    esac
done
