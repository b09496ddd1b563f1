#!/usr/bin/env bash
# The main job on a fresh machine: set up, build, make a tiny model, serve, deploy the hello
# example, and invoke it (once whole, once streamed). Everything stays on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --locked -p kindling
scripts/build-guests.sh
KINDLING=target/debug/kindling
DEMO=.kindling/demo
rm -rf "$DEMO"; mkdir -p "$DEMO"
$KINDLING models make-tiny "$DEMO/models/tiny"

$KINDLING serve --listen 127.0.0.1:0 --data-dir "$DEMO/data" --model "tiny=$DEMO/models/tiny" \
  >"$DEMO/serve.out" 2>"$DEMO/serve.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "listening on" "$DEMO/serve.out" 2>/dev/null && break; sleep 0.1; done
export KINDLING_URL=$(sed -n 's/^kindling listening on //p' "$DEMO/serve.out")
echo "server: $KINDLING_URL (log: $DEMO/serve.log)"

$KINDLING deploy --manifest examples/hello-python/kindling.toml --component target/guests/hello-python.wasm
echo "--- POST /hello"
$KINDLING invoke -i /hello --data '{"prompt": "Once upon a time", "max_tokens": 32}'
echo "--- POST /hello (streamed)"
$KINDLING invoke /hello --data '{"prompt": "Hello, Kindling!", "max_tokens": 32, "stream": true}'
echo
