#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (Python 3.12, x86-64) into wheels/, so that
# `run(carry=["wheels"])` can take them along for benchmarks/device_check.sh: pydantic (the trainer's
# config) and its dependencies, typing-extensions included (pydantic pins a recent one; the copy in the
# carried folder comes first on the path).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf wheels
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d wheels "pydantic>=2"
ls wheels
du -sh wheels
