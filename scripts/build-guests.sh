#!/usr/bin/env bash
# Builds every handler in examples/ and plugins/ into target/guests/NAME.wasm:
# Python ones (app.py) with componentize-py, JavaScript ones (app.js) with sdk/js/build.mjs.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target/guests
for dir in examples/* plugins/*; do
  name=$(basename "$dir")
  if [ -f "$dir/app.py" ]; then
    echo "building $dir -> target/guests/$name.wasm" >&2
    componentize-py -d wit -w kindling:llm/handler componentize -p "$dir" -p sdk/python app \
      -o "target/guests/$name.wasm" >/dev/null
  elif [ -f "$dir/app.js" ]; then
    echo "building $dir -> target/guests/$name.wasm" >&2
    node sdk/js/build.mjs "$dir" "target/guests/$name.wasm"
  fi
done
