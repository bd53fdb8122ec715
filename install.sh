#!/usr/bin/env bash
# Builds notebookos against a Python environment and installs its kernelspec.
#
#   ./install.sh                 # python3 on PATH
#   PYTHON=/path/to/venv/bin/python ./install.sh
#   ./install.sh --demo          # then run docs/demo.ipynb through the kernel
#   ./install.sh --uninstall
#   ./install.sh --name python3  # drop-in: notebookos under ipykernel's name
#   ./install.sh --uninstall --name python3   # ipykernel's python3 back
#
# Installs into that environment: the python-shim package (with IPython,
# comm, matplotlib-inline) and jupyter_client/jupyter_core for the
# kernelspec tooling. The kernelspec goes to the environment
# (--sys-prefix) when it is a virtual environment, else to the user's
# Jupyter data directory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
NAME="notebookos"
PROFILE="${NOTEBOOKOS_PROFILE:-release}"

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
    "$ROOT/kernelspec/install.sh" --uninstall --python "$PY" --name "$NAME" "${SCOPE[@]}"
    # The shim goes with the last kernelspec that runs notebookos.
    LEFT="$("$PY" -m jupyter kernelspec list --json 2>/dev/null | "$PY" -c 'import json, sys
specs = json.load(sys.stdin)["kernelspecs"].values()
print(sum(s["spec"]["argv"][0].endswith("notebookos-kernel") for s in specs))' 2>/dev/null || echo 0)"
    if [ "$LEFT" = 0 ]; then "$PY" -m pip uninstall -y -q notebookos-shim 2>/dev/null || true; fi
    echo "notebookos ($NAME) uninstalled from $PY"
    exit 0
fi

command -v cargo >/dev/null 2>&1 || die "cargo is needed to build the kernel (https://rustup.rs)"
[ "$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("Py_ENABLE_SHARED") or 0)')" = 1 ] ||
    echo "install.sh: note: $PY has no shared libpython; linking it statically" >&2

echo "==> Python packages into $PY"
"$PY" -m pip install -q --disable-pip-version-check "$ROOT/python-shim" "jupyter_client>=8" "jupyter_core>=5"

echo "==> Building notebookos-kernel ($PROFILE) against $PY"
if [ "$PROFILE" = release ]; then CARGO_PROFILE=(--release); else CARGO_PROFILE=(); fi
(cd "$ROOT" && PYO3_PYTHON="$PY" cargo build -q "${CARGO_PROFILE[@]}" -p notebookos-kernel)
TARGET_DIR="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
if [ "$PROFILE" = release ]; then BIN="$TARGET_DIR/release/notebookos-kernel"; else BIN="$TARGET_DIR/debug/notebookos-kernel"; fi

echo "==> Installing the kernelspec '$NAME' (${SCOPE[*]})"
"$ROOT/kernelspec/install.sh" --bin "$BIN" --python "$PY" --name "$NAME" "${SPEC_ARGS[@]}" "${SCOPE[@]}"
"$PY" -m jupyter kernelspec list | grep -E "^\s+$NAME\s" || die "kernelspec not listed"

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
