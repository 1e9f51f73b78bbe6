#!/usr/bin/env bash
# Everything CI checks, from a fresh machine: build the environments, lint, run the whole suite on the
# pinned torch (2.13.0 CPU, browser test included), then again on A1111 v1.10.1's default torch 2.1.2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_test_env.sh .venv
bash tools/setup_browser.sh .venv   # Debian chromium + playwright for the browser test
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -p no:cacheprovider
TORCH_VERSION=2.1.2 bash tools/setup_test_env.sh .venv-torch21
.venv-torch21/bin/python -m pytest -q -p no:cacheprovider -m "not browser"
