#!/usr/bin/env bash
# Set up .venv with everything IPv2 Denoise needs, from the package registries only.
#   bash scripts/setup.sh          core + CLI
#   bash scripts/setup.sh --test   also pytest, ruff, slicer-core (MRML tests) and Ray (the [cluster] extra)
# torch: the CUDA build only where an NVIDIA GPU answers; otherwise the CPU build (a local wheel
# when the machine has one, else PyTorch's CPU index) — never the multi-GB CUDA build without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing torch==$TORCH_VERSION (CUDA build)"
    pip install -q "torch==$TORCH_VERSION"
  elif pip install -q --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
    echo "setup: no NVIDIA GPU, installed the local CPU build of torch==$TORCH_VERSION"
    pip install -q "torch==$TORCH_VERSION"   # its small dependencies; torch itself is satisfied
  else
    echo "setup: no NVIDIA GPU, installing the CPU build of torch==$TORCH_VERSION"
    pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
fi

if [ "${1:-}" = "--test" ]; then
  pip install -q -e ".[test,cluster]"
else
  pip install -q -e .
fi
python -c "import torch, IPv2DenoiseLib; print(f'setup: torch {torch.__version__}, ipv2-denoise {IPv2DenoiseLib.__version__} ready in .venv')"
