#!/usr/bin/env bash
# Builds the notebookos wheel from source for a Python environment, installs
# it there with pip and installs its kernelspec (`python -m notebookos
# install`, the same installer a wheel from PyPI uses).
#
#   ./install.sh                 # python3 on PATH
#   PYTHON=/path/to/venv/bin/python ./install.sh
#   ./install.sh --demo          # then run docs/demo.ipynb through the kernel
#   ./install.sh --uninstall
#   ./install.sh --name python3  # drop-in: notebookos under ipykernel's name
#   ./install.sh --uninstall --name python3   # ipykernel's python3 back
#
# The kernelspec goes to the environment (--sys-prefix) when it is a virtual
# or conda environment, else to the user's Jupyter data directory (--user).
# Building needs cargo; the wheel it leaves in target/wheels installs on
# machines without one.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
NAME="notebookos"

die() { echo "install.sh: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null 2>&1 || die "no Python at PYTHON=$PYTHON"
PY="$("$PYTHON" -c 'import sys; print(sys.executable)')"
IN_VENV="$("$PY" -c 'import sys; print(int(sys.prefix != sys.base_prefix or "CONDA_PREFIX" in __import__("os").environ))')"
if [ "$IN_VENV" = 1 ]; then SCOPE=(--sys-prefix); else SCOPE=(--user); fi

DEMO=0 UNINSTALL=0 SPEC_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --demo) DEMO=1; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --name) NAME="${2:?--name NAME}"; shift 2 ;;
        --display-name) SPEC_ARGS+=(--display-name "${2:?--display-name TEXT}"); shift 2 ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
if [ "$UNINSTALL" = 1 ]; then
    "$PY" -m notebookos uninstall --name "$NAME" "${SCOPE[@]}"
    # The package goes with the last kernelspec that runs it from this
    # Python (asked of its own jupyter_client: `jupyter` on PATH may be another's).
    LEFT="$("$PY" -c 'import sys
from jupyter_client.kernelspec import KernelSpecManager
specs = KernelSpecManager().get_all_specs().values()
print(sum(s["spec"]["argv"][:3] == [sys.executable, "-m", "notebookos"] for s in specs))' 2>/dev/null || echo 0)"
    if [ "$LEFT" = 0 ]; then "$PY" -m pip uninstall -y -q notebookos 2>/dev/null || true; fi
    echo "notebookos ($NAME) uninstalled from $PY"
    exit 0
fi

command -v cargo >/dev/null 2>&1 || die "cargo is needed to build the kernel (https://rustup.rs); without it, pip install a notebookos wheel"

echo "==> Building the notebookos wheel for $PY"
"$ROOT/build-wheels.sh" --out "$ROOT/target/wheels" "$PY"
TAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')"
WHEEL="$(ls -t "$ROOT"/target/wheels/notebookos-*-"$TAG-$TAG"-*.whl | head -1)"

echo "==> pip install $(basename "$WHEEL")"
# Source installs before the wheel put the Python side in as notebookos-shim.
"$PY" -m pip uninstall -q -y notebookos-shim >/dev/null 2>&1 || true
# Reinstalled even at the same version: a source build changes without one.
"$PY" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$WHEEL"
"$PY" -m pip install -q --disable-pip-version-check "$WHEEL"

echo "==> Installing the kernelspec '$NAME' (${SCOPE[*]})"
# It also checks that Jupyter, run from this Python, starts the spec it wrote.
"$PY" -m notebookos install --name "$NAME" "${SPEC_ARGS[@]}" "${SCOPE[@]}"

if [ "$DEMO" = 1 ]; then
    echo "==> Running docs/demo.ipynb through the notebookos kernel (nbclient)"
    "$PY" -m pip install -q --disable-pip-version-check "nbclient>=0.10" "nbformat>=5" numpy
    "$PY" - "$ROOT/docs/demo.ipynb" "$NAME" <<'PY'
import sys

import nbformat
from nbclient import NotebookClient

nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, kernel_name=sys.argv[2], timeout=300).execute()
for cell in nb.cells:
    if cell.cell_type != "code":
        continue
    print(f"In [{cell.execution_count}]: {cell.source.splitlines()[0]}")
    for out in cell.outputs:
        if out.output_type == "stream":
            text = out.text
        elif out.output_type == "error":
            text = f"{out.ename}: {out.evalue}"
        else:
            text = out.get("data", {}).get("text/plain", "")
        for line in str(text).rstrip().splitlines():
            print(f"    {line}")
verdicts = [o.text for c in nb.cells if c.cell_type == "code" and "%notebookos verify" in c.source
            for o in c.outputs if o.output_type == "stream"]
if not verdicts or not verdicts[0].startswith("all 3 replicas hold the same namespace"):
    sys.exit(f"demo: the replicas do not agree: {verdicts}")
print("demo: all cells ran; all 3 replicas hold the same namespace")
PY
fi
