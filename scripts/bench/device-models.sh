#!/usr/bin/env bash
# Runs on the lent GPU machine (issue 9's GPU half): OPT and a Q4_K GGUF of Llama-3.1-8B, random
# weights in the real shapes, cold start and warm path against HF in the same run; the real
# SmolLM2 GGUF served from the GPU. Needs .device/ (scripts/pack-device.sh: binary, OpenAI plugin,
# gguf wheel, SmolLM2 in two parts: .device/smollm2.part-a and, carried in a second call,
# .device-b/smollm2.part-b). STEPS picks: check coldstart serve smol tokens. Results land in $OUT.
set -uo pipefail
source "$(dirname "$0")/device-env.sh"
[ -d /tmp/pylib/gguf ] || pip install -q --no-deps --no-index --target /tmp/pylib .device/gguf-*.whl
export PYTHONPATH=/tmp/pylib
serve() { # NAME PATH CONCURRENCY HF_DIR
  "$BIN" bench serve --device cuda --model "$1=$2" --plugin /tmp/openai-python.wasm --concurrency "$3" \
    --prompt-tokens 128-512 --output-tokens 256 --hf-python python3 --hf-model "$4" \
    --serve-args "--kv-cache-gib 24 --max-step-tokens 4096" --out "$OUT/serve-$1.json" 2>"$OUT/serve-$1.log" | tail -3 \
    || { echo "bench serve $1 failed; log tail:"; grep -v " INFO " "$OUT/serve-$1.log" | tail -20; }
}
for step in ${STEPS:-check coldstart serve}; do
  echo "== $step"
  case $step in
  check)
    "$BIN" models make-tiny $M/tiny-opt --arch opt >/dev/null
    python3 scripts/bench/check_on_device.py opt $M/tiny-opt | tee "$OUT/check-opt.json"
    ;;
  coldstart)
    python3 scripts/bench/make_models.py $M opt-125m llama3.1-8b 2>&1 | tail -2
    [ -f $M/llama3.1-8b-q4k.gguf ] || python3 scripts/bench/make_gguf.py $M/llama3.1-8b-q4k.gguf llama3.1-8b
    "$BIN" bench coldstart --device cuda --runs 2 --hf-python python3 --model opt-125m=$M/opt-125m \
      --model llama3.1-8b-q4k=$M/llama3.1-8b-q4k.gguf --hf-model llama3.1-8b-q4k=$M/llama3.1-8b \
      --out "$OUT/coldstart.json" 2>&1 | grep -v " INFO " | tail -25
    ;;
  serve)
    serve opt-125m $M/opt-125m 1,64 $M/opt-125m
    serve llama3.1-8b-q4k $M/llama3.1-8b-q4k.gguf 1,64 $M/llama3.1-8b
    ;;
  tokens)
    S=$M/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; mkdir -p $M/smollm2
    [ -f $S ] || cat .device/smollm2.part-a .device-b/smollm2.part-b > $S
    python3 scripts/bench/check_on_device.py tokens $S "$BIN" "Hello, world!" \
      "<|im_start|>user
What is 1234 + 5678? Ça va, naïve café…<|im_end|>
" "  two  spaces, a	tab and 🙂 emoji" "def f(x):\n    return x ** 2  # square" 2>"$OUT/tokens.log" | tee "$OUT/check-tokens.jsonl" | cut -c1-160
    ;;
  smol)
    S=$M/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; mkdir -p $M/smollm2
    [ -f $S ] || cat .device/smollm2.part-a .device-b/smollm2.part-b > $S
    sha256sum $S | tee "$OUT/smollm2.sha256"
    python3 scripts/bench/check_on_device.py gguf $S $M/smollm2-hf > "$OUT/check-smollm2.json" 2>"$OUT/check-smollm2.log" || tail -5 "$OUT/check-smollm2.log"; cat "$OUT/check-smollm2.json"
    "$BIN" serve --device cuda --model smollm2=$S --listen 127.0.0.1:8431 --data-dir /tmp/kd >"$OUT/smol-serve.log" 2>&1 &
    for _ in $(seq 60); do curl -sf localhost:8431/healthz >/dev/null && break; sleep 1; done
    sed 's/models = \["tiny"\]/models = ["smollm2"]/' plugins/openai-python/kindling.toml > /tmp/smol.toml
    "$BIN" deploy --url http://127.0.0.1:8431 -m /tmp/smol.toml -c /tmp/openai-python.wasm
    curl -s localhost:8431/v1/chat/completions -d '{"model":"smollm2","max_tokens":24,"temperature":0,"messages":[{"role":"user","content":"What is the capital of France?"}]}' | tee "$OUT/smol-chat.json"; echo
    kill %1; wait
    [ -d $M/smollm2-hf ] && serve smollm2 $S 1,64 $M/smollm2-hf
    ;;
  esac
done
