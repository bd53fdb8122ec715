#!/usr/bin/env bash
# Trace-driven evaluation (timings live here, never in tests): replays the
# workload traces through the cluster policy and the baselines, writes the
# tables, CSVs and PNG plots to bench/results/sim/ (or $1).
#
#   bash bench/simulate.sh [OUT_DIR]
#
# The traces are read where they are: $NOTEBOOKOS_TRACES, default
# ../shared/traces next to the checkout. Absent traces are skipped, said so.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-bench/results/sim}"
TRACES="${NOTEBOOKOS_TRACES:-$ROOT/../shared/traces}"
SEED="${SEED:-1}"
mkdir -p "$OUT"
if [ ! -x .venv/bin/python ]; then "${PYTHON:-python3}" -m venv .venv; fi
.venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt -e python-shim
PYO3_PYTHON="$ROOT/.venv/bin/python" cargo build -q --release -p notebookos-kernel
cargo build -q --release -p raft-transport --example bench
BIN=target/release/notebookos-kernel

# The election's cost is a Raft commit among 3 replicas: measured here, in
# this run. Every other cost comes from the newest live bench results
# (bench/calibrate.py says which, and their dates).
target/release/examples/bench --samples 1000 --entries 1000 --blob-mib 1 > "$OUT/raft_bench.txt"
.venv/bin/python bench/calibrate.py --raft "$OUT/raft_bench.txt" --out "$OUT/calibration.json"
echo

run() { # name, then simulate's arguments
    local name="$1"; shift
    local start end
    start=$(date +%s.%N)
    "$BIN" simulate "$@" --seed "$SEED" --calibration "$OUT/calibration.json" --out "$OUT/$name" | tee "$OUT/$name.md"
    end=$(date +%s.%N)
    python3 -c "print(f'$name: simulated in {$end - $start:.2f} s wall')" | tee -a "$OUT/$name.md"
    echo
}

if [ -f "$TRACES/adobe_sensei_june_1-2_2021_sessions.json" ]; then
    run session-trace --trace "$TRACES/adobe_sensei_june_1-2_2021_sessions.json"
    # The NotebookOS paper's headline window: the busiest 17.5 hours.
    run window-17.5h --trace "$TRACES/adobe_sensei_june_1-2_2021_sessions.json" --window-hours 17.5
else
    echo "SKIPPED: $TRACES/adobe_sensei_june_1-2_2021_sessions.json is absent"
fi
if [ -f "$TRACES/sensei_june_60sec.csv" ]; then
    run events-csv --csv "$TRACES/sensei_june_60sec.csv"
else
    echo "SKIPPED: $TRACES/sensei_june_60sec.csv is absent"
fi
run synthetic --synthetic 2000

.venv/bin/python bench/sim_plots.py "$OUT"/*/
