#!/usr/bin/env bash
# One prepared run on a lent GPU (see /work/.library/device/README.md), about 8 minutes at most:
#   1. the kernel tests compiled for real (the same files run in Triton's interpreter in CI), 8 workers
#      so that Triton's compiles run side by side;
#   2. the kernel benchmarks at ViT-H/14 shapes (FlexAttention, slow to compile, left to step 4);
#   3. the train-step benchmarks (ViT-H/14 step eager and compiled, packed vs padded, peak memory with
#      and without activation checkpointing);
#   4. FlexAttention's cases, with what time is left.
# Writes to $OUT (default benchmarks/results/latest, git-ignored):
#   device_check.json   device, versions, commit, test counts, every benchmark figure
#   tests.log and, per benchmark part (kernels, step, flex), bench_<part>.log and bench_<part>.json
# then commit $OUT/device_check.json as benchmarks/results/<device>-<date>.json.
#
#   run: FASTJEPA_COMMIT=$(git rev-parse HEAD) bash benchmarks/device_check.sh
#   carry: wheels/ (pydantic for the trainer's config: scripts/fetch_device_wheels.sh)
#
# The GPU machine has torch, triton, timm, pytest, pytest-benchmark, pytest-xdist and pytest-timeout but
# not this package and no network: src/ goes on the path, carried wheels are unpacked into a temporary
# folder on the path.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
shim=$(mktemp -d)
if [ -d wheels ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$shim" wheels/*.whl 2>&1 | tail -2 || true
fi
export PYTHONPATH="$shim:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
started=$(date +%s)
# SIGINT first: pytest stops, still writes its summary and the benchmark JSON
stop_after() { timeout -s INT -k 20 "$@"; }

# 1. kernel tests compiled for real (the AOT test is CPU-side and runs in CI)
stop_after "${TESTS_S:-150}" "$PY" -m pytest tests/test_kernels_*.py tests/test_memory.py \
  --deselect tests/test_kernels_aot.py -q -p no:cacheprovider -rs -n "${WORKERS:-8}" --timeout=150 \
  >"$OUT/tests.log" 2>&1
tests_rc=$?
tail -3 "$OUT/tests.log"

bench() {  # name, seconds, files...  (seconds 0: the part is left out)
  local name=$1 seconds=$2; shift 2
  [ "$seconds" -gt 0 ] || return 0
  stop_after "$seconds" "$PY" -m pytest "$@" --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT/bench_$name.json" --benchmark-min-rounds=3 --benchmark-max-time=0.5 \
    >"$OUT/bench_$name.log" 2>&1
}
# 2. kernels at ViT-H shapes
bench kernels "${KERNELS_S:-100}" benchmarks/test_kernels_*.py -k "not flex"
kernels_rc=$?
tail -3 "$OUT/bench_kernels.log"
# 3. the whole step: throughput, packed vs padded, memory (needs pydantic; skipped without it)
bench step "${STEP_S:-220}" benchmarks/test_train_step.py benchmarks/test_memory.py
step_rc=$?
tail -3 "$OUT/bench_step.log"
# 4. FlexAttention (torch.compile per shape)
bench flex "${FLEX_S:-50}" benchmarks/test_kernels_attention.py -k flex
flex_rc=$?
tail -3 "$OUT/bench_flex.log"

"$PY" - "$OUT" "$tests_rc" "$kernels_rc" "$step_rc" "$flex_rc" "$started" <<'PYEOF'
import json, os, subprocess, sys, time
from pathlib import Path
import torch
out, started = Path(sys.argv[1]), int(sys.argv[6])
rcs = dict(zip(("tests_rc", "bench_kernels_rc", "bench_step_rc", "bench_flex_rc"), map(int, sys.argv[2:6])))
try:
    import triton; triton_version = triton.__version__
except ImportError:
    triton_version = None
def cmd(*args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
summary = {
    "device": torch.cuda.get_device_name() if props else "cpu",
    "sms": props.multi_processor_count if props else None,
    "gpu_memory_gb": props.total_memory / 1e9 if props else None,
    "driver": cmd("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
    "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
    "commit": os.environ.get("FASTJEPA_COMMIT") or cmd("git", "rev-parse", "HEAD"),
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": round(time.time() - started),
    **rcs, "logs": {}, "benchmarks": [],
}
for log in ("tests", "bench_kernels", "bench_step", "bench_flex"):
    path = out / f"{log}.log"
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else ["(not run)"]
    summary["logs"][log] = [l for l in lines if l.startswith(("FAILED", "ERROR", "SKIPPED"))][:40] + lines[-1:]
for name in ("kernels", "step", "flex"):
    path = out / f"bench_{name}.json"
    if path.exists():
        for b in json.loads(path.read_text()).get("benchmarks", []):
            summary["benchmarks"].append({"name": b["fullname"], "median_s": b["stats"]["median"],
                                          "rounds": b["stats"]["rounds"], **b.get("extra_info", {})})
(out / "device_check.json").write_text(json.dumps(summary, indent=1, default=str))
print(json.dumps({k: summary[k] for k in ("device", "torch", "triton", "commit", *rcs, "wall_s")}))
PYEOF
