#!/usr/bin/env bash
# The chaos run's long form: the 200-cell notebook with many more faults,
# for several seeds, inside a network namespace (root) so packets can be
# dropped, and again on a five-server cluster of namespaces (server
# partitions). Reports land in bench/results/chaos-SEED.json and
# chaos-cluster-SEED.json.
#
#   bash bench/chaos.sh [FAULTS] [SEEDS...]      (default: 30 faults, seeds 1 2 3)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
FAULTS="${1:-30}"
shift || true
SEEDS=("${@:-1 2 3}")
if [ ! -x .venv/bin/python ]; then "${PYTHON:-python3}" -m venv .venv; fi
.venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt -e python-shim
PYO3_PYTHON="$ROOT/.venv/bin/python" cargo build -q -p notebookos-kernel
NETNS=()
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null && command -v tc >/dev/null; then NETNS=(--netns); fi
mkdir -p bench/results
status=0
for seed in ${SEEDS[@]}; do
    .venv/bin/python tests/chaos/run.py --cells 200 --faults "$FAULTS" --seed "$seed" "${NETNS[@]}" \
        --json "bench/results/chaos-$seed.json" 2>"bench/results/chaos-$seed.log" | tail -1 || status=1
    if [ ${#NETNS[@]} -gt 0 ]; then
        .venv/bin/python tests/chaos/run.py --cells 200 --faults "$FAULTS" --seed "$seed" --cluster \
            --json "bench/results/chaos-cluster-$seed.json" 2>"bench/results/chaos-cluster-$seed.log" | tail -1 || status=1
    fi
done
exit $status
