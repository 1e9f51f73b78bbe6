#!/usr/bin/env bash
# Build the pinned test environment (A1111 v1.10.1's runtime: Python 3.11, torch 2.13.0 CPU,
# transformers 4.30.2, gradio 3.41.2, peft 0.13.2) in the folder given as $1 (default .venv).
# torch goes first and alone; constraints.txt then stops any requirement from pulling another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
python="${PYTHON:-python3.11}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q "pip==24.3.1"
pip install -q torch==2.13.0
pip install -q -r requirements-test.txt -c constraints.txt
# ldm's real UNetModel / AutoencoderKL code, without the packages sdkit itself would pull in.
pip install -q --no-deps stable-diffusion-sdkit==2.1.5
python -c "import torch, transformers, peft; print('test env:', torch.__version__, transformers.__version__, peft.__version__)"
