#!/usr/bin/env bash
# Builds the kernel for a GPU host whose Python differs from this machine's
# and stages what bench/gpu_evidence.sh needs there in target/device/:
#   bench/device_build.sh LIBPYTHON_SO PYTHON_VERSION
# e.g. bench/device_build.sh /path/to/libpython3.12.so.1.0 3.12 (from a
# CPython of that version here, or copied from the GPU host). Python headers are not needed (pyo3 declares the C API
# itself); the copied libpython is only linked against, the host's own is
# loaded at run time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LIB="$1"; VER="$2"
WORK="$ROOT/target/device-build"
mkdir -p "$WORK/lib" "$ROOT/target/device/wheels"
cp "$LIB" "$WORK/lib/"
ln -sf "$(basename "$LIB")" "$WORK/lib/libpython$VER.so"
cat > "$WORK/pyo3-config.txt" <<CFG
implementation=CPython
version=$VER
shared=true
abi3=false
lib_name=python$VER
lib_dir=$WORK/lib
pointer_width=64
build_flags=
suppress_build_script_link_lines=false
CFG
# The host's libpython needs a newer glibc than this machine may have; its own
# dependencies are resolved on the host.
PYO3_CONFIG_FILE="$WORK/pyo3-config.txt" CARGO_TARGET_DIR="$WORK/target" \
    RUSTFLAGS="-C link-arg=-Wl,--allow-shlib-undefined" \
    cargo build -q --release -p notebookos-kernel
cp "$WORK/target/release/notebookos-kernel" "$ROOT/target/device/notebookos-kernel"
strip "$ROOT/target/device/notebookos-kernel"
# The shim's dependencies, jupyter_client, and ipykernel to compare with, for
# the host's Python (no internet there).
"$ROOT/.venv/bin/pip" download -q --only-binary=:all: --python-version "$VER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$ROOT/target/device/wheels" ipython comm matplotlib-inline traitlets jupyter_client \
    cloudpickle ipykernel numpy
du -sh "$ROOT/target/device"
