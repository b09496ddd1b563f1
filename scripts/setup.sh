#!/usr/bin/env bash
# Installs what building and testing Kindling needs beyond Rust: componentize-py (guest
# components), numpy + tokenizers (the independent reference the tests compare against).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -r scripts/requirements.txt
