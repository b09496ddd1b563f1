#!/usr/bin/env bash
# Runs on the lent GPU machine: where a Llama-3.1-8B step's device time goes, kernel by kernel.
# (1) linear_floor.py: what cuBLAS takes for the step's matmuls through PyTorch (the mature
# stack's floor for them); (2) Nsight Compute times every kernel of `kindling bench serve`
# (eager launches, so each kernel is its own launch) at 1 then 8 streams of 512-token prompts:
# one stream's decode steps, 8 streams' decode steps and one 4,096-token prefill step. The
# per-launch CSV comes back xz'd for scripts/bench/kernel_profile.py. STEPS: floor ncu.
set -uo pipefail
source "$(dirname "$0")/device-env.sh"
[ -e $M/llama3.1-8b ] || python3 scripts/bench/make_models.py $M llama3.1-8b 2>&1 | tail -1
for step in ${STEPS:-floor ncu}; do
  echo "== $step"
  case $step in
  floor) python3 scripts/bench/linear_floor.py 1,8,64 "$OUT/linear-floor.json" ;;
  ncu)
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    start=$(date +%s)
    KINDLING_CUDA_GRAPHS=0 timeout ${NCU_TIMEOUT:-330} "$NCU" --target-processes all --clock-control none \
      --metrics gpu__time_duration.sum --csv --log-file /tmp/ncu.csv \
      "$BIN" bench serve --device cuda --model llama3.1-8b=$M/llama3.1-8b --plugin /tmp/openai-python.wasm \
      --concurrency 1,8 --prompt-tokens 512-512 --output-tokens ${NCU_TOKENS:-24} \
      --serve-args "--kv-cache-gib 24 --max-step-tokens 4096" --out "$OUT/ncu-serve.json" >/tmp/ncu-run.log 2>&1
    echo "ncu exit $? after $(( $(date +%s) - start )) s; $(grep -c gpu__time_duration /tmp/ncu.csv) kernels timed"
    grep -v " INFO " /tmp/ncu-run.log | grep -v "^==PROF==" | tail -5
    xz -T0 -c /tmp/ncu.csv > "$OUT/ncu.csv.xz"
    ;;
  esac
done
