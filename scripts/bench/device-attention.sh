#!/usr/bin/env bash
# Runs on the lent GPU machine: paged attention with a key per lane (the default) against the
# earlier kernel with a key per warp (KINDLING_PAGED_KERNEL=warp). SERVE=1 (default): `bench
# serve` at LEVELS (default 1,64) with the HF baseline once, in the same run, then what each
# boot's self-check said of the kernel. PHASES=1: each kernel's per-phase device time of a decode
# step at 1 and 64 streams (KINDLING_PROFILE_PHASES=1, eager launches).
set -uo pipefail
source "$(dirname "$0")/device-env.sh"
if [ "${SERVE:-1}" = 1 ]; then
  bench_serve_pair kpl warp KINDLING_PAGED_KERNEL=warp ${MODELS:-llama3.1-8b}
  grep -hE "paged attention (kernel checked|kernel disabled|: a key)" /tmp/serve-*-kpl.log /tmp/serve-*-warp.log \
    | sed 's/\x1b\[[0-9;]*m//g' | cut -c 1-200
fi
if [ "${PHASES:-0}" = 1 ]; then
  [ -e $M/llama3.1-8b ] || python3 scripts/bench/make_models.py $M llama3.1-8b 2>&1 | tail -1
  for kernel in kpl warp; do
    for streams in 1 64; do
      KINDLING_PAGED_KERNEL=$kernel KINDLING_PROFILE_PHASES=1 "$BIN" bench serve --device cuda \
        --model llama3.1-8b=$M/llama3.1-8b --plugin /tmp/openai-python.wasm --concurrency $streams \
        --prompt-tokens 512-512 --output-tokens 160 --serve-args "--kv-cache-gib 24 --max-step-tokens 4096" \
        --out /tmp/phases-$kernel-$streams.json >/tmp/phases-$kernel-$streams.log 2>&1
      echo "$kernel, streams=$streams: exit $?"
      grep "phases per pass" /tmp/phases-$kernel-$streams.log | sed 's/\x1b\[[0-9;]*m//g' \
        | sed 's/.*phases per pass/phases per pass/' | grep -E "\"$streams rows\"" | tail -1 | cut -c 1-500
    done
  done
fi
