#!/usr/bin/env bash
# Set up .venv with everything IPv2 Denoise needs, from pip's own configured package index.
#   bash scripts/setup.sh          core + CLI
#   bash scripts/setup.sh --test   also pytest, ruff, slicer-core (MRML tests), pydicom-data, Ray (the [cluster] extra),
#                                  trame-slicer (the [web] extra) and playwright, and (as root, with apt) the system
#                                  packages the tests use: dicom3tools, Orthanc, Chromium and Mesa EGL (browser tests)
# pip's own index is never replaced: pip uses its configuration (pip.conf, PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL), so setup works behind a hospital or company mirror.
# torch: the CUDA build only where an NVIDIA GPU is found; otherwise the CPU build — never the
# multi-GB CUDA build without a GPU. The CPU build comes from, in this order: a local wheel pip can
# find without an index (--find-links in pip's configuration); "torch==X+cpu" from pip's configured
# index (a mirror that carries PyTorch's CPU wheels); "torch==X+cpu" with TORCH_CPU_INDEX_URL as an
# *extra* index (default PyTorch's public CPU index). The "+cpu" pin means a CUDA wheel can never
# be picked; without any source of it, setup stops with exit 2 and says what to set.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
# Only for torch's "+cpu" build, added to (never replacing) pip's own index; set it to your mirror.
TORCH_CPU_INDEX_URL=${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}

# bin/activate is written last: a venv without it is half made (python3-venv missing on Debian/Ubuntu,
# where `python3 -m venv` fails after writing bin/python), and is made again from scratch.
if [ ! -f .venv/bin/activate ]; then
  if ! "$PYTHON" -m venv --clear .venv; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "setup: $PYTHON -m venv failed; installing python3-venv with apt and trying again"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
      "$PYTHON" -m venv --clear .venv
    else
      echo "setup: $PYTHON -m venv failed; on Debian/Ubuntu run as root:  apt-get install -y python3-venv" >&2
      echo "setup: then run this again" >&2
      exit 2
    fi
  fi
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null

if ! python -c "import torch" 2>/dev/null; then
  # An NVIDIA GPU: `nvidia-smi -L` lists one, or NVIDIA's kernel driver does (/proc/driver/nvidia/gpus).
  # The Slicer module decides by the same rule (slicer_support/dependencies.py, nvidia_gpu_present).
  if { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; } \
    || [ -n "$(ls -A /proc/driver/nvidia/gpus 2>/dev/null)" ]; then
    echo "setup: NVIDIA GPU found, installing torch==$TORCH_VERSION (CUDA build)"
    pip install -q "torch==$TORCH_VERSION"
  elif pip install -q --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
    echo "setup: no NVIDIA GPU, installed the local CPU build of torch==$TORCH_VERSION"
    pip install -q "torch==$TORCH_VERSION"   # its small dependencies; torch itself is satisfied
  elif [ "$(uname -s)" = Darwin ]; then
    echo "setup: macOS, installing torch==$TORCH_VERSION (CPU/MPS build) from pip's configured index"
    pip install -q "torch==$TORCH_VERSION"
  elif pip install -q "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
    echo "setup: no NVIDIA GPU, installed torch==$TORCH_VERSION+cpu from pip's configured index"
  elif pip install -q "torch==$TORCH_VERSION+cpu" --extra-index-url "$TORCH_CPU_INDEX_URL"; then
    echo "setup: no NVIDIA GPU, installed torch==$TORCH_VERSION+cpu (extra index $TORCH_CPU_INDEX_URL)"
  else
    echo "setup: no NVIDIA GPU and no CPU build of torch==$TORCH_VERSION on pip's configured index;" >&2
    echo "setup: set TORCH_CPU_INDEX_URL to an index holding torch==$TORCH_VERSION+cpu (e.g. your mirror of" >&2
    echo "setup: PyTorch's CPU wheels) and run this again; the CUDA build is never installed without a GPU" >&2
    exit 2
  fi
fi

if [ "${1:-}" = "--test" ]; then
  # System packages the tests use: dicom3tools (dciodvfy checks derived series), Orthanc and its
  # DICOMweb plugin (the real PACS of the DICOM network tests), Debian's Chromium and Mesa's EGL
  # (offscreen rendering) for the browser tests of `ipv2-denoise web` (playwright drives that
  # Chromium: no browser download). Installed with apt as root;
  # otherwise setup stops and prints the command to run.
  need=()
  command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
  command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
  [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  compgen -G '/usr/lib/*/libEGL.so.1' >/dev/null || need+=(libegl1)
  compgen -G '/usr/lib/*/libEGL_mesa.so.0' >/dev/null || need+=(libegl-mesa0)
  compgen -G '/usr/lib/*/dri/swrast_dri.so' >/dev/null || need+=(libgl1-mesa-dri)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "setup: installing system packages for the tests: ${need[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
      # Debian starts Orthanc as a service on install; the tests start their own on free loopback ports
      if command -v systemctl >/dev/null 2>&1; then systemctl stop orthanc >/dev/null 2>&1 || true; fi
    else
      echo "setup: the tests need system packages that are missing: ${need[*]}" >&2
      echo "setup: run as root:  apt-get update && apt-get install -y ${need[*]}" >&2
      echo "setup: then run this again" >&2
      exit 2
    fi
  fi
  pip install -q -e ".[test,cluster,web]"
else
  pip install -q -e .
fi
python -c "import torch, IPv2DenoiseLib; print(f'setup: torch {torch.__version__}, ipv2-denoise {IPv2DenoiseLib.__version__} ready in .venv')"
