#!/usr/bin/env bash
# The wheel route as a user takes it: builds the wheel for this machine's
# Python (build-wheels.sh), installs it with pip into a fresh venv with no
# cargo on PATH, installs the kernelspec with `python -m notebookos install
# --sys-prefix`, runs docs/demo.ipynb through `jupyter execute
# --kernel_name=notebookos` (3 replicas) and a notebook that checks the
# kernel's environment (and, where a GPU and torch are, a %%gpus cell),
# checks their outputs, and uninstalls.
#   PYTHON=/path/to/python bash tests/wheel.sh
# On a host without Rust or internet (the GPU host): a wheel built
# elsewhere, the dependencies' wheels beside it, installed into the host's
# own environment (the one with torch) instead of a fresh venv:
#   NOTEBOOKOS_WHEEL=W PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR \
#     INTO_PYTHON=/path/to/env/bin/python bash tests/wheel.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')"
WORK="$(mktemp -d /tmp/notebookos-wheel.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
PASSED=0 FAILED=0
check() {
    local name="$1"; shift
    if "$@"; then PASSED=$((PASSED + 1)); echo "ok: $name"
    else FAILED=$((FAILED + 1)); echo "FAILED: $name"; fi
}

TAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')"
if [ -n "${NOTEBOOKOS_WHEEL:-}" ]; then
    mkdir -p "$WORK/dist" && cp "$NOTEBOOKOS_WHEEL" "$WORK/dist/"
else
    "$ROOT/build-wheels.sh" --out "$WORK/dist" "$PY" >"$WORK/build.log" 2>&1 || {
        tail -40 "$WORK/build.log"; echo "wheel.sh: 0 passed, 1 failed (the wheel did not build)"; exit 1; }
fi
WHEEL="$(ls "$WORK/dist"/notebookos-*-"$TAG-$TAG"-manylinux_2_28_x86_64.whl 2>/dev/null | head -1)"
check "a $TAG manylinux_2_28 wheel is there" test -n "$WHEEL"
[ -n "$WHEEL" ] || { echo "wheel.sh: $PASSED passed, $FAILED failed"; exit 1; }

# What the kernel module asks of the installing host: glibc 2.28 at most,
# no path of this machine's, and no libpython (it runs inside the Python
# that imports it).
"$PY" -m zipfile -e "$WHEEL" "$WORK/unpacked"
BIN="$(find "$WORK/unpacked" -path '*/notebookos/_kernel*.so' -type f)"
check "the wheel carries the kernel as notebookos's extension module" test -n "$BIN"
glibc_at_most_2_28() {
    local newest
    newest="$(objdump -T "$BIN" | grep -o 'GLIBC_[0-9.]*' | sort -V | tail -1)"
    echo "   newest glibc symbol: $newest"
    [ "$(printf '%s\n' "$newest" GLIBC_2.28 | sort -V | tail -1)" = GLIBC_2.28 ]
}
if command -v objdump >/dev/null && command -v readelf >/dev/null; then
    check "the module needs glibc 2.28 at most" glibc_at_most_2_28
    check "the module carries no rpath and links no libpython" \
        bash -c "! readelf -d '$BIN' | grep -qE 'RPATH|RUNPATH|libpython'"
else
    echo "(no binutils here: the module's glibc versions and rpath are not checked)"
fi

# A fresh environment (or the one named) on a PATH without cargo, as on a GPU host.
if [ -n "${INTO_PYTHON:-}" ]; then
    VPY="$INTO_PYTHON"
else
    "$PY" -m venv "$WORK/venv"
    VPY="$WORK/venv/bin/python"
fi
VPREFIX="$("$VPY" -c 'import sys; print(sys.prefix)')"
VBIN="$(dirname "$VPY")"
CLEAN_PATH="$VBIN:/usr/local/bin:/usr/bin:/bin"
run_clean() {
    env -u NOTEBOOKOS_KERNEL_BIN -u JUPYTER_PATH -u JUPYTER_CONFIG_DIR -u VIRTUAL_ENV -u PYTHONPATH \
        PATH="$CLEAN_PATH" JUPYTER_DATA_DIR="$WORK/data" JUPYTER_RUNTIME_DIR="$WORK/runtime" \
        IPYTHONDIR="$WORK/ipython" NOTEBOOKOS_STATE_DIR="$WORK/state" "$@"
}
check "no cargo on the install PATH" bash -c "! PATH='$CLEAN_PATH' command -v cargo"
START=$(date +%s%N)
run_clean "$VPY" -m pip install -q --disable-pip-version-check "$WHEEL" "nbclient>=0.10" numpy \
    >"$WORK/pip.log" 2>&1 || cat "$WORK/pip.log"
INSTALL_MS=$((($(date +%s%N) - START) / 1000000))
# (notebookos_shim imports the module that only the running kernel has.)
check "pip installs the wheel" run_clean "$VPY" -c \
    'import importlib.util, notebookos; assert importlib.util.find_spec("notebookos_shim")'

run_clean "$VPY" -m notebookos install --sys-prefix
SPEC="$VPREFIX/share/jupyter/kernels/notebookos/kernel.json"
spec_runs_this_python() {
    "$VPY" - "$SPEC" "$VPY" <<'PY'
import json, sys
spec = json.load(open(sys.argv[1]))
assert spec["argv"][:3] == [sys.argv[2], "-m", "notebookos"], spec["argv"]
assert spec["interrupt_mode"] == "message", spec
PY
}
check "python -m notebookos install --sys-prefix writes a spec for this Python" spec_runs_this_python

# The demo, and a notebook that looks at the kernel's own environment: the
# user's LD_LIBRARY_PATH, not the launcher's, and this venv as sys.prefix.
# A notebook in $WORK whose code cells are the arguments after its name.
notebook() {
    "$VPY" - "$WORK/$1" "${@:2}" <<'PY'
import sys
import nbformat
nb = nbformat.v4.new_notebook()
nb.cells = [nbformat.v4.new_code_cell(source) for source in sys.argv[2:]]
nbformat.write(nb, sys.argv[1])
PY
}
cp "$ROOT/docs/demo.ipynb" "$WORK/demo.ipynb"
# A set of strings: replicas agree on it only if they hash strings alike.
notebook env.ipynb "import os, sys
names = {str(i) for i in range(100)}
print('prefix', sys.prefix)
print('ld', os.environ.get('LD_LIBRARY_PATH'))" '!echo "shell ld $LD_LIBRARY_PATH"' '%notebookos verify'
# The user's own LD_LIBRARY_PATH (a GPU host may need its own entries too).
USER_LD="/opt/user-libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Runs a notebook in $WORK with the jupyter of the environment whose bin/ is $2 (default this one).
executes() {
    run_clean env LD_LIBRARY_PATH="$USER_LD" "${2:-$VBIN}/jupyter" execute \
        --kernel_name=notebookos --inplace "$WORK/$1" >"$WORK/$1.log" 2>&1 || {
        cat "$WORK/$1.log"; return 1; }
}
check "jupyter execute runs the demo notebook" executes demo.ipynb
check "jupyter execute runs the environment notebook" executes env.ipynb
outputs() {
    "$VPY" - "$WORK/$1" <<'PY'
import sys
import nbformat
for cell in nbformat.read(sys.argv[1], as_version=4).cells:
    for out in cell.get("outputs", []):
        text = out.get("text") or out.get("data", {}).get("text/plain") or out.get("evalue", "")
        # `!command` output comes through a pty, with its carriage returns.
        print(text.replace("\r\n", "\n"))
PY
}
demo_outputs_right() {
    local text; text="$(outputs demo.ipynb)"
    grep -q "Hello from CPython $("$VPY" -c 'import platform; print(platform.python_version())')" <<<"$text" &&
        grep -qx 285 <<<"$text" && grep -q "notebookos: 3 replicas" <<<"$text" &&
        grep -q "all 3 replicas hold the same namespace" <<<"$text" || { echo "$text"; return 1; }
}
check "the demo's outputs are right on 3 replicas that agree" demo_outputs_right
env_outputs_right() {
    local text; text="$(outputs env.ipynb)"
    grep -qxF "prefix $VPREFIX" <<<"$text" && grep -qxF "ld $USER_LD" <<<"$text" &&
        grep -qxF "shell ld $USER_LD" <<<"$text" &&
        grep -q "all 3 replicas hold the same namespace" <<<"$text" || { echo "$text"; return 1; }
}
check "cells see the venv and the user's LD_LIBRARY_PATH" env_outputs_right

# The kernel runs inside this Python: a cell runs on its main thread, and an
# interrupt (the spec's message mode, and a signal) stops a running cell.
interrupts_reach_the_cell() {
    run_clean "$VPY" - <<'PY'
import threading, time
from jupyter_client.manager import start_new_kernel
km, kc = start_new_kernel(kernel_name="notebookos", startup_timeout=120)
quiet = {"output_hook": lambda msg: None}
try:
    for mode in ("message", "signal"):
        km.kernel_spec.interrupt_mode = mode
        reply = kc.execute_interactive(
            "import threading\nassert threading.current_thread() is threading.main_thread()",
            timeout=60, **quiet)
        assert reply["content"]["status"] == "ok", reply["content"]
        threading.Timer(2.0, km.interrupt_kernel).start()
        reply = kc.execute_interactive("import time\ntime.sleep(60)", timeout=50, **quiet)
        assert reply["content"].get("ename") == "KeyboardInterrupt", (mode, reply["content"])
        assert kc.execute_interactive("1", timeout=30, **quiet)["content"]["status"] == "ok"
finally:
    kc.stop_channels()
    km.shutdown_kernel(now=True)
PY
}
check "cells run on the Python's main thread and both interrupt modes stop one" interrupts_reach_the_cell

# The same wheel in a venv of the distribution's own Python (Debian's and
# Ubuntu's are linked statically, the case the kernel runs inside Python
# for), where there is one of this version.
SYS_PY="/usr/bin/python$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ -x "$SYS_PY" ] && [ "$("$SYS_PY" -c 'import sys; print(sys.prefix)')" = /usr ] &&
        "$SYS_PY" -m venv "$WORK/sysvenv" 2>/dev/null; then
    run_clean "$WORK/sysvenv/bin/python" -m pip install -q --disable-pip-version-check "$WHEEL" \
        "nbclient>=0.10" >"$WORK/pip-sys.log" 2>&1 || cat "$WORK/pip-sys.log"
    run_clean "$WORK/sysvenv/bin/python" -m notebookos install --sys-prefix >/dev/null
    cp "$WORK/env.ipynb" "$WORK/sysenv.ipynb"
    system_python_runs() {
        executes sysenv.ipynb "$WORK/sysvenv/bin" || return 1
        local text; text="$(outputs sysenv.ipynb)"
        grep -qx "prefix $WORK/sysvenv" <<<"$text" && grep -qxF "ld $USER_LD" <<<"$text" &&
            grep -q "all 3 replicas hold the same namespace" <<<"$text" || { echo "$text"; return 1; }
    }
    check "a venv of $SYS_PY ($("$SYS_PY" -c 'import sys; print(sys.version.split()[0])'), the distribution's) runs it too" system_python_runs
else
    echo "(no $SYS_PY with venv here: the system-Python case is not run)"
fi

# Where a GPU and torch are: a cell that asks for one, through the agent the
# kernel starts on this host.
if command -v nvidia-smi >/dev/null && run_clean "$VPY" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    notebook gpu.ipynb "%%gpus 1
import torch
torch.manual_seed(0)
w = torch.randn(2048, 2048, device='cuda')
s = float((w @ w).sum())
print('device', torch.cuda.get_device_name(0))
print('sum', round(s, 1))" \
        "%%gpus 1
print('again', round(float((w @ w).sum()), 1) == round(s, 1))" \
        '%notebookos verify'
    check "jupyter execute runs a %%gpus notebook" executes gpu.ipynb
    gpu_outputs_right() {
        local text; text="$(outputs gpu.ipynb)"
        echo "$text" | sed -n '1,2p' | sed 's/^/   /'
        grep -q "^device " <<<"$text" && grep -qx "again True" <<<"$text" &&
            grep -q "all 3 replicas hold the same namespace" <<<"$text" || { echo "$text"; return 1; }
    }
    check "the GPU cells ran and their state reached every replica" gpu_outputs_right
else
    echo "(no GPU with torch here: the %%gpus notebook is not run)"
fi

run_clean "$VPY" -m notebookos uninstall --sys-prefix
check "python -m notebookos uninstall removes the spec" test ! -e "$SPEC"
run_clean "$VPY" -m pip uninstall -q -y notebookos
check "pip uninstall removes the kernel" bash -c "! '$VPY' -c 'import notebookos._kernel' 2>/dev/null"

SIZE_MB="$("$PY" -c 'import os, sys; print(f"{os.path.getsize(sys.argv[1]) / 1e6:.1f}")' "$WHEEL")"
echo "wheel.sh: $(basename "$WHEEL"), $SIZE_MB MB; pip install with its dependencies took $((INSTALL_MS / 1000)).$((INSTALL_MS % 1000 / 100)) s"
echo "wheel.sh: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
