#!/usr/bin/env bash
# The demo: set up, pretrain the packaged demo config on Fashion-MNIST (CPU, a few minutes), then
# linear-probe the pretrained target encoder and the same architecture at random init.
#   bash scripts/demo.sh [--output-dir DIR] [section.key=value ...]   (default DIR: runs/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${FASTJEPA_DEMO_DIR:-runs/demo}
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --output-dir) OUT=$2; shift 2 ;;
    --output-dir=*) OUT=${1#*=}; shift ;;
    *=*) args+=("$1"); shift ;;
    *) echo "demo.sh: '$1' is neither --output-dir DIR nor a section.key=value override" >&2; exit 2 ;;
  esac
done
bash scripts/setup.sh
.venv/bin/python -m fastjepa train --config demo --output-dir "$OUT" ${args[@]+"${args[@]}"}
echo "== linear probe: pretrained target encoder"
.venv/bin/python -m fastjepa probe --checkpoint "$OUT"
echo "== linear probe: same architecture, random init"
.venv/bin/python -m fastjepa probe --checkpoint "$OUT" --random-init
