"""Kill -9 harness for tests/test_faults.py: one process imports fastjepa once, then forks one child per
attempt, so that dozens of killed and resumed runs cost seconds, not a Python start-up each.

    python fault_kill_harness.py WORKDIR PLAN.json -- TRAIN_ARGS...

The plan is a list of attempts on ``WORKDIR/split`` (each ``--resume``), then one last attempt runs to the end:
- ``{"event": NAME, "nth": k}``: the child kills itself (SIGKILL) at the k-th time NAME happens in it (the
  points inside a save, the metrics write, the resume, ... see ``EVENTS``); if NAME never happens, the
  child is killed after ``backstop`` optimizer steps instead, and the report says so;
- ``{"delay_steps": x}``: the parent kills the child (SIGKILL) ``x`` of the reference run's step times after
  the child's first step (the test draws ``x`` at random): a random point of the training loop.
Before the plan, ``WORKDIR/full`` is trained without interruption (the reference). The report
(``WORKDIR/report.json``) lists each attempt: its exit status, the event that fired, and its stderr file.
"""
from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

import safetensors.torch  # noqa: E402

import fastjepa.train.metrics as metrics  # noqa: E402
import fastjepa.train.trainer as trainer_mod  # noqa: E402
from fastjepa.cli import train_main  # noqa: E402
from fastjepa.io.train_state import TrainState  # noqa: E402
from fastjepa.train.run_dir import RunDir  # noqa: E402

STEP_SLEEP_S = 0.02  # every step sleeps a little, so that a random delay lands at a random step
STEP_ENDS: list[float] = []  # time.monotonic() at the end of each step of this child


def die(event: str, marker: Path) -> None:
    marker.write_text(event)
    os.kill(os.getpid(), signal.SIGKILL)


def arm(event: str, nth: int, backstop: int, marker: Path) -> None:
    """Patch this (forked) child so that it kills itself at the ``nth`` occurrence of ``event``."""
    count = {"n": 0}

    def hit(name: str) -> None:
        if name == event:
            count["n"] += 1
            if count["n"] == nth:
                die(event, marker)

    def next_fires(name: str) -> bool:  # the next occurrence of ``name`` is the one that kills
        return name == event and count["n"] + 1 == nth

    real_save, real_replace, real_unlink = torch.save, os.replace, Path.unlink

    def save(obj, f, *a, **k):  # torch_save writes through an open file: half of it, then the kill
        if hasattr(f, "write") and event == "save-mid-write":
            if next_fires(event):
                buf = io.BytesIO()
                real_save(obj, buf, *a, **k)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            hit(event)
        return real_save(obj, f, *a, **k)

    def replace(src, dst, *a, **k):
        name = Path(dst).name
        if name.startswith("step_"):
            hit("save-before-rename")
        if name == metrics_name:
            hit("truncate-before-rename")
        out = real_replace(src, dst, *a, **k)
        if name.startswith("step_"):
            hit("save-after-rename")
        return out

    def unlink(self, *a, **k):
        out = real_unlink(self, *a, **k)
        if self.name.startswith("step_") and self.suffix == ".pt":
            hit("prune")
        return out

    real_export = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if event == "export-mid-write":
            if next_fires(event):
                data = safetensors.torch.save(tensors, metadata=metadata)
                with open(filename, "wb") as f:
                    f.write(data[: len(data) // 2])
            hit(event)
        return real_export(tensors, filename, metadata=metadata)

    real_log = metrics.MetricsLogger.log

    def log(self, record):
        if self.file is not None and event == "metrics-mid-line":
            if next_fires(event):
                self.file.write(json.dumps(record)[:40])
                self.file.flush()
            hit(event)
        return real_log(self, record)

    real_load = TrainState.load.__func__

    def load(cls, *a, **k):
        out = real_load(cls, *a, **k)
        hit("resume-load")
        return out

    real_lock = RunDir._take_lock

    def take_lock(self):
        real_lock(self)
        hit("lock-held")

    real_step = trainer_mod.Trainer.train_step
    steps = {"n": 0}

    def train_step(self, *a, **k):
        out = real_step(self, *a, **k)
        time.sleep(STEP_SLEEP_S)
        STEP_ENDS.append(time.monotonic())
        if len(STEP_ENDS) == 1:
            marker.with_suffix(".started").touch()  # the parent's clock for a random kill starts here
        steps["n"] += 1
        hit("step")
        if event != "step" and backstop and steps["n"] >= backstop:
            die(f"backstop:{event}", marker)
        return out

    metrics_name = "metrics.jsonl"
    torch.save, os.replace, Path.unlink = save, replace, unlink
    safetensors.torch.save_file = save_file
    metrics.MetricsLogger.log = log
    TrainState.load = classmethod(load)
    RunDir._take_lock = take_lock
    trainer_mod.Trainer.train_step = train_step


def run_child(argv: list[str], stderr_path: Path, plan: dict | None, marker: Path, timing: dict) -> int:
    """Fork a child running ``fastjepa train argv``; returns its wait status as an exit code (-9: killed).
    ``timing`` (the reference run's step time) turns ``delay_steps`` into seconds; a run without a plan
    fills it in."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            os.dup2(fd, 1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            if plan and "event" in plan:
                arm(plan["event"], plan.get("nth", 1), plan.get("backstop", 0), marker)
            else:
                arm("none", 0, 0, marker)  # the same step pacing as every other attempt
            code = train_main(argv)
            if plan is None and len(STEP_ENDS) > 1:
                step_s = (STEP_ENDS[-1] - STEP_ENDS[0]) / (len(STEP_ENDS) - 1)
                marker.with_suffix(".timing").write_text(json.dumps({"step_s": step_s}))
        except BaseException:  # noqa: BLE001 - the child's traceback goes to its stderr file
            import traceback

            traceback.print_exc()
            code = 99
        finally:
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(code)
    if plan and "delay_steps" in plan:
        deadline = None
        while deadline is None or time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if deadline is None and marker.with_suffix(".started").exists():
                deadline = time.monotonic() + plan["delay_steps"] * timing["step_s"]
            time.sleep(0.002)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if plan is None and marker.with_suffix(".timing").exists():
        timing.update(json.loads(marker.with_suffix(".timing").read_text()))
    return os.waitstatus_to_exitcode(status)


def main() -> None:
    work, plan_file = Path(sys.argv[1]), Path(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1:]
    plans = json.loads(plan_file.read_text())
    report, timing = {"reference": None, "attempts": []}, {}
    t0 = time.monotonic()
    report["reference"] = run_child(["--output-dir", str(work / "full")] + args, work / "full.log", None,
                                    work / "reference", timing)
    report["reference_s"], report["timing"] = time.monotonic() - t0, timing
    for i, plan in enumerate(plans + [None]):
        marker = work / f"fired_{i:02d}"
        log = work / f"attempt_{i:02d}.log"
        t0 = time.monotonic()
        code = run_child(["--output-dir", str(work / "split"), "--resume"] + args, log, plan, marker, timing)
        report["attempts"].append({"plan": plan, "code": code, "fired": marker.read_text() if marker.exists() else None,
                                   "log": str(log), "seconds": round(time.monotonic() - t0, 3)})
    (work / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
