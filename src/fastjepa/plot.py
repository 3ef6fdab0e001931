"""``fastjepa plot RUN [--output PNG]``: one PNG of a run's ``metrics.jsonl``, a panel per metric, step on x.

Panels: loss (log scale), learning rate, weight decay, EMA momentum, images/s, the features' per-dimension
std (target and prediction), the target features' RankMe, and the online probe's top-1 when the run has
them. A step logged twice (a run resumed from a checkpoint older than its last log lines) keeps its newest
record. Rendered headless (matplotlib's Agg backend); matplotlib comes with ``pip install 'fastjepa[eval]'``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# (title, [(metrics.jsonl key, legend label)], y scale): the panels, in reading order
PANELS = [
    ("loss", [("loss", "loss")], "log"),
    ("learning rate", [("lr", "lr")], "linear"),
    ("weight decay", [("wd", "wd")], "linear"),
    ("EMA momentum", [("momentum", "momentum")], "linear"),
    ("images/s (all ranks)", [("images_per_s", "images/s")], "linear"),
    ("feature std (collapse: falls)", [("target_feature_std", "target"), ("pred_feature_std", "prediction")], "linear"),
    ("target RankMe (collapse: falls)", [("target_rankme", "RankMe")], "linear"),
    ("online probe top-1", [("online_probe_top1", "top-1")], "linear"),
]


class PlotError(ValueError):
    """A run folder or metrics file that cannot be plotted; the message names it."""


def metrics_file(run: str | Path) -> Path:
    """``run`` itself when it is a file, else ``run/metrics.jsonl``."""
    path = Path(run)
    path = path if path.is_file() else path / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"'{run}' is neither a metrics.jsonl file nor a run folder holding one")
    return path


def read_records(path: Path) -> list[dict]:
    """The file's records by step, the newest record of each step kept, in step order."""
    by_step, lines = {}, path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # a run killed mid-write leaves half a last line
                break
            raise PlotError(f"'{path}' line {number} is not JSON: {err.msg}") from None
        if not isinstance(record, dict) or "step" not in record:
            raise PlotError(f"'{path}' line {number} is not a metrics record (no 'step')")
        by_step[record["step"]] = record
    if not by_step:
        raise PlotError(f"'{path}' holds no records yet")
    return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict], key: str) -> tuple[list, list]:
    """``(steps, values)`` of the records that have a finite ``key``."""
    pairs = [(r["step"], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_metrics(records: list[dict], title: str = ""):
    """A matplotlib Figure with one panel per metric the records hold."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed, and never one opened
    import matplotlib.pyplot as plt

    panels = [(name, [(k, label) for k, label in keys if series(records, k)[0]], scale) for name, keys, scale in PANELS]
    panels = [p for p in panels if p[1]]
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 2.6 * rows), squeeze=False, sharex=True)
    for ax, (name, keys, scale) in zip(axes.flat, panels):
        for key, label in keys:
            steps, values = series(records, key)
            ax.plot(steps, values, label=label, linewidth=1.2, marker="." if len(steps) < 50 else None)
        if scale == "log" and all(v > 0 for k, _ in keys for v in series(records, k)[1]):
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastjepa plot", description="plot a run's metrics.jsonl to a PNG")
    p.add_argument("run", help="a run's output folder (or its metrics.jsonl)")
    p.add_argument("--output", "-o", help="the PNG to write (default: RUN/metrics.png)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        path = metrics_file(args.run)
        records = read_records(path)
    except PlotError as err:
        print(f"fastjepa plot: error: {err}", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("fastjepa plot: error: matplotlib is not installed: pip install 'fastjepa[eval]'", file=sys.stderr)
        return 2
    output = Path(args.output) if args.output else path.parent / "metrics.png"
    fig = plot_metrics(records, title=f"{path.parent.name}: steps {records[0]['step']}-{records[-1]['step']}")
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    print(f"fastjepa plot: wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
