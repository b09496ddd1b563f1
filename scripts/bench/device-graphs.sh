#!/usr/bin/env bash
# Runs on the lent GPU machine: CUDA graphs for decode steps (runtime/network/src/graphs.rs) against eager
# launches (KINDLING_CUDA_GRAPHS=0) in the same run. (1) Tiny models of every architecture and a
# Qwen3-0.6B-shaped one (head_dim 128: the tiny ones' heads are too small for the paged kernel,
# so only it takes graphs) give the same greedy text both ways, one request at a time and 6 at
# once per model (batches padded up to a graph's bucket, captures while other engines step);
# (2) `kindling bench serve` both ways, and HF transformers once, for the models in MODELS
# (made by make_models.py if missing). ON, OFF and OFF_ENV compare something else the same way:
# ON=kernel OFF=gathered OFF_ENV=KINDLING_PAGED_KERNEL=off compares attention through our paged
# kernel with attention over gathered K/V; SERVE_ARGS="--dtype f32" runs the comparisons in f32.
set -uo pipefail
source "$(dirname "$0")/device-env.sh"
archs=${ARCHS-llama qwen2 qwen3 mistral opt}
[ -e $M/qwen3-0.6b ] || python3 scripts/bench/make_models.py $M qwen3-0.6b 2>&1 | tail -1
models="$(for a in $archs; do printf 'tiny-%s ' $a; done)q06"
prompts=("Once upon a time" "The lighthouse keeper climbed the stairs and" "In the beginning" "Seven ships"
  "A recipe for bread:" "The theory of everything"
  "$(printf 'The committee met on %s and agreed on the budget, the schedule and the venue. ' Monday Tuesday Wednesday Thursday Friday Saturday) In short, the committee")
args=()
T=/tmp/tiny-out; rm -rf $T /tmp/par-*; mkdir -p $T  # the comparisons' inputs; what they found is printed
for a in $archs; do "$BIN" models make-tiny $M/tiny-$a --arch $a >/dev/null; args+=(--model tiny-$a=$M/tiny-$a); done
args+=(--model q06=$M/qwen3-0.6b)
# The real SmolLM2 GGUF (head_dim 64, trained weights: a rounding difference rarely flips its
# greedy tokens) when both parts were carried (pack-device.sh with SMOLLM2=1).
S=$M/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f $S ] && [ -f .device/smollm2.part-a ] && [ -f ${PART_B:=.device-b/smollm2.part-b} ]; then
  mkdir -p $M/smollm2 && cat .device/smollm2.part-a $PART_B > $S
fi
if [ -f $S ]; then args+=(--model smol=$S); models+=" smol"; fi
complete() { # MODEL PROMPT -> the completion's text as JSON
  curl -s localhost:8432/v1/completions -d "{\"model\":\"$1\",\"prompt\":\"$2\",\"max_tokens\":40,\"temperature\":0}" \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps(d["choices"][0]["text"]) if "choices" in d else "ERROR " + json.dumps(d)[:300])'
}
generate() { # LABEL (the environment decides graphs or not)
  "$BIN" serve --device cuda "${args[@]}" ${SERVE_ARGS:-} --kv-cache-gib 4 --max-instances 64 --listen 127.0.0.1:8432 --data-dir /tmp/kd-$1 >"$T/tiny-$1.log" 2>&1 &
  local pid=$!
  for _ in $(seq 90); do curl -sf localhost:8432/healthz >/dev/null && break; sleep 1; done
  sed "s/models = \[\"tiny\"\]/models = [$(printf '"%s",' $models | sed 's/,$//')]/" plugins/openai-python/kindling.toml > /tmp/tiny.toml
  "$BIN" deploy --url http://127.0.0.1:8432 -m /tmp/tiny.toml -c /tmp/openai-python.wasm >/dev/null
  for m in $models; do for p in "${prompts[@]}"; do complete $m "$p"; done; done > "$T/tiny-$1-alone.txt"
  local i=0
  mkdir -p /tmp/par-$1
  for m in $models; do for p in "${prompts[@]}"; do complete $m "$p" > /tmp/par-$1/$(printf %03d $i) & i=$((i + 1)); done; done
  wait $(jobs -p | grep -v "^$pid$") 2>/dev/null
  cat /tmp/par-$1/* > "$T/tiny-$1-together.txt"
  curl -s localhost:8432/metrics | grep -E "^kindling_engine_(graph_)?steps_total" > "$T/tiny-$1-steps.txt"
  kill $pid; wait $pid 2>/dev/null
  echo "$1: $(grep -c "captured a decode graph" "$T/tiny-$1.log") graphs captured; warnings and errors:"
  grep -E " (WARN|ERROR) |paged attention kernel (checked|off)|decode graphs checked" "$T/tiny-$1.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c 1-300 | head -5
}
same() { # A B WHAT: per model, how many of its completions differ (the texts go to $OUT)
  python3 -c 'import sys
a, b = (open(f).read().splitlines() for f in sys.argv[1:3])
ms = sys.argv[4:]; n = len(a) // max(len(ms), 1)
print(sys.argv[3] + ": " + ", ".join(f"{m} {sum(x != y for x, y in zip(a[i*n:(i+1)*n], b[i*n:(i+1)*n]))}/{n} differ" for i, m in enumerate(ms)))' "$1" "$2" "$3" $models
  cp "$1" "$2" "$OUT/" 2>/dev/null
}
ON=${ON:-graphs} OFF=${OFF:-eager} OFF_ENV=${OFF_ENV:-KINDLING_CUDA_GRAPHS=0}
if [ -z "${SKIP_TINY:-}" ]; then
  KINDLING_LOG=kindling_engine=debug generate $ON
  (export "$OFF_ENV"; generate $OFF)
  same "$T/tiny-$ON-alone.txt" "$T/tiny-$OFF-alone.txt" "$ON against $OFF, alone"
  same "$T/tiny-$ON-together.txt" "$T/tiny-$OFF-together.txt" "$ON against $OFF, ${#prompts[@]} at once per model"
  same "$T/tiny-$ON-together.txt" "$T/tiny-$ON-alone.txt" "$ON, at once and alone"
  echo "graph steps / steps:"; paste "$T/tiny-$ON-steps.txt" | awk '{print "  " $0}'
fi
bench_serve_pair $ON $OFF "$OFF_ENV" ${MODELS-qwen3-0.6b llama3.1-8b}  # MODELS="" skips
