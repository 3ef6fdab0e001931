"""Every Triton kernel variant compiles for Ampere (sm_80) and Hopper (sm_90) on this CPU machine.

Runs ``python -m fastjepa_kernels.aot --json`` in a child process without ``TRITON_INTERPRET`` (the
test session runs kernels in the interpreter) and checks, per variant and architecture: it compiled,
its shared memory fits the chip, and tensor-core kernels use ``wgmma`` on sm_90.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.subprocess


@pytest.fixture(scope="module")
def aot_results(helpers):
    env = helpers.subprocess_env()
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "fastjepa_kernels.aot", "--json", "--arch", "80", "90",
                           "--jobs", str(min(4, os.cpu_count() or 1))],
                          capture_output=True, text=True, env=env, timeout=1800)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, f"no variants reported:\n{proc.stderr[-3000:]}"
    return rows


def test_every_variant_compiles_within_limits(aot_results):
    bad = [f"sm_{r['arch']} {r['name']}: error={r['error']} shared={r['shared_bytes']}/{r['shared_limit']} "
           f"wgmma={r['uses_wgmma']} (wanted {r['wants_wgmma']})" for r in aot_results if not r["ok"]]
    assert not bad, "\n".join(bad)


def test_both_architectures_cover_the_same_variants(aot_results):
    by_arch = {arch: sorted(r["name"] for r in aot_results if r["arch"] == arch) for arch in (80, 90)}
    assert by_arch[80] == by_arch[90] and by_arch[80]


@pytest.mark.parametrize("family", ["attention", "gather", "target_loss", "ema", "layer_norm", "bias_gelu"])
def test_each_kernel_family_is_listed(aot_results, family):
    assert any(r["name"].startswith(family) for r in aot_results), f"no AOT variants named {family}*"


def test_hopper_attention_uses_wgmma(aot_results):
    attention = [r for r in aot_results if r["arch"] == 90 and r["name"].startswith("attention") and r["wants_wgmma"]]
    assert attention and all(r["uses_wgmma"] for r in attention)
