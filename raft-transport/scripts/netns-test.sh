#!/usr/bin/env bash
# Runs the network-namespace test: builds the per-host node binary, then the test.
# Needs root and iproute2. Namespaces are named nbos<pid>-* and removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -p raft-transport --example netns_node
NOTEBOOKOS_NETNS_TESTS=1 cargo nextest run -p raft-transport --test netns "$@"
