#!/usr/bin/env bash
# Bounded fuzzing of the wire parser and the replica decoders (not part of
# the default test run).
#   fuzz/run.sh [SECONDS]      # default 60 per target
# Needs cargo-fuzz (installed here if missing). It runs libFuzzer with
# sanitizers, which need nightly features: RUSTC_BOOTSTRAP lets the one
# stable toolchain on the machine build them.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SECS="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
PY="${PYO3_PYTHON:-$(command -v python3)}"
# The kernel library links libpython; the fuzz binary finds it here.
export LD_LIBRARY_PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYO3_PYTHON="$PY" RUSTC_BOOTSTRAP=1
cd "$HERE/.."
for target in wire_decode replica_decode raft_rpc_decode; do
    # New corpus entries go to a scratch dir; the committed corpus stays small.
    scratch="$(mktemp -d)"
    cargo fuzz run "$target" "$scratch" "fuzz/corpus/$target" -- \
        -max_total_time="$SECS" -max_len=65536 -rss_limit_mb=2048
    rm -rf "$scratch"
done
