#!/usr/bin/env bash
# Set up a fresh CPU machine in .venv (re-running is cheap):
#   bash scripts/setup.sh          what the demo needs: torch (the CPU build), fastjepa, the Fashion-MNIST data
#   bash scripts/setup.sh --test   also the test tools: triton (its interpreter runs the kernels on the CPU),
#                                  pytest, DeepSpeed, NVIDIA DALI (CPU pipelines), scikit-learn, matplotlib, timm
# FASTJEPA_TORCH overrides the torch requirement (default: torch==2.13.0, the CPU build the development machines
# carry). On a machine that already has torch, skip this script: pip install -e . (see the README's Install).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
tests=0
[ "${1:-}" = "--test" ] && tests=1
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if [ "$tests" = 1 ]; then
  # triton pinned with the CPU torch build (a CUDA build of torch brings its own)
  "${PIP[@]}" "${FASTJEPA_TORCH:-torch==2.13.0}" "triton==3.6.0"
  "${PIP[@]}" -e ".[test]"
  # timm for the drop-in tests; --no-deps: its torchvision pin cannot import beside a CPU-only torch build
  "${PIP[@]}" --no-deps "timm>=1.0"
else
  "${PIP[@]}" "${FASTJEPA_TORCH:-torch==2.13.0}"
  "${PIP[@]}" -e .
fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "setup: could not install dataset-fashion-mnist; the demo and its tests need it" >&2
  else
    echo "setup: Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist'" >&2
  fi
fi
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
