#!/usr/bin/env bash
# Download the small pure-Python/binary wheels the GPU machine lacks (Python 3.12, x86-64) into wheels/,
# so `run(carry=["wheels"])` can take them along for benchmarks/device_check.sh (the train-step benchmark
# needs pydantic; the GPU machine has no network).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d wheels \
  "pydantic>=2" tqdm safetensors hypothesis
du -sh wheels
