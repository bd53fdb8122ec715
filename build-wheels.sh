#!/usr/bin/env bash
# Builds notebookos wheels: manylinux_2_28 x86_64, one per CPython, each
# with the kernel built as an extension module for that Python (maturin,
# with zig as the linker so that it needs nothing newer than glibc 2.28).
#
#   ./build-wheels.sh [--out DIR] [PYTHON ...]
#
# PYTHON is an interpreter path or a version (3.12); with none, every
# CPython 3.10-3.13 found (on PATH or under pyenv) gets one. Wheels land in
# DIR (default target/wheels). The build tools (maturin, ziglang) come from
# PyPI into target/wheel-tools; no Python headers or libpython copies are
# needed beyond the interpreters themselves.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$ROOT/target/wheels"
TOOLS="$ROOT/target/wheel-tools"
die() { echo "build-wheels.sh: $*" >&2; exit 1; }

PYTHONS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d'; exit 0 ;;
        *) PYTHONS+=("$1"); shift ;;
    esac
done

# An interpreter for a version: python3.X on PATH, else pyenv's newest 3.X.
find_python() {
    local v="$1" p
    p="$(command -v "python$v" 2>/dev/null || true)"
    # pyenv's shims exist for every version but run only the selected ones.
    if [ -n "$p" ] && ! "$p" -c pass 2>/dev/null; then p=""; fi
    if [ -z "$p" ] && [ -d "${PYENV_ROOT:-$HOME/.pyenv}/versions" ]; then
        p="$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$v".*/bin/python"$v" 2>/dev/null | sort -V | tail -1)"
    fi
    echo "$p"
}
if [ ${#PYTHONS[@]} = 0 ]; then
    for v in 3.10 3.11 3.12 3.13; do
        p="$(find_python "$v")"
        if [ -n "$p" ]; then PYTHONS+=("$p"); else echo "build-wheels.sh: no CPython $v here; no wheel for it" >&2; fi
    done
fi
[ ${#PYTHONS[@]} -gt 0 ] || die "no Python to build for"

if [ ! -x "$TOOLS/bin/maturin" ] || [ ! -d "$TOOLS/lib" ] || ! "$TOOLS/bin/python" -c 'import ziglang' 2>/dev/null; then
    python3 -m venv "$TOOLS"
    "$TOOLS/bin/pip" install -q --disable-pip-version-check "maturin==1.16.0" "ziglang==0.17.1"
fi

mkdir -p "$OUT"
for p in "${PYTHONS[@]}"; do
    case "$p" in 3.*) v="$p"; p="$(find_python "$v")"; [ -n "$p" ] || die "no CPython $v here" ;; esac
    [ -x "$p" ] || die "no Python at $p"
    echo "==> wheel for $("$p" -c 'import sys; print(sys.version.split()[0])') ($p)"
    (cd "$ROOT" && PATH="$TOOLS/bin:$PATH" maturin build --quiet --release --zig \
        --compatibility manylinux_2_28 --interpreter "$p" --out "$OUT")
done
ls -l "$OUT"/*.whl
