#!/usr/bin/env bash
# Sets up and runs every test: unit tests of each crate and the end-to-end suite, which starts
# the real server, builds guest components from source and checks generations against an
# independent numpy implementation, and the cluster tests start PostgreSQL, an S3 server, Envoy,
# the picker and three nodes on loopback; the Kubernetes manifests are validated first. Ends with
# one line totalling all test binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
python3 scripts/check-kubernetes.py
cargo build --locked -p kindling
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --locked --workspace --all-targets -- --test-threads 2 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
