"""``benchmarks/device_check.sh --dry-run``: every stage of the GPU check runs on CPU and lands in one JSON.

The tests stage gets a selection of its own here (``DEVICE_CHECK_TESTS``): one passing, one failing and
one erroring test, so the summary must name the two that did not pass. The stage budgets must add up to
at most 8 minutes, and the script's header must hold the device call that carries what it needs.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.sh"
STAGES = ["setup", "tests", "profile", "kernels", "step", "peers", "zero", "flex"]

FAILING_TESTS = '''
import pytest

def test_passes():
    assert 1 + 1 == 2

def test_fails_on_purpose():
    assert sum([1, 2]) == 4

@pytest.fixture
def broken():
    raise RuntimeError("a fixture that breaks")

def test_errors_on_purpose(broken):
    pass
'''


@pytest.mark.subprocess
def test_dry_run_records_every_stage_and_names_failures(tmp_path, helpers):
    selection = tmp_path / "selection" / "test_on_purpose.py"
    selection.parent.mkdir()
    selection.write_text(FAILING_TESTS)
    out = tmp_path / "out"
    env = helpers.subprocess_env(OUT=out, PYTHON=sys.executable, DEVICE_CHECK_TESTS=str(selection),
                                 FASTJEPA_COMMIT="0" * 40)
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    summary = json.loads((out / "device_check.json").read_text())

    assert summary["dry_run"] is True and summary["commit"] == "0" * 40
    assert list(summary["stages"]) == STAGES
    assert summary["stage_budgets_s"] == sum(s["budget_s"] for s in summary["stages"].values()) <= 480
    for name, stage in summary["stages"].items():
        assert set(stage) >= {"rc", "timed_out", "budget_s", "wall_s", "failed", "summary"}, name
        assert (out / f"{name}.log").is_file(), name
    tests = summary["stages"]["tests"]
    assert tests["rc"] == 1
    # node ids as pytest prints them (relative to its rootdir)
    assert [name.split("/")[-1] for name in tests["failed"]] == [
        "test_on_purpose.py::test_fails_on_purpose", "test_on_purpose.py::test_errors_on_purpose"]
    assert summary["failures"] == [f"tests: {name}" for name in tests["failed"]]
    assert "1 failed, 1 passed, 1 error" in tests["summary"]
    for name in STAGES:
        if name != "tests":
            assert summary["stages"][name]["rc"] == 0, (name, summary["stages"][name]["summary"])
    # the stages that run on CPU left their figures
    profile = summary["profile"]
    assert profile["device_type"] == "cpu" and "GEMM" in profile["categories"]
    names = [b["name"] for b in summary["benchmarks"]]
    assert any("test_train_step[demo-cpu]" in n for n in names)
    zero = {b["case"]: b for b in summary["benchmarks"] if b["stage"] == "zero"}
    if zero:  # DeepSpeed installed
        assert set(zero) == {"plain", "zero2", "zero3"} and zero["zero3"]["zero_stage"] == 3
        assert all(b["images_per_s"] > 0 for b in zero.values())


def test_header_holds_the_device_call_and_the_budgets():
    text = SCRIPT.read_text()
    header = text.split("set -uo pipefail")[0]
    assert re.search(r'run\(command="FASTJEPA_COMMIT=.*bash benchmarks/device_check\.sh",\s*#?\s*'
                     r'carry=\["wheels", "\.peers"\]', header)
    table = dict(re.findall(r"^#   (\w+) .* (\d+) s$", header, flags=re.M))
    assert list(table) == STAGES
    assert sum(map(int, table.values())) <= 480
    for name, seconds in table.items():  # the header says what the script does
        assert re.search(rf"stage {name} {seconds} ", text), name
