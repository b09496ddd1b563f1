#!/usr/bin/env bash
# Runs on the lent GPU machine: paged decode attention with 32 lanes per key (the default) against
# the 16-lane variant (KINDLING_PAGED_LANES=16), `bench serve` at LEVELS (default 1,64) with the HF
# baseline once, in the same run; then what each boot's self-check said of the kernel.
set -uo pipefail
source "$(dirname "$0")/device-env.sh"
bench_serve_pair lanes32 lanes16 KINDLING_PAGED_LANES=16 ${MODELS:-llama3.1-8b}
grep -hE "paged decode (kernel checked|kernel disabled|attention: 16)" /tmp/serve-*-lanes*.log | sed 's/\x1b\[[0-9;]*m//g' | cut -c 1-200
