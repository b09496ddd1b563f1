#!/usr/bin/env bash
# Runs on the lent GPU machine: where a Llama-3.1-8B step's device time goes, kernel by kernel.
# (1) linear_floor.py: what cuBLAS takes for the step's matmuls through PyTorch (the mature
# stack's floor for them); (2) Nsight Compute times every kernel of `kindling bench serve`
# (eager launches, so each kernel is its own launch) of one and of 8 streams' decode steps
# (kernel_profile.py: per kernel, per step). The raw CSVs come back xz'd. (3) phases: our own
# CUDA-event timing of each phase of the forward pass (KINDLING_PROFILE_PHASES=1, eager), at 1,
# 8 and 64 streams, far cheaper than ncu. (4) attention: Nsight Compute's full report (memory
# throughput, occupancy, warp stalls) of a few paged attention kernels of a 64-stream
# decode, the only kernels it profiles, so it is quick. STEPS: any of floor ncu phases attention
# (default floor phases).
set -uo pipefail
source "$(dirname "$0")/device-env.sh"
[ -e $M/llama3.1-8b ] || python3 scripts/bench/make_models.py $M llama3.1-8b 2>&1 | tail -1
for step in ${STEPS:-floor phases}; do
  echo "== $step"
  case $step in
  floor) python3 scripts/bench/linear_floor.py 1,8,64 "$OUT/linear-floor.json" ;;
  phases)
    for streams in 1 8 64; do
      KINDLING_PROFILE_PHASES=1 "$BIN" bench serve --device cuda --model llama3.1-8b=$M/llama3.1-8b \
        --plugin /tmp/openai-python.wasm --concurrency $streams --prompt-tokens 512-512 --output-tokens 160 \
        --serve-args "--kv-cache-gib 24 --max-step-tokens 4096" --out /tmp/phases-$streams.json >/tmp/phases-$streams.log 2>&1
      echo "streams=$streams: exit $?"
      grep "phases per pass" /tmp/phases-$streams.log | sed 's/\x1b\[[0-9;]*m//g' | sed 's/.*phases per pass/phases per pass/' \
        | grep -E "\"$streams rows\"|~4096 rows" | tail -2 | cut -c 1-500
      grep -E "WARN|ERROR" /tmp/phases-$streams.log | tail -3 | cut -c 1-300
      xz -T0 -c /tmp/phases-$streams.log > "$OUT/phases-$streams.log.xz"
    done ;;
  attention)
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    # Skip boot, warm-up and prefill: the 64 streams' decode steps come after some 2,000 launches
    # of this kernel (32 layers per step).
    KINDLING_CUDA_GRAPHS=0 timeout ${NCU_TIMEOUT:-300} "$NCU" --target-processes all --set full \
      --kernel-name regex:paged_attention_bf16 --launch-skip ${SKIP:-3000} --launch-count 3 -o /tmp/attention -f \
      "$BIN" bench serve --device cuda --model llama3.1-8b=$M/llama3.1-8b --plugin /tmp/openai-python.wasm \
      --concurrency 64 --prompt-tokens 512-512 --output-tokens 160 \
      --serve-args "--kv-cache-gib 24 --max-step-tokens 4096" --out /tmp/attention.json >/tmp/attention.log 2>&1
    echo "ncu attention: exit $?"
    "$NCU" --import /tmp/attention.ncu-rep --print-summary per-kernel 2>&1 | grep -E "Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Duration|Theoretical Occupancy|Block Limit" | head -24
    "$NCU" --import /tmp/attention.ncu-rep --page details --section WarpStateStats 2>&1 | grep -E "Stall|Warp Cycles" | head -12
    xz -T0 -c /tmp/attention.ncu-rep > "$OUT/attention.ncu-rep.xz" ;;
  ncu)
    # Two runs per shape that differ only in output tokens: their difference is that many
    # decode steps, with boot, warm-up and prefill cancelled out (kernel_profile.py).
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    for shape in "1 8" "1 24" "8 8" "8 24"; do
      set -- $shape; start=$(date +%s)
      KINDLING_CUDA_GRAPHS=0 timeout ${NCU_TIMEOUT:-150} "$NCU" --target-processes all --clock-control none \
        --metrics gpu__time_duration.sum --csv --log-file /tmp/ncu-$1-$2.csv \
        "$BIN" bench serve --device cuda --model llama3.1-8b=$M/llama3.1-8b --plugin /tmp/openai-python.wasm \
        --concurrency $1 --prompt-tokens 512-512 --output-tokens $2 \
        --serve-args "--kv-cache-gib 24 --max-step-tokens 4096" --out /tmp/ncu-$1-$2.json >/tmp/ncu-$1-$2.log 2>&1
      echo "ncu streams=$1 tokens=$2: exit $? after $(( $(date +%s) - start )) s, $(grep -c gpu__time_duration /tmp/ncu-$1-$2.csv) kernels"
      xz -T0 -c /tmp/ncu-$1-$2.csv > "$OUT/ncu-$1-$2.csv.xz"
    done
    python3 scripts/bench/kernel_profile.py /tmp/ncu-1-8.csv /tmp/ncu-1-24.csv 16 "1 stream decode" | tee "$OUT/profile.txt"
    python3 scripts/bench/kernel_profile.py /tmp/ncu-8-8.csv /tmp/ncu-8-24.csv 16 "8 streams decode" | tee -a "$OUT/profile.txt"
    ;;
  esac
done
