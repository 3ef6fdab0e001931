#!/usr/bin/env bash
# One prepared run on a lent GPU (see /work/.library/device/README.md), 8 minutes at most (the stage
# budgets below add up to 470 s; each stage is stopped with SIGINT at its budget, so pytest still writes
# its summary and its benchmark JSON):
#   setup    unpack the carried wheels (pydantic, DeepSpeed and their pure-Python dependencies)   15 s
#   tests    GPU tests: kernels compiled for real, memory, parity, the profile; failures named  110 s
#   profile  benchmarks/profile_step.py: the ViT-H/14 step (batch 128, bf16) per category          60 s
#   kernels  kernel benchmarks at ViT-H/14 shapes (FlexAttention left to the last stage)            45 s
#   step     train-step benchmarks (eager and compiled, packed vs padded, peak memory)             60 s
#   peers    the official I-JEPA step beside fastjepa's (benchmarks/test_peers.py)                 60 s
#   zero     the ViT-H/14 step under ZeRO-2 and ZeRO-3 on the one GPU, beside the plain step       90 s
#   flex     FlexAttention's cases (torch.compile per shape), with what time is left               30 s
# Writes to $OUT (default benchmarks/results/latest, git-ignored):
#   device_check.json   device, versions, commit, per stage: rc, wall time, budget, the summary line,
#                       failing tests by name; every benchmark figure; the profile table
#   <stage>.log, bench_<stage>.json, profile.json
# then commit $OUT/device_check.json as benchmarks/results/<device>-<date>-<commit>.json.
#
#   --dry-run (or DRY_RUN=1): every stage on CPU in seconds (tiny sizes, -k selections, --collect-only
#   where a stage cannot run on a CPU), the same JSON; tests/test_device_check.py runs it in CI.
#   DEVICE_CHECK_TESTS: replaces the test selection of the tests stage (the CI test adds a failing one).
#
# Before the call, on the development machine:
#   bash scripts/fetch_device_wheels.sh     # wheels/ and .peers/ijepa (both git-ignored)
# The call (the device tool; $OUT is set there, the commit is passed in since .git does not travel):
#   run(command="FASTJEPA_COMMIT=$(git rev-parse HEAD) bash benchmarks/device_check.sh",
#       carry=["wheels", ".peers"], timeout_s=540)
# with the commit written out, e.g. command="FASTJEPA_COMMIT=af5fd1e... bash benchmarks/device_check.sh".
#
# The GPU machine has torch, triton, timm, pytest, pytest-benchmark, pytest-xdist and pytest-timeout but
# not this package, pydantic or DeepSpeed, and no network: src/ goes on the path, the carried wheels are
# unpacked into a temporary folder on the path, FASTJEPA_OFFICIAL_SRC points at the carried official code.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
STAGES="$OUT/stages.tsv"
: >"$STAGES"
started=$(date +%s)
export PYTHONUNBUFFERED=1
if [ -z "${FASTJEPA_OFFICIAL_SRC:-}" ] && [ -d .peers/ijepa ]; then
  export FASTJEPA_OFFICIAL_SRC="$PWD/.peers/ijepa"
fi

# stage NAME BUDGET_S COMMAND...: run with SIGINT at the budget, log to $OUT/NAME.log, record the result
stage() {
  local name=$1 budget=$2; shift 2
  local t0 rc
  t0=$(date +%s)
  timeout -s INT -k 20 "$budget" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$budget" "$(( $(date +%s) - t0 ))" >>"$STAGES"
  echo "[$name] rc=$rc in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/$name.log")"
}

# setup: the carried wheels, unpacked into a folder on the path
shim=$(mktemp -d)
unpack() {
  if ! compgen -G "wheels/*.whl" >/dev/null; then
    echo "no wheels/ folder: nothing to unpack (scripts/fetch_device_wheels.sh)"
  elif [ "$DRY" = 1 ]; then  # the wheels are for the GPU machine's Python 3.12: listed, not installed
    ls wheels && du -sh wheels
  else
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$shim" wheels/*.whl && ls "$shim"
  fi
}
export -f unpack
export DRY PY shim
stage setup 15 bash -c unpack
export PYTHONPATH="$shim:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfE)
PARALLEL=()
"$PY" -c "import xdist" 2>/dev/null && PARALLEL+=(-n "${WORKERS:-8}")
"$PY" -c "import pytest_timeout" 2>/dev/null && PARALLEL+=(--timeout=150)
bench_args() {  # the pytest-benchmark options of one stage
  echo "--benchmark-only --benchmark-json=$OUT/bench_$1.json --benchmark-min-rounds=3 --benchmark-max-time=0.5"
}

if [ "$DRY" = 1 ]; then
  # tests: a few that run on CPU in seconds (the kernels in Triton's interpreter)
  read -r -a TESTS <<<"${DEVICE_CHECK_TESTS:-tests/test_kernels_target_loss.py::test_custom_op_passes_opcheck \
tests/test_parity_official.py::test_the_encoders_eps_in_the_target_norm_is_a_visible_deviation}"
  stage tests 110 "${PYTEST[@]}" "${TESTS[@]}"
  stage profile 60 "$PY" benchmarks/profile_step.py --config demo --device cpu --batch 8 --steps 1 --warmup 1 \
    --json "$OUT/profile.json"
  # shellcheck disable=SC2046
  stage kernels 45 "${PYTEST[@]}" benchmarks/test_kernels_attention.py benchmarks/test_kernels_ema.py \
    benchmarks/test_kernels_gather.py benchmarks/test_kernels_target_loss.py -k "not flex" --collect-only
  # shellcheck disable=SC2046
  stage step 60 "${PYTEST[@]}" benchmarks/test_train_step.py -k "test_train_step and demo" $(bench_args step)
  # shellcheck disable=SC2046
  FASTJEPA_BENCH_PEER_CPU_BATCH=8 stage peers 60 "${PYTEST[@]}" benchmarks/test_peers.py -k "demo-cpu-truncate" \
    $(bench_args peers)
  # shellcheck disable=SC2046
  DS_ACCELERATOR=cpu stage zero 90 "${PYTEST[@]}" benchmarks/test_zero_step.py $(bench_args zero)
  stage flex 30 "${PYTEST[@]}" benchmarks/test_kernels_attention.py -k flex --collect-only
else
  read -r -a TESTS <<<"${DEVICE_CHECK_TESTS:-tests/test_kernels_*.py tests/test_memory.py tests/test_parity_official.py tests/test_profile_step.py}"
  # shellcheck disable=SC2068  (unquoted: the default selection holds a glob)
  stage tests 110 "${PYTEST[@]}" ${TESTS[@]} --deselect tests/test_kernels_aot.py "${PARALLEL[@]}"
  stage profile 60 "$PY" benchmarks/profile_step.py --config vith14 --device cuda --batch 128 --steps 3 \
    --json "$OUT/profile.json"
  # shellcheck disable=SC2046
  stage kernels 45 "${PYTEST[@]}" benchmarks/test_kernels_*.py -k "not flex" $(bench_args kernels)
  # shellcheck disable=SC2046
  stage step 60 "${PYTEST[@]}" benchmarks/test_train_step.py benchmarks/test_memory.py $(bench_args step)
  # shellcheck disable=SC2046
  stage peers 60 "${PYTEST[@]}" benchmarks/test_peers.py -k cuda $(bench_args peers)
  # shellcheck disable=SC2046
  stage zero 90 "${PYTEST[@]}" benchmarks/test_zero_step.py $(bench_args zero)
  # shellcheck disable=SC2046
  stage flex 30 "${PYTEST[@]}" benchmarks/test_kernels_attention.py -k flex $(bench_args flex)
fi

"$PY" - "$OUT" "$started" "$DRY" <<'PYEOF'
import json, os, re, subprocess, sys, time
from pathlib import Path
import torch
out, started, dry = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
BUDGET_S = 480
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
stages, failures = {}, []
for line in (out / "stages.tsv").read_text().splitlines():
    name, rc, budget, wall = line.split("\t")
    log = out / f"{name}.log"
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    failed = [l.split()[1] for l in lines if re.match(r"(FAILED|ERROR) \S", l)]
    failures += [f"{name}: {f}" for f in failed]
    stages[name] = {"rc": int(rc), "timed_out": int(rc) in (124, 137), "budget_s": int(budget), "wall_s": int(wall),
                    "failed": failed, "skipped": [l for l in lines if l.startswith("SKIPPED")][:20],
                    "summary": lines[-1] if lines else "(no output)"}
summary = {
    "dry_run": dry,
    "device": torch.cuda.get_device_name() if props else "cpu",
    "sms": props.multi_processor_count if props else None,
    "gpu_memory_gb": props.total_memory / 1e9 if props else None,
    "driver": cmd("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
    "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
    "commit": os.environ.get("FASTJEPA_COMMIT") or cmd("git", "rev-parse", "HEAD"),
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": round(time.time() - started),
    "budget_s": BUDGET_S, "stage_budgets_s": sum(s["budget_s"] for s in stages.values()),
    "official_src": os.environ.get("FASTJEPA_OFFICIAL_SRC"),
    "stages": stages, "failures": failures, "benchmarks": [], "profile": None,
}
for name in stages:
    path = out / f"bench_{name}.json"
    if path.exists():
        for b in json.loads(path.read_text()).get("benchmarks", []):
            summary["benchmarks"].append({"stage": name, "name": b["fullname"], "median_s": b["stats"]["median"],
                                          "rounds": b["stats"]["rounds"], **b.get("extra_info", {})})
if (out / "profile.json").exists():
    summary["profile"] = json.loads((out / "profile.json").read_text())
(out / "device_check.json").write_text(json.dumps(summary, indent=1, default=str))
print(json.dumps({"device": summary["device"], "commit": summary["commit"], "wall_s": summary["wall_s"],
                  **{k: v["rc"] for k, v in stages.items()}, "failures": failures[:20]}))
PYEOF
