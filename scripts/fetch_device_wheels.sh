#!/usr/bin/env bash
# Prepare what benchmarks/device_check.sh carries to the GPU machine (Python 3.12, x86-64, no network;
# it has torch, numpy, triton, timm, pytest and pytest-benchmark), both git-ignored:
#   wheels/       pydantic (the trainer's config) and its dependencies; DeepSpeed and its pure-Python and
#                 small binary dependencies (hjson, msgpack, ninja, psutil, py-cpuinfo, einops, packaging,
#                 tqdm). DeepSpeed is published as a source archive only: its wheel is built here, without
#                 its C++/CUDA ops (DS_BUILD_OPS=0, so pure Python; the client AdamW needs none) and marked
#                 for the CUDA accelerator. A few MB in all (a device call carries 64 MiB).
#   .peers/ijepa  a copy of the official I-JEPA code (FASTJEPA_OFFICIAL_SRC, else ../shared/peers/ijepa)
#                 for the parity test and the peer benchmark; never committed.
# Then: run(command="FASTJEPA_COMMIT=<sha> bash benchmarks/device_check.sh", carry=["wheels", ".peers"]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEEPSPEED=${FASTJEPA_DEEPSPEED:-deepspeed==0.19.8}
rm -rf wheels
"$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none --platform manylinux2010_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -d wheels "pydantic>=2" hjson msgpack ninja psutil py-cpuinfo einops packaging tqdm
# the DeepSpeed wheel: built from its source archive against the torch here (its setup.py imports torch)
DS_ACCELERATOR=cuda DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps \
  --no-build-isolation -w wheels "$DEEPSPEED"
official=${FASTJEPA_OFFICIAL_SRC:-../shared/peers/ijepa}
if [ -f "$official/src/models/vision_transformer.py" ]; then
  rm -rf .peers/ijepa
  mkdir -p .peers
  cp -r "$official" .peers/ijepa
  rm -rf .peers/ijepa/.git
  echo "official code: $official -> .peers/ijepa ($(du -sh .peers/ijepa | cut -f1))"
else
  echo "official code not found at $official: the parity test and the peer benchmark will skip there" >&2
fi
ls wheels
du -sh wheels
