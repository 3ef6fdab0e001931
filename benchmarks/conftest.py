"""Shared set-up for the benchmarks: the ``bench_tools`` fixture over ``harness.py`` (device description,
a trainer from a config file, the practical peaks of a device) and the ``official`` fixture (the official
I-JEPA code, ``official.py``).

CPU runs use ``FASTJEPA_BENCH_THREADS`` torch threads (default 1: the development machines have 2 cores
that are usually shared, and two threads fighting for one core make small ops ~100x slower).
"""
from __future__ import annotations

import os
import types

import pytest
import torch

import harness  # noqa: I001  (first: it sets TRITON_INTERPRET before any fastjepa_kernels import)
import official as official_code

REPO, CONFIGS = harness.REPO, harness.CONFIGS


@pytest.fixture(scope="session", autouse=True)
def _threads():
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("FASTJEPA_BENCH_THREADS", "1")))


@pytest.fixture
def bench_tools():
    names = ("REPO", "CONFIGS", "describe", "synchronize", "measured_gemm_tflops", "build_trainer", "time_call",
             "copy_gbps", "per_call_seconds", "fashion_mnist_or_synthetic")
    return types.SimpleNamespace(**{name: getattr(harness, name) for name in names})


@pytest.fixture(scope="session")
def official():
    """The official I-JEPA modules (``official.load()``); skips with the reason when the code is absent."""
    if official_code.source() is None:
        pytest.skip(official_code.why_absent())
    return official_code.load()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After pytest-benchmark's timing tables, the figures a person reads (``fastjepa.bench_report``): each
    benchmark's images/s, TFLOP/s or GB/s, the fraction of the device's peak and the ratio against its peer.
    ``--benchmark-json`` keeps everything; ``fastjepa bench-report FILE.json`` prints this table again."""
    session = getattr(config, "_benchmarksession", None)
    done = [b for b in getattr(session, "benchmarks", []) if getattr(b, "stats", None) is not None]
    if not done:
        return
    from fastjepa import bench_report

    raw = {"benchmarks": [{"name": b.name, "fullname": b.fullname, "stats": {"median": b.stats.median},
                           "extra_info": dict(b.extra_info)} for b in done]}
    terminalreporter.write_sep("-", "fastjepa throughput summary")
    terminalreporter.write_line(bench_report.render(bench_report.rows(raw)))
