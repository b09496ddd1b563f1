#!/usr/bin/env bash
# Sets up and runs every test: unit tests of each crate and the end-to-end suite, which starts
# the real server, builds guest components from source and checks generations against an
# independent numpy implementation.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --locked -p kindling
cargo test --locked --workspace -- --test-threads 2
