#!/usr/bin/env bash
# Installs what building and testing Kindling needs beyond Rust: componentize-py (Python guests),
# componentize-js (JavaScript guests, into sdk/js/node_modules), numpy + tokenizers (the
# independent reference the tests compare against) and the openai client (plugin tests).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -r scripts/requirements.txt
(cd sdk/js && npm ci --no-audit --no-fund --loglevel=error)
