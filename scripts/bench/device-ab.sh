#!/usr/bin/env bash
# Runs on the lent GPU machine: this build ("after") against an earlier one ("before",
# .device/kindling-before.xz, packed by `BEFORE=path/to/kindling scripts/pack-device.sh`) on the
# same models in the same run, with the HF transformers baseline once. MODELS: make_models.py
# shapes (default llama3.1-8b); LEVELS: stream counts (default 1,64).
set -uo pipefail
source "$(dirname "$0")/device-env.sh"
xz -dc .device/kindling-before.xz > /tmp/kindling-before && chmod +x /tmp/kindling-before
for name in ${MODELS:-llama3.1-8b}; do
  [ -e $M/$name ] || python3 scripts/bench/make_models.py $M $name 2>&1 | tail -1
  bench_serve after $name $M/$name --hf-python python3
  (BIN=/tmp/kindling-before; bench_serve before $name $M/$name)
done
