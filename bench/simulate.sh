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

# The election's cost is a Raft commit among 3 replicas: measure it here.
target/release/examples/bench --samples 1000 --entries 1000 --blob-mib 1 > "$OUT/raft_bench.txt"
COMMIT_US="$(.venv/bin/python - "$OUT/raft_bench.txt" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
m = re.search(r"commit latency, 100-byte entry, 3 voters .*?median ([0-9.]+)(µs|us|ms|s)\b", text)
if not m:
    sys.exit("no 3-voter commit median in the raft-transport bench output")
value, unit = float(m.group(1)), m.group(2)
print(round(value * {"µs": 1, "us": 1, "ms": 1e3, "s": 1e6}[unit]))
PY
)"
echo "measured Raft commit (3 voters, median): ${COMMIT_US} µs"

run() { # name, then simulate's arguments
    local name="$1"; shift
    local start end
    start=$(date +%s.%N)
    "$BIN" simulate "$@" --seed "$SEED" --commit-us "$COMMIT_US" --out "$OUT/$name" | tee "$OUT/$name.md"
    end=$(date +%s.%N)
    python3 -c "print(f'$name: simulated in {$end - $start:.2f} s wall')" | tee -a "$OUT/$name.md"
    echo
}

if [ -f "$TRACES/adobe_sensei_june_1-2_2021_sessions.json" ]; then
    run session-trace --trace "$TRACES/adobe_sensei_june_1-2_2021_sessions.json"
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
