#!/usr/bin/env bash
# Runs on the lent GPU machine: RUNS (default 3) pool misses from disk (the model's files dropped
# from the page cache), each against reading the same files just before with 8 and 16 buffered
# readers (and 1, the first time) and 16 direct ones, in the same run.
set -uo pipefail
source "$(dirname "$0")/device-env.sh"
python3 scripts/bench/make_models.py $M qwen3-0.6b llama3.1-8b 2>&1 | grep made
df -h "$M" | tail -1
# Each entry of READS is a KINDLING_POOL_READ: direct (the default), buffered or mmap, each
# against the disk; READS="direct:KINDLING_POOL_PIN=behind buffered" adds environment to a run.
# Every miss's greedy text is checked against the pooled copy's where that text repeats (the
# bench fails otherwise).
n=0
for read in ${READS:-direct buffered}; do
  n=$((n + 1))
  echo "== admission: $read (run $n)"
  env KINDLING_POOL_READ=${read%%:*} $([ "$read" = "${read#*:}" ] || echo "${read#*:}" | tr , ' ') "$BIN" bench coldstart --device cuda:0 --pool-miss --runs ${RUNS:-3} --skip-fresh \
    $(for m in ${MODELS:-qwen3-0.6b llama3.1-8b}; do echo --model $m=$M/$m; done) \
    --out "$OUT/pool-miss-$n.json" > "/tmp/pool-miss-$n.log" 2>&1
  grep -E "disk|miss|admission|warm pool, run" "/tmp/pool-miss-$n.log" | grep -v " INFO "
  grep -E " WARN |checked" "/tmp/pool-miss-$n.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c 1-200 | head -12
done
