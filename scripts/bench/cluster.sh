#!/usr/bin/env bash
# `kindling bench cluster` on loopback, CPU: a local cluster (scripts/cluster.sh: PostgreSQL,
# S3, NODES nodes, the picker, Envoy), 2 x MODELS copies of the real SmolLM2-135M GGUF (one set
# per phase, so both phases start cold), each node holding about two of them in its pool and two
# engines, an OpenAI plugin deployment listing them all, then the same Zipf workload through the
# picker and round robin. Prints the bench's JSON; BENCHMARKS.md records it.
#   scripts/bench/cluster.sh                 # NODES=3 MODELS=6 REQUESTS=96 CONCURRENCY=3
set -euo pipefail
cd "$(dirname "$0")/../.."
NODES=${NODES:-3}; MODELS=${MODELS:-6}; REQUESTS=${REQUESTS:-96}; CONCURRENCY=${CONCURRENCY:-3}
export KINDLING=${KINDLING:-target/release/kindling}
SMOL=.kindling/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$SMOL" ] || scripts/setup.sh
[ -f target/guests/openai-python.wasm ] || scripts/build-guests.sh
[ -x "$KINDLING" ] || cargo build --release -p kindling

# Two engines (dequantized weights + KV cache) and two checkpoints fit a node; six do not.
scripts/cluster.sh up "$NODES" -- --engine-memory-gib 1.5 --kv-cache-gib 0.125 --pool-gib 0.2 --idle-unload-secs 0
trap 'scripts/cluster.sh down' EXIT
source .kindling/cluster/env
export KINDLING_ADMIN_TOKEN=$ADMIN_TOKEN
first=http://${NODES%%,*}

copies=$(realpath .kindling)/cluster-models
mkdir -p "$copies"
locality=(); round_robin=()
for i in $(seq 0 $((MODELS - 1))); do
  for set in l r; do
    ln -f "$SMOL" "$copies/smol-$set$i.gguf"
    curl -sf -X POST "$first/admin/models" -H "authorization: Bearer $ADMIN_TOKEN" \
      -d "{\"name\": \"smol-$set$i\", \"path\": \"$copies/smol-$set$i.gguf\"}" >/dev/null
  done
  locality+=("smol-l$i"); round_robin+=("smol-r$i")
done
all=$(printf '"%s",' "${locality[@]}" "${round_robin[@]}")
printf 'name = "openai"\nroutes = ["/v1"]\nmodels = [%s]\n[limits]\ntimeout_ms = 600000\nmax_concurrency = 64\n' "${all%,}" \
  >.kindling/cluster/openai.toml
"$KINDLING" deploy --url "$first" -m .kindling/cluster/openai.toml -c target/guests/openai-python.wasm >/dev/null
# Every node serves it once it has compiled it.
for node in ${NODES//,/ }; do
  for _ in $(seq 600); do
    status=$(curl -s -o /dev/null -w '%{http_code}' "http://$node/v1/models") || true
    [ "$status" = 200 ] && break; sleep 0.5
  done
done

"$KINDLING" bench cluster --gateway "$GATEWAY" --round-robin "$ROUND_ROBIN" --nodes "$NODES" \
  --models-locality "$(IFS=,; echo "${locality[*]}")" --models-round-robin "$(IFS=,; echo "${round_robin[*]}")" \
  --requests "$REQUESTS" --concurrency "$CONCURRENCY"
