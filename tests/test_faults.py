"""Fault injection: what operators, schedulers and clusters do to a run, and what it must survive.

- kill -9 at >= 20 points (random times, and chosen points inside a save, the metrics write, the resume and
  the lock), each followed by ``--resume`` (tests/fault_kill_harness.py forks the attempts from one
  process): the finished run logs every step once, with the losses and the target encoder of a run that
  was never interrupted;
- signals from each sender: SIGTERM and SIGINT to the process group (DataLoader workers included), SIGUSR1
  (save, go on), a second Ctrl-C (exit 130 at once), a launcher that dies (the parent watch);
- each kind of corrupt newest checkpoint: named in one line with its reason, moved to checkpoints/corrupt/,
  the previous one resumed exactly;
- a full disk (a small tmpfs as root, else a writer that fails with ENOSPC) and a read-only folder;
- two runs on one folder, a fresh run into a finished one, --overwrite, output paths that are files;
- pruning that never deletes the checkpoint just written; resuming under another config.
The DeepSpeed cases (SIGTERM to the runner and to launch.py, ranks agreeing on a fallback tag) are in
tests/test_deepspeed.py.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastjepa.cli import train_main as main
from fastjepa.io.files import checkpoint_files, prune_checkpoint_files, temporary_files, torch_save
from fastjepa.io.train_state import TrainState
from fastjepa.train import Trainer
from fastjepa.train.resume_config import ResumeConfigError, check_resume_config
from fastjepa.train.run_dir import RunDir

HERE = Path(__file__).resolve().parent
TRAIN = ["train.checkpoint_every=2", "train.keep_checkpoints=3", "optim.warmup_steps=2", "train.schedule_steps=6"]


def losses(output: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records}


def assert_same_run(got: Path, want: Path) -> None:
    """Same logged steps and losses (1e-6), same exported target encoder (1e-6)."""
    a, b = losses(want), losses(got)
    assert sorted(b) == sorted(a)
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    ta, tb = load_file(want / "target_encoder.safetensors"), load_file(got / "target_encoder.safetensors")
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=1e-6)


def one_line_errors(err: str) -> None:
    assert "Traceback" not in err and "weights_only=False" not in err, err[-3000:]


# ---- kill -9 at >= 20 points, then resume ------------------------------------------------------------

# (event, nth occurrence in the attempt): inside the save (half written, before and after the rename, the
# pruning), the safetensors export, half a metrics line, the metrics truncation, the resume's load, the lock
EVENTS = [("step", 3), ("save-mid-write", 1), ("metrics-mid-line", 2), ("truncate-before-rename", 1),
          ("save-before-rename", 1), ("save-after-rename", 1), ("prune", 1), ("export-mid-write", 1),
          ("resume-load", 1), ("lock-held", 1), ("save-mid-write", 2), ("step", 5)]
KILL_ARGS = ["train.max_steps=100", "train.checkpoint_every=3", "train.log_every=1", "train.keep_checkpoints=2",
             "optim.warmup_steps=4"]


@pytest.mark.subprocess
def test_kill_9_anywhere_then_resume_matches_an_uninterrupted_run(tmp_path, helpers):
    rng = random.Random(16)
    plan = []
    for event, nth in EVENTS:  # each chosen point, then a kill at a random time (0..5 steps into the loop)
        plan.append({"event": event, "nth": nth, "backstop": 12})
        if event != "metrics-mid-line":  # its torn line is for the truncation that comes next
            plan.append({"delay_steps": round(rng.uniform(0.0, 5.0), 2)})
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    proc = subprocess.run([sys.executable, str(HERE / "fault_kill_harness.py"), str(tmp_path), str(tmp_path / "plan.json"),
                           "--"] + helpers.TINY + KILL_ARGS, env=helpers.subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["reference"] == 0
    attempts = report["attempts"]
    for attempt, planned in zip(attempts, plan):
        if "event" in planned:  # the chosen point was reached (not the back-stop kill)
            assert attempt["fired"] == planned["event"], (attempt, Path(attempt["log"]).read_text()[-2000:])
    kills = [i for i, a in enumerate(attempts) if a["code"] == -signal.SIGKILL]
    logs = [Path(a["log"]).read_text() for a in attempts]
    started = [i for i, log in enumerate(logs) if "resumed from" in log or "found no checkpoint" in log]
    survived = 0
    for i in kills:  # the next attempt that got through its start-up did so cleanly
        after = next(j for j in started if j > i)
        survived += all("Traceback" not in logs[j] for j in range(i + 1, after + 1))
    assert attempts[-1]["code"] == 0, Path(attempts[-1]["log"]).read_text()[-3000:]
    assert all(a["code"] in (0, -signal.SIGKILL) for a in attempts), attempts
    assert_same_run(tmp_path / "split", tmp_path / "full")
    split = tmp_path / "split"
    assert not [p for d in (split, split / "checkpoints") for p in temporary_files(d)]
    print(f"kill -9: {survived}/{len(kills)} kills survived ({sum('event' in p for p in plan)} at chosen points, "
          f"the rest at random times)")
    assert len(kills) >= 20 and survived == len(kills)


# ---- signals -------------------------------------------------------------------------------------------

def start_trainer(helpers, output: Path, *extra: str, prefix: str = "") -> subprocess.Popen:
    """``fastjepa train`` in its own session (process group), as a scheduler starts it; ``prefix``: Python run
    before the command line (to slow the steps down)."""
    code = prefix + "import sys\nfrom fastjepa.cli import train_main\nsys.exit(train_main(sys.argv[1:]))\n"
    args = helpers.TINY + ["train.max_steps=100000", "data.num_workers=1", "train.checkpoint_every=1000", *extra]
    return subprocess.Popen([sys.executable, "-c", code, "--output-dir", str(output)] + args, env=helpers.subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_until(proc: subprocess.Popen, done, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, (what, proc.communicate())
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def logged_steps(output: Path) -> list[int]:
    path = output / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line being written
    return out


def finish(proc: subprocess.Popen, timeout: float = 90.0) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def newest_step(output: Path) -> int:
    return TrainState.load(checkpoint_files(output / "checkpoints")[-1], need=()).step


@pytest.mark.subprocess
def test_process_group_sigusr1_then_sigterm_and_a_second_run(tmp_path, helpers, tiny, capsys):
    """SIGUSR1 to the process group saves and training goes on; a second run on the folder stops at once;
    SIGTERM to the group (what Slurm, Kubernetes and ``timeout`` send; the loader worker gets it too)
    checkpoints at the next step and exits 0; the lock is then free."""
    out = tmp_path / "run"
    proc = start_trainer(helpers, out)
    try:
        wait_until(proc, lambda: logged_steps(out), "a first metrics line")
        assert main(["--output-dir", str(out), "--resume"] + tiny) == 2  # the folder is taken
        err = capsys.readouterr().err
        assert "in use by another fastjepa run" in err and f"pid {proc.pid}" in err, err
        one_line_errors(err)

        os.killpg(proc.pid, signal.SIGUSR1)
        wait_until(proc, lambda: checkpoint_files(out / "checkpoints"), "a checkpoint after SIGUSR1")
        saved = newest_step(out)
        wait_until(proc, lambda: max(logged_steps(out)) > saved + 1, "steps after the SIGUSR1 checkpoint")
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    text = stdout + stderr
    assert "save requested (SIGUSR1)" in text and "signal 15 (SIGTERM)" in text
    assert "DataLoader worker" not in text and "Traceback" not in text, text[-3000:]
    stopped = newest_step(out)
    assert stopped > saved and logged_steps(out)[-1] == stopped
    capsys.readouterr()
    assert main(["--output-dir", str(out), "--resume", f"train.max_steps={stopped + 1}"] + tiny) == 0  # lock released
    assert f"at step {stopped}" in capsys.readouterr().err


@pytest.mark.subprocess
def test_ctrl_c_checkpoints_and_a_second_ctrl_c_stops_at_once(tmp_path, helpers):
    """SIGINT to the process group (Ctrl-C): a checkpoint at the next step, exit 0. Two SIGINTs during one
    slow step: exit 130 at once, without a checkpoint."""
    out = tmp_path / "once"
    proc = start_trainer(helpers, out)
    wait_until(proc, lambda: logged_steps(out), "a first metrics line")
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = finish(proc)
    assert proc.returncode == 0 and "signal 2 (SIGINT)" in stdout + stderr, stderr[-3000:]
    assert "KeyboardInterrupt" not in stderr and "Traceback" not in stderr
    assert newest_step(out) == logged_steps(out)[-1]

    slow = ("import time\nimport fastjepa.train.trainer as T\n_step = T.Trainer.train_step\n"
            "def slow_step(self, *a, **k):\n    out = _step(self, *a, **k)\n    time.sleep(2.0)\n    return out\n"
            "T.Trainer.train_step = slow_step\n")
    out = tmp_path / "twice"
    proc = start_trainer(helpers, out, prefix=slow)
    wait_until(proc, lambda: logged_steps(out), "a first metrics line")
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = finish(proc, timeout=30)
    # at once: a stop at the step boundary would have saved a checkpoint and exited 0
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted again: stopped at once" in stderr and "Traceback" not in stderr
    assert not checkpoint_files(out / "checkpoints")


LAUNCHER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
print(child.pid, flush=True)
time.sleep(120)
"""
WATCHED = """
import os, sys, time
from fastjepa.train.signals import StopRequests
stop = StopRequests(watch=[(os.getpid(), os.getppid(), "the test's launcher")])
with stop:
    print("watching", flush=True)
    for _ in range(600):
        if stop.reason:
            print(stop.reason, flush=True)
            break
        time.sleep(0.05)
"""


@pytest.mark.subprocess
def test_a_rank_stops_when_its_launcher_is_gone(helpers):
    """The parent watch: a process whose launcher is killed (SIGKILL: no signal passed on) sees it within
    seconds and stops (under DeepSpeed: a checkpoint, then exit; see tests/test_deepspeed.py)."""
    import psutil

    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, WATCHED], env=helpers.subprocess_env(),
                                stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(launcher.stdout.readline()))
    try:
        assert launcher.stdout.readline().strip() == "watching"  # its watch is installed
        launcher.kill()
        launcher.wait()
        line = launcher.stdout.readline()  # the child's stdout is the launcher's pipe; EOF if it never stops
        assert f"the test's launcher (pid {launcher.pid}) is gone" in line, line
    finally:
        if child.is_running():
            child.kill()


class GlooRanks:
    """The two collectives :meth:`StopRequests.poll` uses, over a real gloo group (as DeepSpeedBackend)."""

    def all_reduce_sum(self, values):
        import torch.distributed as dist
        dist.all_reduce(values)
        return values

    def gather_objects(self, obj):
        import torch.distributed as dist
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out


def _poll_on_rank(rank, store_path, results):
    import torch.distributed as dist

    from fastjepa.train.signals import StopRequests

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    stop, ranks = StopRequests(), GlooRanks()
    seen = [stop.poll(ranks)]  # nothing requested
    if rank == 1:
        stop.save_now = True
    seen.append(stop.poll(ranks))  # a save on rank 1 only
    if rank == 1:
        stop.signal = signal.SIGTERM
    seen.append(stop.poll(ranks))  # a stop that only rank 1 has seen so far
    results[rank] = seen
    dist.destroy_process_group()


def test_every_rank_names_the_stop_another_rank_saw_first(tmp_path):
    """Two gloo ranks: a save or stop request seen on one rank is acted on by both at the same poll, and the
    rank that did not see it names the cause and the rank (the line rank 0 prints), not just "another rank"."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_poll_on_rank, args=(str(tmp_path / "store"), results), nprocs=2)
    assert results[1] == [(None, False), (None, True), ("signal 15 (SIGTERM)", False)]
    assert results[0] == [(None, False), (None, True), ("signal 15 (SIGTERM) (seen on rank 1)", False)]


# ---- corrupt newest checkpoint -------------------------------------------------------------------------

class Arbitrary:
    pass


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_a_byte(p: Path):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _missing_keys(p: Path):
    state = torch.load(p, weights_only=True)
    del state["model"]
    torch.save(state, p)


def _folder(p: Path):
    p.unlink()
    p.mkdir()
    (p / "data.pkl").write_bytes(b"not a checkpoint")


CORRUPTIONS = {  # kind: (how, what the one line says)
    "truncated": (_truncate, "truncated"),
    "zero-bytes": (lambda p: p.write_bytes(b""), "empty (0 bytes)"),
    "random-bytes": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "not a torch.save archive"),
    "plain-pickle": (lambda p: p.write_bytes(pickle.dumps({"step": 4, "model": {}})), "not a torch.save archive"),
    "pickled-object": (lambda p: torch.save({"step": 4, "config": {}, "obj": Arbitrary()}, p), "will not unpickle"),
    "flipped-byte": (_flip_a_byte, "fails its CRC check"),
    "missing-keys": (_missing_keys, "missing model"),
    "folder": (_folder, "is a folder"),
}


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, helpers):
    """A 4-step run (checkpoints at steps 2 and 4) and an uninterrupted 6-step run of the same schedule."""
    root = tmp_path_factory.mktemp("corrupt")
    args = helpers.TINY + TRAIN
    assert main(["--output-dir", str(root / "six"), "train.max_steps=6"] + args) == 0
    assert main(["--output-dir", str(root / "four"), "train.max_steps=4"] + args) == 0
    return root


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(four_steps, tmp_path, tiny, capsys, kind):
    corrupt, reason = CORRUPTIONS[kind]
    run = tmp_path / "run"
    shutil.copytree(four_steps / "four", run)
    newest = run / "checkpoints" / "step_00000004.pt"
    corrupt(newest)
    capsys.readouterr()
    assert main(["--output-dir", str(run), "--resume", "train.max_steps=6"] + tiny + TRAIN) == 0
    err = capsys.readouterr().err
    one_line_errors(err)
    line = next(x for x in err.splitlines() if "step_00000004.pt" in x)
    assert reason in line and "moved it to" in line, line
    assert (run / "checkpoints" / "corrupt" / "step_00000004.pt").exists()
    assert "step_00000002.pt at step 2" in err
    assert_same_run(run, four_steps / "six")  # steps 3-4 again (logged once), then 5-6


def test_every_checkpoint_corrupt_is_one_clear_error(four_steps, tmp_path, tiny, capsys):
    run = tmp_path / "run"
    shutil.copytree(four_steps / "four", run)
    for path in checkpoint_files(run / "checkpoints"):
        _truncate(path)
    capsys.readouterr()
    assert main(["--output-dir", str(run), "--resume", "train.max_steps=6"] + tiny + TRAIN) == 2
    err = capsys.readouterr().err
    one_line_errors(err)
    assert "none of the 2 checkpoints" in err and "--overwrite" in err
    assert len(losses(run)) == 4  # nothing was truncated or lost


# ---- the disk: full, read-only -------------------------------------------------------------------------

def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def _unmount(folder: Path) -> None:
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _fail_save_at_step(monkeypatch, step: int, fill=None, code: int = errno.ENOSPC):
    """From optimizer step ``step`` on, fill the disk (``fill()``) or make every torch.save raise OSError(code)."""
    real_step, real_save = Trainer.train_step, torch.save

    def train_step(self, *a, **k):
        out = real_step(self, *a, **k)
        if self.step == step and fill is not None:
            fill()
        return out

    def failing_save(obj, f, *a, **k):
        if fill is None and _step_of_state(obj) >= step:
            f.write(b"PK\x03\x04 a start")
            raise OSError(code, os.strerror(code))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(torch, "save", failing_save)


def _step_of_state(obj) -> int:  # the step a checkpoint dict being saved carries
    return int(obj.get("step", 0)) if isinstance(obj, dict) else 0


@pytest.mark.parametrize("how", ["tmpfs-or-patched", "read-only-patched"])
def test_a_failed_save_says_why_keeps_the_previous_checkpoint_and_exits_5(tmp_path, tiny, monkeypatch, capsys, how):
    """Disk full (a 3 MB tmpfs filled after the step-1 checkpoint, as root; else a writer failing with
    ENOSPC) or a read-only file system during the step-2 save: exit 5, one line with the path, the reason
    and the free space; checkpoint 1 intact, no temporary file left; once there is room, --resume goes on."""
    disk = tmp_path / "disk"
    mounted = how == "tmpfs-or-patched" and _mount_tmpfs(disk, "3m")
    try:
        run = disk / "run"
        if mounted:
            _fail_save_at_step(monkeypatch, 2, fill=lambda: (disk / "filler").write_bytes(
                b"\0" * (shutil.disk_usage(disk).free - 64 * 1024)))
        else:
            _fail_save_at_step(monkeypatch, 2, code=errno.EROFS if how == "read-only-patched" else errno.ENOSPC)
        args = tiny + ["train.checkpoint_every=1", "train.max_steps=4"]
        assert main(["--output-dir", str(run)] + args) == 5
        err = capsys.readouterr().err
        one_line_errors(err)
        line = next(x for x in err.splitlines() if "error:" in x)
        words = "read-only file system" if how == "read-only-patched" else "no space left on device"
        assert f"could not write '{run / 'checkpoints' / 'step_00000002.pt'}': {words}" in line, line
        assert " free on that file system" in line and "stopped at step 2" in line
        assert [p.name for p in checkpoint_files(run / "checkpoints")] == ["step_00000001.pt"]
        assert TrainState.load(run / "checkpoints" / "step_00000001.pt").step == 1
        assert not temporary_files(run / "checkpoints")
        monkeypatch.undo()
        (disk / "filler").unlink(missing_ok=True)
        assert main(["--output-dir", str(run), "--resume"] + args) == 0
        assert "at step 1" in capsys.readouterr().err
        assert sorted(losses(run)) == [1, 2, 3, 4]
    finally:
        if mounted:
            _unmount(disk)


def test_a_read_only_output_folder_stops_before_anything_loads(tmp_path, tiny, capsys, monkeypatch):
    """A run on a read-only mount (as root: a tmpfs remounted read-only; else a folder without write
    permission): --resume stops at start with one line naming the folder, before any checkpoint loads."""
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "8m")
    try:
        run = disk / "run"
        assert main(["--output-dir", str(run), "train.max_steps=2"] + tiny) == 0
        if mounted:
            assert subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode == 0
        elif os.geteuid() == 0:
            pytest.skip("root without mount: a permission bit does not stop root")
        else:
            os.chmod(run, 0o555)
        loads, real = [], TrainState.load.__func__
        monkeypatch.setattr(TrainState, "load", classmethod(lambda cls, *a, **k: loads.append(1) or real(cls, *a, **k)))
        capsys.readouterr()
        assert main(["--output-dir", str(run), "--resume", "train.max_steps=4"] + tiny) == 2
        err = capsys.readouterr().err
        one_line_errors(err)
        assert f"cannot write to the output folder '{run}'" in err and not loads
        assert ("read-only file system" if mounted else "permission denied") in err
    finally:
        if mounted:
            _unmount(disk)
        elif run.exists():
            os.chmod(run, 0o755)


def test_an_interrupt_inside_the_writer_is_an_interrupt_not_a_failed_save(tmp_path):
    """torch's writer turns an exception raised in its Python write callback (a second Ctrl-C, the
    DataLoader's dead-worker signal) into ``RuntimeError: unexpected pos``: it must surface as what it was."""
    from fastjepa.io.files import SaveError, atomic_write

    def interrupted(tmp):
        Path(tmp).write_bytes(b"half")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    def full(tmp):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "a.pt", interrupted)
    with pytest.raises(SaveError, match="no space left on device"):
        atomic_write(tmp_path / "a.pt", full)
    assert list(tmp_path.iterdir()) == []  # no temporary file, no half checkpoint


# ---- the run folder --------------------------------------------------------------------------------------

def test_output_paths_that_are_files(tmp_path, tiny, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["--output-dir", str(a_file), "train.max_steps=1"] + tiny) == 2
    assert f"--output-dir '{a_file}' is a file, not a folder" in capsys.readouterr().err
    assert main(["--output-dir", str(a_file / "run"), "train.max_steps=1"] + tiny) == 2
    err = capsys.readouterr().err
    assert f"'{a_file}' is a file, not a folder" in err
    one_line_errors(err)


def test_a_fresh_run_into_a_finished_run_stops_unless_overwrite(tmp_path, tiny, capsys):
    run = tmp_path / "run"
    assert main(["--output-dir", str(run), "train.max_steps=2", "train.checkpoint_every=1"] + tiny) == 0
    before = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["--output-dir", str(run), "train.max_steps=3"] + tiny) == 2
    err = capsys.readouterr().err
    assert "holds a run (checkpoints up to step 2, 2 metrics records)" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_text() == before  # nothing appended, nothing overwritten
    assert main(["--output-dir", str(run), "--resume", "--overwrite", "train.max_steps=3"] + tiny) == 2
    assert "pass one" in capsys.readouterr().err
    assert main(["--output-dir", str(run), "--overwrite", "train.max_steps=3"] + tiny) == 0
    assert "--overwrite: deleted the run" in capsys.readouterr().err
    assert sorted(losses(run)) == [1, 2, 3]
    assert [p.name for p in checkpoint_files(run / "checkpoints")] == ["step_00000003.pt"]  # 1 and 2 deleted


def test_a_folder_without_a_run_is_fine_for_a_fresh_run(tmp_path, tiny, image_tree):
    (tmp_path / "notes.txt").write_text("the images live here too")
    assert main(["--output-dir", str(tmp_path), "train.max_steps=1"] + tiny) == 0


def test_temporary_files_of_killed_saves_are_removed_at_start(tmp_path, tiny, capsys):
    run = tmp_path / "run"
    assert main(["--output-dir", str(run), "train.max_steps=2"] + tiny) == 0
    debris = [run / "checkpoints" / ".step_00000003.pt.k1ll3d.tmp", run / ".target_encoder.safetensors.x.tmp"]
    for path in debris:
        path.write_bytes(b"\0" * 5000)
    keep = run / "checkpoints" / "notes.tmp"  # not the writer's pattern: not ours to delete
    keep.write_text("x")
    capsys.readouterr()
    assert main(["--output-dir", str(run), "--resume", "train.max_steps=3"] + tiny) == 0
    assert "removed 2 temporary file(s) of interrupted saves (10.0 kB)" in capsys.readouterr().err
    assert not any(p.exists() for p in debris) and keep.exists()


@pytest.mark.parametrize("keep", [-1, 0, 1, 2])
def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path, keep):
    for step in (1, 2, 3):
        torch_save(tmp_path / f"step_{step:08d}.pt", {"step": step})
        prune_checkpoint_files(tmp_path, keep)
        names = [p.name for p in checkpoint_files(tmp_path)]
        assert names[-1] == f"step_{step:08d}.pt"
        assert len(names) == min(step, max(1, keep))


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
    lines = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 2.5}, {"step": 3, "loss": 3.0}]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo'  # a line torn by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    said = []
    RunDir(tmp_path).truncate_metrics(2, say=said.append)
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [lines[0], lines[2]]
    assert "dropped 3 record(s)" in said[0]


def test_first_window_after_a_resume_says_how_many_steps_it_averages(tmp_path, tiny):
    args = tiny + ["train.log_every=4", "train.checkpoint_every=3", "train.max_steps=8"]
    assert main(["--output-dir", str(tmp_path), "train.max_steps=3"] + args[:-1]) == 0
    assert main(["--output-dir", str(tmp_path), "--resume"] + args) == 0
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["window_steps"]) for r in records] == [(3, 3), (4, 1), (8, 4)]


# ---- resuming under another config ---------------------------------------------------------------------------

def test_resume_with_another_model_names_the_keys(four_steps, tmp_path, tiny, capsys):
    run = tmp_path / "run"
    shutil.copytree(four_steps / "four", run)
    capsys.readouterr()
    assert main(["--output-dir", str(run), "--resume"] + tiny + TRAIN + ["model.embed_dim=48", "model.depth=3",
                                                                         "train.max_steps=6"]) == 2
    err = capsys.readouterr().err
    one_line_errors(err)
    assert "the config differs from the checkpoint" in err and "model.embed_dim 32 -> 48" in err
    assert "model.depth 2 -> 3" in err and "size mismatch" not in err
    assert checkpoint_files(run / "checkpoints") and not (run / "checkpoints" / "corrupt").exists()


def test_resume_config_rules():
    from fastjepa.config import load_config

    base = load_config(None, ["train.max_steps=100", "optim.warmup_steps=10"]).to_dict()

    def changed(*overrides):
        return load_config(None, ["train.max_steps=100", "optim.warmup_steps=10", *overrides]).to_dict()

    with pytest.raises(ResumeConfigError, match=r"mask.num_targets 4 -> 2"):
        check_resume_config(base, changed("mask.num_targets=2"), 50, "'x'")
    with pytest.raises(ResumeConfigError, match=r"model.patch_size 14 -> 16"):
        check_resume_config(base, changed("model.patch_size=16"), 50, "'x'")
    (warning,) = check_resume_config(base, changed("train.max_steps=200"), 50, "'x'")
    assert "train.max_steps 100 -> 200" in warning and "span 200 steps instead of 100" in warning
    assert "train.schedule_steps=100 keeps the old span" in warning and "lr 0.000" in warning
    # a longer run on the old span: the schedules do not change, only the stop
    (warning,) = check_resume_config(changed("train.schedule_steps=100"),
                                     changed("train.schedule_steps=100", "train.max_steps=200"), 50, "'x'")
    assert "lr" in warning and "(unchanged)" in warning and "instead of" not in warning
    assert check_resume_config(base, changed("train.log_every=1", "train.tensorboard=false",
                                             "model.attention_backend=sdpa", "data.num_workers=0"), 50, "'x'") == []
    (warning,) = check_resume_config(base, changed("train.batch_size=64"), 50, "'x'")
    assert "train.batch_size 128 -> 64" in warning
