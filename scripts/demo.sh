#!/usr/bin/env bash
# The demo: set up, pretrain configs/demo.json on Fashion-MNIST (CPU, a few minutes), then
# linear-probe the pretrained target encoder and the same architecture at random init.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${1:-runs/demo}
shift || true
.venv/bin/python fastjepa/train.py --config configs/demo.json --output-dir "$OUT" "$@"
echo "== linear probe: pretrained target encoder"
.venv/bin/python -m fastjepa.eval.linear_probe --checkpoint "$OUT"
echo "== linear probe: same architecture, random init"
.venv/bin/python -m fastjepa.eval.linear_probe --checkpoint "$OUT" --random-init
