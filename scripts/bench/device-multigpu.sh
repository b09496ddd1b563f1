#!/usr/bin/env bash
# Runs on a lent multi-GPU machine (nvidia-h100-x2 or larger): one warm worker per GPU. Two
# 8B-shaped models (random weights) scaled from zero at the same moment, from the pool: on two
# GPUs they land one per GPU; on one GPU (the same-run baseline) they share its link.
set -uo pipefail
source "$(dirname "$0")/device-env.sh"
python3 scripts/bench/make_models.py $M llama3-8b llama3.1-8b 2>&1 | grep made
models=(--model a=$M/llama3-8b --model b=$M/llama3.1-8b)
"$BIN" bench coldstart --device cuda:0,cuda:1 --together --runs 2 --skip-fresh --hf-python python3 "${models[@]}" \
  --out "$OUT/coldstart-2gpu.json" 2>&1 | grep -E "together|warm worker|HF|median|^model|^[ab] " | grep -v " INFO "
"$BIN" bench coldstart --device cuda:0 --together --runs 1 --skip-fresh "${models[@]}" \
  --out "$OUT/coldstart-1gpu.json" 2>&1 | grep -E "together|warm worker" | grep -v " INFO "
