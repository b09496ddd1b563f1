#!/usr/bin/env bash
# Runs on the lent GPU machine: one pool miss per way of reading (no disk baseline), each
# checked by the bench against the pooled copy's greedy text; "differs" in the output is a
# miss that loaded other weights than a hit does, where the engine's greedy text repeats at all
# ("pooled_text_repeats"); every load also compares each tensor on the GPU with the pool's bytes
# (KINDLING_POOL_VERIFY=1), and a miss whose text differs compares the pool's bytes with the
# files. VARIANTS are environments for the run.
set -uo pipefail
export KINDLING_POOL_VERIFY=${KINDLING_POOL_VERIFY:-1}
source "$(dirname "$0")/device-env.sh"
python3 scripts/bench/make_models.py $M ${MODELS:-qwen3-0.6b llama3.1-8b} 2>&1 | grep made
n=0
for v in ${VARIANTS:-KINDLING_POOL_READ=buffered,KINDLING_POOL_PIN=behind KINDLING_POOL_READ=direct,KINDLING_POOL_PIN=behind KINDLING_POOL_READ=direct,KINDLING_POOL_PIN=ahead}; do
  n=$((n + 1))
  echo "== $v"
  env $(echo "$v" | tr , ' ') "$BIN" bench coldstart --device cuda:0 --pool-miss --no-disk-reads --runs ${RUNS:-1} --skip-fresh \
    $(for m in ${MODELS:-qwen3-0.6b llama3.1-8b}; do echo --model $m=$M/$m; done) \
    --out "$OUT/pool-miss-text-$n.json" > "/tmp/pool-miss-text-$n.log" 2>&1
  echo "exit $?"
  grep -E "pool miss from disk|differ|Error" "/tmp/pool-miss-text-$n.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c 1-300
  grep -o '"pooled_text_repeats": *[a-z]*' "$OUT/pool-miss-text-$n.json"
done
