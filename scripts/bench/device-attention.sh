#!/usr/bin/env bash
# Runs on the lent GPU machine: attention through our paged kernel against attention over gathered
# K/V (KINDLING_PAGED_KERNEL=off). SERVE=1 (default): `bench serve` at LEVELS (default 1,64) with
# the HF baseline once, in the same run, then what each boot's self-check said of the kernel.
# PHASES=1: each way's per-phase device time of a step at 1 and 64 streams, decode and a
# 4,096-token prefill (KINDLING_PROFILE_PHASES=1, eager launches). (Session 11 compared the
# kernel's key-per-lane form with the key-per-warp one it replaced the same way.)
set -uo pipefail
source "$(dirname "$0")/device-env.sh"
if [ "${SERVE:-1}" = 1 ]; then
  bench_serve_pair kernel gathered KINDLING_PAGED_KERNEL=off ${MODELS:-llama3.1-8b}
  grep -hE "paged attention kernel (checked|disabled|off)" /tmp/serve-*-kernel.log /tmp/serve-*-gathered.log \
    | sed 's/\x1b\[[0-9;]*m//g' | cut -c 1-200
fi
if [ "${PHASES:-0}" = 1 ]; then
  [ -e $M/llama3.1-8b ] || python3 scripts/bench/make_models.py $M llama3.1-8b 2>&1 | tail -1
  for kernel in ${KERNELS:-on off}; do
    for streams in 1 64; do
      KINDLING_PAGED_KERNEL=$kernel KINDLING_PROFILE_PHASES=1 "$BIN" bench serve --device cuda \
        --model llama3.1-8b=$M/llama3.1-8b --plugin /tmp/openai-python.wasm --concurrency $streams \
        --prompt-tokens 512-512 --output-tokens 160 --serve-args "--kv-cache-gib 24 --max-step-tokens 4096" \
        --out /tmp/phases-$kernel-$streams.json >/tmp/phases-$kernel-$streams.log 2>&1
      echo "kernel $kernel, streams=$streams: exit $?"
      grep "phases per pass" /tmp/phases-$kernel-$streams.log | sed 's/\x1b\[[0-9;]*m//g' \
        | sed 's/.*phases per pass/phases per pass/' | grep -E "\"$streams rows\"|~4096 rows" | tail -2 | cut -c 1-500
    done
  done
fi
