#!/usr/bin/env bash
# A Kindling cluster on this machine's loopback, with the real servers: PostgreSQL (shared state),
# moto's S3 server (components), N `kindling serve` nodes, the endpoint picker and Envoy.
#
#   scripts/cluster.sh up [NODES] [-- extra kindling serve args]   start; prints the URLs
#   scripts/cluster.sh down                                        stop everything, keep nothing
#
# State lives in .kindling/cluster (logs too); `up` writes .kindling/cluster/env with GATEWAY,
# ROUND_ROBIN, NODES, ADMIN_TOKEN for scripts to source. Needs scripts/setup.sh's installs and a
# built binary (cargo build --release -p kindling, or KINDLING=path).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.kindling/cluster
KINDLING=${KINDLING:-target/release/kindling}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "nothing listens on $1" >&2; return 1; }
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

down() {
  if [ -d "$DIR/pids" ]; then
    for pid in "$DIR"/pids/*; do kill "$(cat "$pid")" 2>/dev/null || true; done
    sleep 1
    for pid in "$DIR"/pids/*; do kill -9 "$(cat "$pid")" 2>/dev/null || true; done
  fi
  rm -rf "$DIR"
}

up() {
  local nodes=${1:-3}; shift || true
  [ "${1:-}" = "--" ] && shift
  down
  mkdir -p "$DIR/pids" "$DIR/logs"
  [ -x "$KINDLING" ] || { echo "$KINDLING is missing: cargo build --release -p kindling" >&2; exit 1; }
  local pgbin; pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort | tail -1)
  local pg_port s3_port picker_port picker_metrics gateway_port rr_port admin_port
  pg_port=$(free_port); s3_port=$(free_port); picker_port=$(free_port); picker_metrics=$(free_port)
  gateway_port=$(free_port); rr_port=$(free_port); admin_port=$(free_port)

  mkdir -p "$DIR/pg"; [ "$(id -u)" = 0 ] && chown postgres "$DIR/pg"
  as_postgres "$pgbin/initdb" -A trust -U kindling -E UTF8 -D "$DIR/pg/data" >"$DIR/logs/initdb.log"
  as_postgres "$pgbin/postgres" -D "$DIR/pg/data" -p "$pg_port" -c listen_addresses=127.0.0.1 -k "$(realpath "$DIR/pg")" \
    >"$DIR/logs/postgres.log" 2>&1 & echo $! >"$DIR/pids/postgres"
  python3 -m moto.server -H 127.0.0.1 -p "$s3_port" >"$DIR/logs/s3.log" 2>&1 & echo $! >"$DIR/pids/s3"
  wait_port "$pg_port"; wait_port "$s3_port"

  export KINDLING_ADMIN_TOKEN=${KINDLING_ADMIN_TOKEN:-local-cluster}
  export AWS_ACCESS_KEY_ID=kindling AWS_SECRET_ACCESS_KEY=kindling-secret
  local addresses=()
  for i in $(seq 0 $((nodes - 1))); do
    local port; port=$(free_port)
    "$KINDLING" serve --listen "127.0.0.1:$port" --data-dir "$DIR/node$i" \
      --state "postgres://kindling@127.0.0.1:$pg_port/postgres" --blobs "http://127.0.0.1:$s3_port/kindling" "$@" \
      >"$DIR/logs/node$i.log" 2>&1 & echo $! >"$DIR/pids/node$i"
    addresses+=("127.0.0.1:$port")
  done
  for a in "${addresses[@]}"; do wait_port "${a##*:}"; done

  local node_args=() endpoints=()
  for a in "${addresses[@]}"; do
    node_args+=(--node "$a")
    endpoints+=("{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: ${a##*:} } } } }")
  done
  "$KINDLING" picker --listen "127.0.0.1:$picker_port" --metrics-listen "127.0.0.1:$picker_metrics" "${node_args[@]}" >"$DIR/logs/picker.log" 2>&1 & echo $! >"$DIR/pids/picker"
  local joined; joined=$(IFS=,; echo "${endpoints[*]}")
  sed -e "s/{{GATEWAY_PORT}}/$gateway_port/; s/{{ROUND_ROBIN_PORT}}/$rr_port/; s/{{ADMIN_PORT}}/$admin_port/" \
      -e "s/{{PICKER_ADDRESS}}/127.0.0.1/; s/{{PICKER_PORT}}/$picker_port/; s/{{NODES}}/$joined/g" \
      examples/cluster/envoy.yaml >"$DIR/envoy.yaml"
  local envoy; envoy=$(python3 -c 'import envoy._bin, os; print(os.path.join(os.path.dirname(envoy._bin.__file__), "envoy"))')
  "$envoy" -c "$DIR/envoy.yaml" --log-level error --disable-hot-restart >"$DIR/logs/envoy.log" 2>&1 & echo $! >"$DIR/pids/envoy"
  wait_port "$picker_port"; wait_port "$gateway_port"

  cat >"$DIR/env" <<ENV
GATEWAY=http://127.0.0.1:$gateway_port
ROUND_ROBIN=http://127.0.0.1:$rr_port
NODES=$(IFS=,; echo "${addresses[*]}")
ADMIN_TOKEN=$KINDLING_ADMIN_TOKEN
PICKER_METRICS=http://127.0.0.1:$picker_metrics/metrics
ENV
  echo "cluster up: gateway http://127.0.0.1:$gateway_port (round robin :$rr_port), nodes ${addresses[*]}, admin token $KINDLING_ADMIN_TOKEN"
  echo "logs in $DIR/logs; stop with scripts/cluster.sh down"
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  *) echo "usage: scripts/cluster.sh up [NODES] [-- serve args] | down" >&2; exit 2 ;;
esac
