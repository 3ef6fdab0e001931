"""``fastjepa bench-report``: figures, fractions of peak and ratios against the peer, from both file formats."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastjepa import bench_report

RESULTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "results").glob("*.json"))


def pytest_benchmark_json(cases: dict) -> dict:
    """pytest-benchmark's layout: name -> (median seconds, extra_info)."""
    return {"machine_info": {"node": "box"}, "benchmarks": [
        {"name": n.split("::")[-1], "fullname": n, "stats": {"median": s}, "extra_info": e} for n, (s, e) in cases.items()]}


def test_ratio_against_the_fastest_other_provider():
    raw = pytest_benchmark_json({
        "b.py::test_attn[ctx-triton-fwd]": (2.0, {"provider": "triton", "tflops": 50.0, "fraction_of_peak": 0.05}),
        "b.py::test_attn[ctx-sdpa_cudnn-fwd]": (3.0, {"provider": "sdpa_cudnn", "tflops": 33.3}),
        "b.py::test_attn[ctx-varlen_attn-fwd]": (2.5, {"provider": "varlen_attn", "tflops": 40.0}),
        "b.py::test_attn[ctx-triton-full]": (8.0, {"provider": "triton", "tflops": 10.0}),
        "b.py::test_attn[ctx-varlen_attn-full]": (4.0, {"provider": "varlen_attn", "tflops": 20.0}),
        "b.py::test_ema[triton]": (1.0, {"method": "triton", "GB/s": 2800.0, "fraction_of_copy_bandwidth": 0.95,
                                         "speedup_vs_official_loop": 5.1}),
        "b.py::test_step[vith14]": (0.4, {"images_per_s": 320.0, "mfu": 0.3}),
    })
    table = {r.name: r for r in bench_report.rows(raw)}
    fwd = table["test_attn[ctx-triton-fwd]"]
    assert (fwd.value, fwd.unit, fwd.fraction) == (50.0, "TFLOP/s", 0.05)
    assert fwd.peer == "varlen_attn" and fwd.ratio == pytest.approx(2.5 / 2.0)  # the fastest other provider
    full = table["test_attn[ctx-triton-full]"]
    assert full.peer == "varlen_attn" and full.ratio == pytest.approx(0.5)  # behind: below 1
    assert table["test_attn[ctx-sdpa_cudnn-fwd]"].ratio is None  # peers are not compared with each other
    ema = table["test_ema[triton]"]
    assert (ema.unit, ema.fraction, ema.peer, ema.ratio) == ("GB/s", 0.95, "official_loop", 5.1)
    step = table["test_step[vith14]"]
    assert (step.value, step.unit, step.fraction, step.ratio) == (320.0, "images/s", 0.3, None)
    text = bench_report.render(list(table.values()))
    assert "1.25x varlen_attn" in text and "0.50x varlen_attn" in text and "320 images/s" in text


@pytest.mark.skipif(not RESULTS, reason="no committed device-check results")
@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_committed_results_render(path, capsys):
    raw = json.loads(path.read_text())
    assert bench_report.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert len(bench_report.rows(raw)) == len(raw["benchmarks"])
    for entry in raw["benchmarks"]:
        assert entry["name"].split("::")[-1] in out


def test_bad_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    assert bench_report.main([str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and len(err.splitlines()) == 1
