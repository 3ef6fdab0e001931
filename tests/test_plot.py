"""``fastjepa plot RUN``: a PNG with a panel per metric, the lines equal to metrics.jsonl's values.

- a hand-written metrics file (a resumed run's repeated steps, a skipped step's null loss, a half-written
  last line): every panel's line holds exactly the newest finite value of each step;
- a real tiny run: every metric the panels name is one the trainer writes, and the PNG is written;
- bad input: one line, exit code 2.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from fastjepa.plot import PANELS, main, plot_metrics, read_records


def record(step, **values):
    base = {"step": step, "epoch": 0, "loss": 1.0 / step, "lr": 1e-3 * step, "wd": 0.04 + 0.01 * step,
            "momentum": 0.996 + 1e-4 * step, "images_per_s": 100.0 + step, "target_feature_std": 0.3,
            "pred_feature_std": 0.1, "target_rankme": 10.0 + step, "online_probe_top1": 0.1 * step}
    base.update(values)
    return base


def write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def test_panels_hold_the_newest_record_of_each_step(tmp_path):
    lines = [record(1), record(2), record(3, loss=None), record(4),
             record(3, loss=0.5, lr=7.0), record(4, loss=0.25), record(5, online_probe_top1=None)]  # resumed at 2
    path = write(tmp_path / "metrics.jsonl", lines, tail='{"step": 6, "lo')  # killed mid-write
    records = read_records(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    fig = plot_metrics(records)
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(axes) == {title for title, _, _ in PANELS}
    expected = {1: record(1), 2: record(2), 3: record(3, loss=0.5, lr=7.0), 4: record(4, loss=0.25),
                5: record(5, online_probe_top1=None)}
    for title, keys, _ in PANELS:
        lines_drawn = axes[title].get_lines()
        assert len(lines_drawn) == len(keys)
        for line, (key, _) in zip(lines_drawn, keys):
            want = [(s, r[key]) for s, r in expected.items() if r[key] is not None]
            assert list(zip(line.get_xdata(), line.get_ydata())) == want, key
    assert axes["loss"].get_yscale() == "log"


def test_missing_metrics_leave_out_their_panels(tmp_path):
    plain = [{k: v for k, v in record(s).items() if k not in ("target_rankme", "online_probe_top1")} for s in (1, 2)]
    fig = plot_metrics(read_records(write(tmp_path / "metrics.jsonl", plain)))
    titles = {ax.get_title() for ax in fig.axes if ax.get_visible()}
    assert "target RankMe (collapse: falls)" not in titles and "online probe top-1" not in titles
    assert "loss" in titles


def test_plots_a_real_run(tiny, tmp_path, capsys):
    from matplotlib.image import imread

    from fastjepa.cli import train_main

    run = tmp_path / "run"
    assert train_main(["--output-dir", str(run)] + tiny + ["train.max_steps=3", "train.online_probe=true"]) == 0
    written = set(json.loads((run / "metrics.jsonl").read_text().splitlines()[0]))
    assert {key for _, keys, _ in PANELS for key, _ in keys} <= written  # every panel's metric is one the trainer logs
    assert main([str(run)]) == 0
    png = run / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = imread(png).shape
    assert (width, height) == (1430, 1144)  # 2 x 4 panels of 6.5 x 2.6 in at 110 dpi
    other = tmp_path / "plots" / "x.png"
    assert main([str(run / "metrics.jsonl"), "--output", str(other)]) == 0 and other.is_file()
    assert str(other) in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    (None, "neither a metrics.jsonl file nor a run folder"),
    ("", "holds no records yet"),
    ('{"step": 1}\nnot json\n{"step": 2}\n', "line 2 is not JSON"),
    ('[1, 2]\n{"step": 2}\n', "line 1 is not a metrics record"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    if content is not None:
        run.mkdir()
        (run / "metrics.jsonl").write_text(content)
    assert main([str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
