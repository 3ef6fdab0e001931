"""The run folder (``--output-dir``): one run at a time, and never two runs mixed in one folder.

- An advisory lock (``fcntl.flock`` on ``.fastjepa.lock``) is held for the life of the run: a second trainer
  on the folder stops at once with a message naming the first (pid, host, start). The kernel drops the
  lock when the process ends, however it ends (``kill -9`` included), so a stale lock cannot block a resume.
  On NFS, ``flock`` may only exclude processes of the same host.
- A fresh run (no ``--resume``) into a folder that holds a run (checkpoints or metrics) stops, unless
  ``--overwrite`` says to delete that run first.
- Temporary files of killed saves are removed at start; on resume ``metrics.jsonl`` is cut back to the
  resumed step, so a step logged after the last checkpoint is not logged twice.

Only the main rank touches the folder; every rank learns its verdict (one collective at start).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from ..io.files import TARGET_FILE, atomic_write, free_space, human_bytes, step_of, temporary_files

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

LOCK_FILE = ".fastjepa.lock"
METRICS_FILE = "metrics.jsonl"
RUN_FILES = (METRICS_FILE, "config.json", TARGET_FILE, "tensorboard", "checkpoints")  # what --overwrite deletes


class RunDirError(ValueError):
    """The output folder cannot take this run; the message names the folder and what to do."""


class RunDir:
    """The run's folder, locked while the run lives (``release()``, or the process's end, unlocks it)."""

    def __init__(self, path: str | Path, is_main: bool = True):
        self.path, self.is_main, self._lock = Path(path), is_main, None

    @classmethod
    def open(cls, path, backend, resume: bool = False, overwrite: bool = False, say=print) -> RunDir:
        """Create, lock and check the folder on the main rank; every rank raises its error, or none does."""
        run, error = cls(path, backend.is_main), None
        if run.is_main:
            try:
                run._prepare(resume, overwrite, say)
            except RunDirError as err:
                error = err
        if backend.any_rank(error is not None):
            run.release()
            raise error or RunDirError(f"the output folder '{path}' cannot be used (rank 0 says why)")
        return run

    def _prepare(self, resume: bool, overwrite: bool, say) -> None:
        if resume and overwrite:
            raise RunDirError("--resume continues the run in --output-dir and --overwrite deletes it: pass one")
        self._create()
        self._take_lock()
        held = self.describe_run()
        if held and not resume:
            if not overwrite:
                raise RunDirError(f"'{self.path}' holds a run ({held}): pass --resume to continue it, --overwrite to "
                                  "delete it and start again, or choose another --output-dir")
            for name in RUN_FILES:
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            say(f"fastjepa: --overwrite: deleted the run that was in {self.path} ({held})")
        count, size = self._remove_temporaries()
        if count:
            say(f"fastjepa: removed {count} temporary file(s) of interrupted saves ({human_bytes(size)})")

    def _create(self) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunDirError(f"--output-dir '{path}' is a file, not a folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
            if blocker is not None:
                raise RunDirError(f"cannot create --output-dir '{path}': '{blocker}' is a file, not a folder") from None
            raise RunDirError(f"cannot create --output-dir '{path}': {err.strerror}") from None

    def _take_lock(self) -> None:
        try:
            lock = open(self.path / LOCK_FILE, "a+")
        except OSError as err:
            raise RunDirError(f"cannot write to the output folder '{self.path}' ({err.strerror.lower()}; "
                              f"{free_space(self.path)}): the run could save no checkpoint") from None
        if fcntl is not None:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "holder unknown"
                lock.close()
                raise RunDirError(f"'{self.path}' is in use by another fastjepa run ({holder}): two runs in one folder "
                                  "would mix their metrics and checkpoints; wait for it to end or choose another "
                                  "--output-dir") from None
        try:  # who holds it, for the message above (best effort: a full disk must not stop a resume here)
            lock.seek(0)
            lock.truncate()
            lock.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            lock.flush()
        except OSError:
            pass
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None

    # ---- what the folder holds ----------------------------------------------------------------------
    def checkpoint_steps(self) -> list[int]:
        """Steps of the checkpoints in the folder (single-process files and DeepSpeed tags)."""
        folders = [self.path / "checkpoints", self.path / "checkpoints" / "deepspeed"]
        return sorted(s for f in folders if f.is_dir() for p in f.iterdir() if (s := step_of(p)) is not None)

    def describe_run(self) -> str | None:
        """``"checkpoints up to step 12, 12 metrics records"``, or None for a folder without a run."""
        steps, parts = self.checkpoint_steps(), []
        if steps:
            parts.append(f"checkpoints up to step {steps[-1]}")
        metrics = self.path / METRICS_FILE
        if metrics.is_file():
            records = sum(1 for line in metrics.read_text(errors="replace").splitlines() if line.strip())
            if records:
                parts.append(f"{records} metrics records")
        return ", ".join(parts) or None

    def _remove_temporaries(self) -> tuple[int, int]:
        """Delete the temporary files of killed saves (each as big as a checkpoint): (count, bytes)."""
        ckpt = self.path / "checkpoints"
        folders = [self.path, ckpt, ckpt / "deepspeed"]
        if (ckpt / "deepspeed").is_dir():
            folders += [p for p in (ckpt / "deepspeed").iterdir() if p.is_dir()]
        count = size = 0
        for folder in folders:
            for tmp in temporary_files(folder):
                size += tmp.stat().st_size
                tmp.unlink(missing_ok=True)
                count += 1
        return count, size

    def truncate_metrics(self, step: int, say=print) -> None:
        """Cut ``metrics.jsonl`` back to ``step`` (the resumed one): later records, a torn last line and
        repeated steps go, so that every step appears once after the resume."""
        path = self.path / METRICS_FILE
        if not self.is_main or not path.is_file():
            return
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        by_step = {}
        for line in lines:
            try:
                record_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill
            if isinstance(record_step, int) and record_step <= step:
                by_step[record_step] = line  # a repeated step: the later record
        kept = [by_step[s] for s in sorted(by_step)]
        if kept == lines:
            return
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))
        say(f"fastjepa: {METRICS_FILE}: dropped {len(lines) - len(kept)} record(s) after step {step} or unreadable "
            "(logged after the checkpoint the run resumes from)")


__all__ = ["LOCK_FILE", "RunDir", "RunDirError"]
