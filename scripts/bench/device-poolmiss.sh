#!/usr/bin/env bash
# Runs on the lent GPU machine: a pool miss from disk (the model's files dropped from the page
# cache) against reading the same files with 1 and 8 parallel readers, in the same run.
set -uo pipefail
source "$(dirname "$0")/device-env.sh"
python3 scripts/bench/make_models.py $M qwen3-0.6b llama3.1-8b 2>&1 | grep made
df -h "$M" | tail -1
# Admission by parallel reads (the default) and by faulting in an mmap, each against the disk.
for read in ${READS:-parallel mmap}; do
  echo "== admission: $read"
  KINDLING_POOL_READ=$read "$BIN" bench coldstart --device cuda:0 --pool-miss --runs 1 --skip-fresh \
    --model qwen3-0.6b=$M/qwen3-0.6b --model llama3.1-8b=$M/llama3.1-8b \
    --out "$OUT/pool-miss-$read.json" 2>&1 | grep -E "disk|miss|admission|warm pool, run" | grep -v " INFO "
done
