#!/usr/bin/env bash
# Builds every Python handler in examples/ and plugins/ into target/guests/NAME.wasm.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target/guests
for dir in examples/*-python plugins/*-python; do
  [ -f "$dir/app.py" ] || continue
  name=$(basename "$dir")
  echo "building $dir -> target/guests/$name.wasm" >&2
  componentize-py -d wit -w kindling:llm/handler componentize -p "$dir" -p sdk/python app \
    -o "target/guests/$name.wasm" >/dev/null
done
