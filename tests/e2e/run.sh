#!/usr/bin/env bash
# JupyterLab and Notebook 7 in a real browser against the notebookos kernel.
#
#   tests/e2e/run.sh        # tests/test_frontends.py runs it; it also runs alone
#
# Starts JupyterLab on 127.0.0.1 with a random token and a private Jupyter
# configuration whose only extra kernelspec is notebookos (installed by
# `python -m notebookos install`, as users do), drives Debian's
# Chromium through playwright-core (jupyterlab.mjs), and leaves screenshots,
# results.json and the server's log in test-output/e2e/. Exits non-zero if
# a step failed. Everything it starts is stopped on exit, failed or not.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
KERNEL_BIN="${NOTEBOOKOS_KERNEL_BIN:-$ROOT/target/debug/notebookos-kernel}"
OUT="${E2E_OUT:-$ROOT/test-output/e2e}"
CHROMIUM=/usr/bin/chromium

die() { echo "e2e: $*" >&2; exit 1; }
[ -x "$KERNEL_BIN" ] || die "kernel binary not built: $KERNEL_BIN"

if [ ! -x "$CHROMIUM" ]; then
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || die "needs Debian's chromium ($CHROMIUM)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# JupyterLab, Notebook 7, papermill and nbconvert are pinned with the rest.
"$PY" -m pip install -q --disable-pip-version-check -r "$ROOT/tests/requirements.txt"
# Only playwright-core, the driver without browsers: it launches $CHROMIUM.
(cd "$HERE" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)

rm -rf "$OUT" && mkdir -p "$OUT"
WORK="$(mktemp -d -t notebookos-e2e.XXXXXX)"
SERVER=""
cleanup() {
    if [ -n "$SERVER" ] && kill -0 "$SERVER" 2>/dev/null; then
        # SIGTERM makes the server shut its kernels down first.
        kill -TERM "$SERVER" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$SERVER" 2>/dev/null || true
    fi
    # Whatever outlived that (kernels, browser) names $WORK on its command line.
    for pid in $(pgrep -f "$WORK" || true); do kill -KILL "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

export JUPYTER_CONFIG_DIR="$WORK/config" JUPYTER_DATA_DIR="$WORK/data"
export JUPYTER_RUNTIME_DIR="$WORK/runtime" IPYTHONDIR="$WORK/ipython"
export JUPYTER_PATH="$WORK/share/jupyter"
# The spec's launcher runs this binary in place of a wheel's.
export NOTEBOOKOS_KERNEL_BIN="$KERNEL_BIN"
mkdir -p "$JUPYTER_CONFIG_DIR/labconfig" "$WORK/notebooks"
"$PY" -m notebookos install --prefix "$WORK" >/dev/null
# Only loopback traffic: no news feed (its prompt would also cover the
# page) and, above, an extension manager that does not search PyPI.
echo '{"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": true}}' \
    > "$JUPYTER_CONFIG_DIR/labconfig/page_config.json"
cp "$HERE/frontends.ipynb" "$WORK/notebooks/"

TOKEN="$("$PY" -c 'import secrets; print(secrets.token_hex(24))')"
PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$PY" -m jupyter lab --no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port="$PORT" \
    --ServerApp.port_retries=0 --IdentityProvider.token="$TOKEN" \
    --ServerApp.root_dir="$WORK/notebooks" --ServerApp.allow_root=True \
    --LabApp.extension_manager=readonly --LabApp.expose_app_in_browser=True \
    --JupyterNotebookApp.expose_app_in_browser=True >"$OUT/jupyterlab.log" 2>&1 &
SERVER=$!

URL="http://127.0.0.1:$PORT"
for _ in $(seq 240); do
    curl -sf -o /dev/null -H "Authorization: token $TOKEN" "$URL/api/status" && break
    kill -0 "$SERVER" 2>/dev/null || die "jupyter lab exited; see $OUT/jupyterlab.log"
    sleep 0.5
done
curl -sf -o /dev/null -H "Authorization: token $TOKEN" "$URL/api/status" || die "jupyter lab did not answer"

JUPYTER_URL="$URL" JUPYTER_TOKEN="$TOKEN" E2E_OUT="$OUT" CHROMIUM="$CHROMIUM" \
    E2E_PROFILE="$WORK/chromium-profile" NOTEBOOK="$HERE/frontends.ipynb" \
    node "$HERE/jupyterlab.mjs"
