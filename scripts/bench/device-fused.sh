#!/usr/bin/env bash
# Runs on the lent GPU machine: the fused layer kernels (network/fused.rs) against the unfused
# ops in the same run. (1) Tiny models of every architecture generate the same greedy text with
# and without them (KINDLING_FUSED_KERNELS=0); (2) `kindling bench serve` with each, and HF
# transformers once, for the models in MODELS (made by make_models.py if missing).
set -uo pipefail
source "$(dirname "$0")/device-env.sh"
archs="llama qwen2 qwen3 mistral opt"
args=()
for a in $archs; do "$BIN" models make-tiny $M/tiny-$a --arch $a >/dev/null; args+=(--model tiny-$a=$M/tiny-$a); done
generate() { # LABEL (env decides fused or not)
  "$BIN" serve --device cuda "${args[@]}" --listen 127.0.0.1:8432 --data-dir /tmp/kd-$1 >"$OUT/tiny-$1.log" 2>&1 &
  local pid=$!
  for _ in $(seq 90); do curl -sf localhost:8432/healthz >/dev/null && break; sleep 1; done
  sed "s/models = \[\"tiny\"\]/models = [$(printf '"tiny-%s",' $archs | sed 's/,$//')]/" plugins/openai-python/kindling.toml > /tmp/tiny.toml
  "$BIN" deploy --url http://127.0.0.1:8432 -m /tmp/tiny.toml -c /tmp/openai-python.wasm >/dev/null
  for a in $archs; do for p in "Once upon a time" "The lighthouse keeper climbed the stairs and"; do
    curl -s localhost:8432/v1/completions -d "{\"model\":\"tiny-$a\",\"prompt\":\"$p\",\"max_tokens\":40,\"temperature\":0}" \
      | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["choices"][0]["text"]))'
  done; done > "$OUT/tiny-$1.txt"
  kill $pid; wait $pid 2>/dev/null
  grep -E "fused layer kernels|paged attention kernel" "$OUT/tiny-$1.log" | sed 's/.*INFO //; s/.*WARN //' | head -3
}
if [ -z "${SKIP_TINY:-}" ]; then
  generate fused
  KINDLING_FUSED_KERNELS=0 generate unfused
  if cmp -s "$OUT/tiny-fused.txt" "$OUT/tiny-unfused.txt"; then echo "tiny models: same text fused and unfused ($(wc -l < "$OUT/tiny-fused.txt") completions)";
  else echo "tiny models: TEXT DIFFERS"; diff "$OUT/tiny-fused.txt" "$OUT/tiny-unfused.txt" | head -20; fi
fi
bench_serve_pair fused unfused KINDLING_FUSED_KERNELS=0 ${MODELS:-llama3.1-8b}
