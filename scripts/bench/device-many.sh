#!/usr/bin/env bash
# Runs on the lent GPU machine: many models on one GPU. Four models scaled from zero at the same
# moment (time to first token p50/p99; each alone, from the pool, is the same-run baseline), then
# a warm Qwen3-0.6B stream's time per output token before and while two 8B models and a 0.5B
# load on the same GPU.
set -uo pipefail
source "$(dirname "$0")/device-env.sh"
python3 scripts/bench/make_models.py $M qwen3-0.6b llama3-8b llama3.1-8b qwen2-0.5b 2>&1 | grep made
models=(--model warm=$M/qwen3-0.6b --model a=$M/llama3-8b --model b=$M/llama3.1-8b --model c=$M/qwen2-0.5b)
"$BIN" bench coldstart --device cuda:0 --together --warm-traffic --runs 2 --skip-fresh "${models[@]}" \
  --out "$OUT/many-models.json" 2>&1 | grep -E "together|warm traffic|warm worker|warm pool, run|median|^model" | grep -v " INFO "
