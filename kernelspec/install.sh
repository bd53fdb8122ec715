#!/usr/bin/env bash
# Installs (or removes) the kernelspec for a built notebookos-kernel binary.
#
#   kernelspec/install.sh --bin BIN --python PY [--name NAME] [--display-name TEXT] SCOPE
#   kernelspec/install.sh --uninstall --python PY [--name NAME] SCOPE
#
# SCOPE is one of --user, --sys-prefix or --prefix DIR, as for
# `jupyter kernelspec install`. NAME defaults to notebookos; `python3` makes
# notebookos the kernel that nbclient, papermill, VS Code and notebooks
# saved with ipykernel pick by default. Removing a `python3` spec puts
# ipykernel's back (`python -m ipykernel install`) when ipykernel is installed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() { echo "kernelspec/install.sh: $*" >&2; exit 1; }

BIN="" PY="" NAME="notebookos" DISPLAY="Python 3 (notebookos)" UNINSTALL=0 SCOPE=()
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN="$2"; shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        --name) NAME="$2"; shift 2 ;;
        --display-name) DISPLAY="$2"; shift 2 ;;
        --uninstall) UNINSTALL=1; shift ;;
        --user|--sys-prefix) SCOPE=("$1"); shift ;;
        --prefix) SCOPE=(--prefix "$2"); shift 2 ;;
        *) die "unknown option $1" ;;
    esac
done
[ -n "$PY" ] || die "--python PY is needed"
[ ${#SCOPE[@]} -gt 0 ] || die "one of --user, --sys-prefix, --prefix DIR is needed"
[[ "$NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "kernel names are letters, digits, '.', '_' and '-': $NAME"

if [ "$UNINSTALL" = 1 ]; then
    "$PY" -m jupyter kernelspec remove -y "$NAME" >/dev/null 2>&1 || true
    if [ "$NAME" = python3 ] && "$PY" -c 'import ipykernel' 2>/dev/null; then
        "$PY" -m ipykernel install --name python3 "${SCOPE[@]}" >/dev/null
        echo "kernelspec python3 is ipykernel's again"
    else
        echo "kernelspec $NAME removed"
    fi
    exit 0
fi

[ -x "$BIN" ] || die "no kernel binary at --bin $BIN"
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
cp "$HERE"/logo-*.png "$STAGE/"
cp "$BIN" "$STAGE/notebookos-kernel"
echo '{}' > "$STAGE/kernel.json"
DEST="$("$PY" -m jupyter kernelspec install --replace --name "$NAME" "${SCOPE[@]}" "$STAGE" 2>&1 |
        sed -n 's/.*Installed kernelspec [^ ]* in //p')"
[ -n "$DEST" ] && [ -d "$DEST" ] || die "jupyter kernelspec install did not report where it installed"
# The kernel runs from its own copy in the kernelspec, so the build tree
# can go away; its path must be absolute for every front-end.
"$PY" - "$HERE/kernel.json.in" "$DEST" "$PY" "$DISPLAY" <<'PY'
import json, os, sys
template, dest, python, display = sys.argv[1:]
text = open(template).read().replace("@KERNEL_BIN@", os.path.join(dest, "notebookos-kernel"))
spec = json.loads(text.replace("@PYTHON@", python))
spec["display_name"] = display
with open(os.path.join(dest, "kernel.json"), "w") as f:
    json.dump(spec, f, indent=2)
PY
chmod 0755 "$DEST/notebookos-kernel"
# A spec of the same name earlier on Jupyter's path (say ipykernel's python3
# in the user's directory) would still win: say so rather than install
# something no client starts.
FOUND="$("$PY" -m jupyter kernelspec list --json | "$PY" -c \
    'import json,sys; print(json.load(sys.stdin)["kernelspecs"].get(sys.argv[1], {}).get("resource_dir", ""))' "$NAME")"
[ "$(cd "$FOUND" 2>/dev/null && pwd -P)" = "$(cd "$DEST" && pwd -P)" ] ||
    die "installed in $DEST, but Jupyter starts '$NAME' from ${FOUND:-nowhere}; remove that one or install with --user"
echo "installed: $DEST"
