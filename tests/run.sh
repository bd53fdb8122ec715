#!/usr/bin/env bash
# The whole test suite, from a fresh clone:
#   cargo fmt --check and clippy -D warnings, Rust unit and integration
#   tests (cargo nextest), the wheel built and installed as users install
#   it (tests/wheel.sh), the Python integration
#   tests through jupyter_client and jupyter_kernel_test (pytest), and
#   ipykernel's own message-spec tests run against notebookos.
# Installs what it needs into ./.venv (PYTHON=... picks the base Python).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"

# Network namespaces for the multi-host tests.
if ! command -v ip >/dev/null 2>&1 || ! command -v tc >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null
    fi
fi

if [ ! -x .venv/bin/python ]; then "$PYTHON" -m venv .venv; fi
.venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt -e python-shim
export PYO3_PYTHON="$ROOT/.venv/bin/python"

command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest
# Style and lints first: they are the cheapest to fail.
if command -v rustup >/dev/null 2>&1; then
    for c in rustfmt clippy; do
        rustup component list --installed | grep -q "^$c" || rustup component add "$c"
    done
fi
cargo fmt --all --check
cargo clippy -q --workspace --all-targets -- -D warnings
cargo build -q -p notebookos-kernel
# Wherever cargo puts it (CARGO_TARGET_DIR may point elsewhere).
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
export NOTEBOOKOS_KERNEL_BIN="${NOTEBOOKOS_KERNEL_BIN:-$TARGET_DIR/debug/notebookos-kernel}"
cargo nextest run --workspace --no-fail-fast
# raft-transport across network namespaces (three "hosts", one cut off).
bash raft-transport/scripts/netns-test.sh
# The wheel as users get it: built, pip-installed with no cargo, run.
PYTHON="$PYTHON" bash tests/wheel.sh

.venv/bin/python -m pytest -q -p no:cacheprovider tests/
PY="$ROOT/.venv/bin/python" bash tests/ipykernel_suite.sh tests/test_message_spec.py tests/test_kernel.py
