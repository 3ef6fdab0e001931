#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with fastjepa, its test tools and the demo
# data set. Re-running is cheap. FASTJEPA_TORCH overrides the torch requirement (default: the CPU
# build the development machines carry, torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "${FASTJEPA_TORCH:-torch==2.13.0}" "triton==3.6.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
# timm for the drop-in tests; --no-deps: its torchvision pin cannot import beside a CPU-only torch build
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "timm>=1.0"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "setup: could not install dataset-fashion-mnist; the demo and its tests need it" >&2
  else
    echo "setup: Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist'" >&2
  fi
fi
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
