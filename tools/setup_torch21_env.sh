#!/usr/bin/env bash
# A second test environment with A1111 v1.10.1's default torch, 2.1.2 (its launcher installs that
# release), in the folder given as $1 (default .venv-torch21). PyPI's 2.1.2 is the CUDA 12.1 build; it
# runs on the CPU too. PIP_CONSTRAINT replaces a machine-wide torch cap from pip's config, if any.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-torch21}"
python="${PYTHON:-python3.11}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==2.1.2" > "$constraints"
export PIP_CONSTRAINT="$constraints"
pip install -q "pip==24.3.1"
pip install -q torch==2.1.2
pip install -q -r requirements-test.txt
pip install -q --no-deps stable-diffusion-sdkit==2.1.5
python -c "import torch, transformers, peft; print('torch 2.1 env:', torch.__version__, transformers.__version__, peft.__version__)"
