#!/usr/bin/env bash
# Runs ipykernel's own tests, unmodified, against notebookos: the sdist's
# tests start the kernel named "python3", so that name is registered, in a
# private JUPYTER_PATH, as notebookos.
#
#   bash tests/ipykernel_suite.sh [PYTEST ARGS...]   (default: the message-spec tests)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
BIN="${NOTEBOOKOS_KERNEL_BIN:-$ROOT/target/debug/notebookos-kernel}"
VERSION=7.4.0
CACHE="$ROOT/target/ipykernel-sdist"

mkdir -p "$CACHE"
SDIST="$CACHE/ipykernel-$VERSION.tar.gz"
[ -f "$SDIST" ] || "$PY" -m pip download -q --no-deps --no-binary=ipykernel "ipykernel==$VERSION" -d "$CACHE"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
tar xzf "$SDIST" -C "$WORK"
SRC="$WORK/ipykernel-$VERSION"
mkdir -p "$WORK/jupyter/kernels/python3"
cat > "$WORK/jupyter/kernels/python3/kernel.json" <<JSON
{"argv": ["$BIN", "-f", "{connection_file}"], "display_name": "notebookos as python3",
 "language": "python", "interrupt_mode": "message", "env": {"NOTEBOOKOS_PYTHON": "$PY"}}
JSON
cd "$SRC"
JUPYTER_PATH="$WORK/jupyter" IPYTHONDIR="$WORK/ipython" \
    "$PY" -m pytest -c /dev/null --rootdir "$SRC" -p no:cacheprovider -q "${@:-tests/test_message_spec.py}"
