#!/usr/bin/env bash
# On the lent GPU machine (carrying .device, packed with GUESTS="ping-python ping-js"):
# `kindling bench invoke` for the minimal, Python and JavaScript handlers at 1 and 16 clients,
# once per server setting in CONFIGS ("defaults", or serve flags joined by commas: instances made
# ahead of requests, slots kept resident), each against /healthz in the same run; then
# scripts/bench/invoke_summary.py prints the tails. Prints the kernel (keeping slots resident is
# cheap only where it has PAGEMAP_SCAN, Linux 6.7+).
source "$(dirname "$0")/device-env.sh"
for g in ping-python ping-js; do xz -dc ".device/$g.wasm.xz" > "/tmp/$g.wasm"; done
uname -r | tee "$OUT/kernel.txt"; nproc
CONFIGS=${CONFIGS:-"defaults --warm-instances=0,--keep-resident-kib=0"}
for c in $CONFIGS; do
  args=${c//,/ }; [ "$c" = defaults ] && args=""
  tag=$(echo "$c" | tr -c 'a-z0-9\n' '_')
  echo "== $args"
  RUST_LOG=warn "$BIN" bench invoke --component ping-wat=examples/ping-wat/ping.wat \
    --component ping-python=/tmp/ping-python.wasm --component ping-js=/tmp/ping-js.wasm \
    --concurrency 1,16 --requests ${REQUESTS:-400} --serve-args "$args" --out "$OUT/invoke-$tag.json" 2>&1 | grep " x"
done
python3 scripts/bench/invoke_summary.py "$OUT"
