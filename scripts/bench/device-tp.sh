#!/usr/bin/env bash
# Runs on the lent 2-GPU machine (nvidia-h100-x2): a model split over both GPUs (tensor parallel,
# NCCL) scaled from the pool, against the same model whole on one GPU, in the same run:
# `kindling bench coldstart --tensor-parallel 2` (time to first token, and the split model's
# greedy text against the whole one's). MODELS: make_models.py shapes (default llama3.1-8b).
set -uo pipefail
source "$(dirname "$0")/device-env.sh"
echo "NCCL from ${NCCL_LIB:-nowhere}"
for name in ${MODELS:-llama3.1-8b}; do
  [ -e $M/$name ] || python3 scripts/bench/make_models.py $M $name 2>&1 | tail -1
  KINDLING_LOG=${KINDLING_LOG:-warn} "$BIN" bench coldstart --device cuda:0,cuda:1 --model $name=$M/$name --runs ${RUNS:-3} \
    --skip-fresh --tensor-parallel 2 --out "$OUT/coldstart-tp2-$name.json" 2>&1 | grep -v "^\s*$" | tail -${LINES_SHOWN:-16}
done
