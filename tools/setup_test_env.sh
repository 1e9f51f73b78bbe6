#!/usr/bin/env bash
# Build the pinned test environment (A1111 v1.10.1's runtime: Python 3.11, transformers 4.30.2,
# gradio 3.41.2, peft 0.13.2 ...) in the folder given as $1 (default .venv), with torch $TORCH_VERSION:
# 2.13.0, a CPU build (the default), or 2.1.2, the release A1111 v1.10.1's launcher installs (PyPI's
# CUDA 12.1 build, which runs on the CPU too).
# torch goes first and alone; the constraint then stops any requirement from pulling another torch.
# Given as PIP_CONSTRAINT, it also replaces a machine-wide torch cap from pip's config, if any.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
torch_version="${TORCH_VERSION:-2.13.0}"
python="${PYTHON:-python3.11}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"
export PIP_CONSTRAINT="$constraints"
pip install -q "pip==24.3.1"
pip install -q "torch==$torch_version"
pip install -q -r requirements-test.txt
# bitsandbytes 0.50 steps its 8-bit optimizers on the CPU, with torch 2.4 or newer: on 2.13 the tests train
# with them; the 2.1.2 environment goes without and checks the message that says how to install it.
if [ "$torch_version" = "2.13.0" ]; then
    pip install -q "bitsandbytes==0.50.2"
fi
# ldm's real UNetModel / AutoencoderKL code, without the packages sdkit itself would pull in.
pip install -q --no-deps stable-diffusion-sdkit==2.1.5
python -c "import torch, transformers, peft; print('test env:', torch.__version__, transformers.__version__, peft.__version__)"
