#!/usr/bin/env bash
# One prepared run on a lent GPU (see /work/.library/device/README.md): the kernel tests compiled for
# real, the AOT check, the kernel and train-step benchmarks, in about 8 minutes. Writes
#   $OUT/device_check.json   device, versions, commit, test counts, every benchmark figure
#   $OUT/tests.log, $OUT/bench.log, $OUT/benchmarks.json
# then commit $OUT/device_check.json as benchmarks/results/<device>-<date>.json.
#
#   run: bash benchmarks/device_check.sh            (OUT defaults to benchmarks/results/latest)
#   carry: wheels/ (optional; pydantic & co. for the train-step benchmark: scripts/fetch_device_wheels.sh)
#
# The GPU machine has torch, triton, timm, pytest and pytest-benchmark but not this package: it is put on
# the path with a symlink (fastjepa_kernels -> kernels/) instead of a pip install.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
PY=${PYTHON:-python}
shim=$(mktemp -d)
ln -s "$PWD/kernels" "$shim/fastjepa_kernels"
export PYTHONPATH="$shim:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d wheels ]; then
  "$PY" -m pip install -q --no-index --find-links wheels wheels/*.whl 2>&1 | tail -2 || true
fi
started=$(date +%s)

# 1. kernel tests, compiled for real on the GPU (the same files run in the interpreter in CI)
timeout 270 "$PY" -m pytest tests/test_kernels_*.py -q -p no:cacheprovider -rs --continue-on-collection-errors >"$OUT/tests.log" 2>&1
tests_rc=$?
tail -3 "$OUT/tests.log"

# 2. benchmarks: kernels at ViT-H shapes, then the train step (needs pydantic; skipped without it)
timeout 240 "$PY" -m pytest benchmarks/test_kernels_*.py benchmarks/test_train_step.py --benchmark-only -q \
  -p no:cacheprovider --benchmark-json="$OUT/benchmarks.json" --benchmark-min-rounds=3 \
  --benchmark-max-time=0.5 >"$OUT/bench.log" 2>&1
bench_rc=$?
tail -3 "$OUT/bench.log"

"$PY" - "$OUT" "$tests_rc" "$bench_rc" "$started" <<'PYEOF'
import json, subprocess, sys, time
from pathlib import Path
import torch
out, tests_rc, bench_rc, started = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
try:
    import triton; triton_version = triton.__version__
except ImportError:
    triton_version = None
def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None
summary = {
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
    "commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain")),
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": round(time.time() - started),
    "tests_rc": tests_rc, "bench_rc": bench_rc,
    "tests_tail": (out / "tests.log").read_text().strip().splitlines()[-1:] if (out / "tests.log").exists() else [],
    "benchmarks": [],
}
bench = out / "benchmarks.json"
if bench.exists():
    for b in json.loads(bench.read_text()).get("benchmarks", []):
        summary["benchmarks"].append({"name": b["fullname"], "median_s": b["stats"]["median"],
                                      "rounds": b["stats"]["rounds"], **b.get("extra_info", {})})
(out / "device_check.json").write_text(json.dumps(summary, indent=1, default=str))
print(json.dumps({k: summary[k] for k in ("device", "torch", "triton", "commit", "tests_rc", "bench_rc", "wall_s")}))
PYEOF
