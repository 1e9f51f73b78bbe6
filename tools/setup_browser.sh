#!/usr/bin/env bash
# What the browser test needs, added to the test environment built by tools/setup_test_env.sh:
# Debian's Chromium (apt) and the Playwright Python package plus the web-server pins gradio 3.41.2
# needs to serve pages (requirements-browser.txt). Playwright's own browser download is not used.
# Usage: bash tools/setup_browser.sh [venv folder, default .venv]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
if [ ! -x /usr/bin/chromium ]; then
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends chromium
fi
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q -r requirements-browser.txt -c constraints.txt
python -c "from importlib.metadata import version as v; print('browser test env: playwright', v('playwright'), '| fastapi', v('fastapi'), '| starlette', v('starlette'))"
/usr/bin/chromium --version 2>/dev/null | tail -1
