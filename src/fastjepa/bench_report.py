"""``fastjepa bench-report FILE.json ...``: the throughput table of a benchmark run.

Reads a ``pytest benchmarks/ --benchmark-only --benchmark-json=FILE`` output or a device check's summary
(``benchmarks/results/*.json``) and prints one row per benchmark: its figure (images/s, TFLOP/s, GB/s or ms,
from what the benchmark put in ``extra_info``), the fraction of the device's peak it reached, and its ratio
against its peer. The same table ends every ``pytest benchmarks/ --benchmark-only`` run.

The peer of a row is named by the benchmark (``speedup_vs_<peer>`` or ``ratio_vs_<peer>`` in ``extra_info``);
where a benchmark compares providers (``provider``/``backend``/``method`` in ``extra_info``), fastjepa's
rows (``triton``, ``fastjepa``) are compared with the fastest other provider of the same case.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

# extra_info key -> (unit, higher is better): the first one a benchmark has is its figure
FIGURES = (("images_per_s", "images/s"), ("tflops", "TFLOP/s"), ("gbps", "GB/s"), ("GB/s", "GB/s"),
           ("ms_per_update", "ms"), ("ms", "ms"))
FRACTIONS = ("fraction_of_peak", "mfu", "fraction_of_copy", "fraction_of_copy_bandwidth")
PROVIDER_KEYS = ("provider", "backend", "method")
OURS = ("triton", "fastjepa", "fused", "packed")  # fastjepa's own rows, compared with the fastest other


@dataclass
class Row:
    name: str
    seconds: float
    value: float | None
    unit: str
    fraction: float | None
    peer: str | None = None
    ratio: float | None = None  # > 1: faster than the peer


def _entries(raw: dict) -> list[tuple[str, float, dict]]:
    """``(name, median seconds, extra_info)`` of each benchmark, in either file format."""
    out = []
    for b in raw.get("benchmarks", []):
        if "stats" in b:  # pytest-benchmark's own JSON
            out.append((b.get("fullname") or b["name"], b["stats"]["median"], b.get("extra_info", {})))
        else:  # a device check's summary: the extra_info keys are inlined
            extra = {k: v for k, v in b.items() if k not in ("name", "median_s", "rounds")}
            out.append((b["name"], b["median_s"], extra))
    return out


def _case(name: str, extra: dict) -> str:
    """The benchmark with its provider taken out: rows of one case differ only by who computes it."""
    provider = next((str(extra[k]) for k in PROVIDER_KEYS if k in extra), None)
    if provider is None:
        return name
    return re.sub(rf"(?<=[\[-]){re.escape(provider)}(?=[\]-])", "*", name, count=1)


def rows(raw: dict) -> list[Row]:
    out, by_case = [], {}
    for name, seconds, extra in _entries(raw):
        value, unit = None, "s"
        for key, label in FIGURES:
            if isinstance(extra.get(key), (int, float)):
                value, unit = float(extra[key]), label
                break
        fraction = next((float(extra[k]) for k in FRACTIONS if isinstance(extra.get(k), (int, float))), None)
        row = Row(name.split("::")[-1], seconds, value, unit, fraction)
        for key, ratio in extra.items():
            found = re.fullmatch(r"(?:speedup|ratio)_vs_(\w+)", key)
            if found and isinstance(ratio, (int, float)):
                row.peer, row.ratio = found.group(1), float(ratio)
        by_case.setdefault(_case(name, extra), []).append((row, extra))
        out.append(row)
    for members in by_case.values():  # fastjepa's providers against the fastest other one
        provider = {id(r): next((str(e[k]) for k in PROVIDER_KEYS if k in e), None) for r, e in members}
        peers = [r for r, _ in members if provider[id(r)] not in OURS and provider[id(r)] is not None]
        if not peers:
            continue
        best = min(peers, key=lambda r: r.seconds)
        for r, _ in members:
            if provider[id(r)] in OURS and r.peer is None and r.seconds > 0:
                r.peer, r.ratio = provider[id(best)], best.seconds / r.seconds
    return out


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def render(table: list[Row], title: str | None = None) -> str:
    """A fixed-width text table: benchmark, figure, fraction of peak, ratio against the peer."""
    header = ("benchmark", "figure", "of peak", "vs peer")
    body = [(r.name, f"{_fmt(r.value)} {r.unit}" if r.value is not None else f"{_fmt(r.seconds * 1e3)} ms",
             f"{100 * r.fraction:.1f} %" if r.fraction is not None else "-",
             f"{r.ratio:.2f}x {r.peer}" if r.ratio is not None else "-") for r in table]
    widths = [max(len(x) for x in column) for column in zip(header, *body)]
    lines = [title] if title else []
    lines += ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in (header, *body)]
    lines.insert(2 if title else 1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def describe(raw: dict) -> str:
    """One line on where the figures come from: device, versions, commit."""
    info = raw.get("machine_info", {})
    device = raw.get("device") or next((e.get("device") for _, _, e in _entries(raw) if e.get("device")), None)
    parts = [f"device {device}" if device else None,
             f"torch {raw['torch']}" if raw.get("torch") else None,
             f"commit {raw.get('commit') or raw.get('commit_info', {}).get('id', '')[:12]}"
             if raw.get("commit") or raw.get("commit_info") else None,
             raw.get("date") or raw.get("datetime"), info.get("node")]
    return ", ".join(p for p in parts if p)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastjepa bench-report", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="pytest-benchmark JSON or benchmarks/results/*.json")
    args = parser.parse_args(argv)
    for path in args.files:
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            print(f"fastjepa bench-report: error: '{path}' is not a readable JSON file: {err}", file=sys.stderr)
            return 2
        table = rows(raw)
        if not table:
            print(f"fastjepa bench-report: error: '{path}' holds no benchmarks", file=sys.stderr)
            return 2
        print(render(table, title=f"{path} ({describe(raw)})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
