"""Stop and save requests: a signal sets a flag that the loop acts on at the next step boundary, so a stop
by an operator or a scheduler loses no finished step.

- SIGTERM, SIGINT: checkpoint at the next step boundary, then exit 0. A second SIGINT stops at once (exit
  130, no checkpoint); a third is Python's default (the process ends even inside a C call).
- SIGUSR1: checkpoint at the next step boundary and keep training.
- A launcher that is gone (the watch list, e.g. DeepSpeed's ``launch.py`` and the ``deepspeed`` runner):
  the same as SIGTERM, so that no rank trains on unsupervised.
Under DeepSpeed the ranks agree on a request (one all-reduce, :meth:`StopRequests.poll`), so every rank
stops or saves at the same step even when only one was signalled.
"""
from __future__ import annotations

import signal
import threading

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SAVE_SIGNALS = (signal.SIGUSR1,)
WATCH_EVERY_S = 1.0


class StopRequests:
    """While installed (``with StopRequests() as stop:``), the signals above set ``stop.reason`` (why to stop)
    or ``stop.save_now`` instead of ending the process. ``watch``: ``(pid, parent pid, parent's name)``
    triples; the run stops when such a process has lost its parent."""

    def __init__(self, watch=()):
        self.reason: str | None = None
        self._signal: int | None = None
        self.save_now = False
        self.interrupts = 0
        self.watch = list(watch)
        self._previous = {}
        self._watching = threading.Event()

    @property
    def signal(self) -> int | None:  # kept for callers that set a signal number directly
        return self._signal if self.reason else None

    @signal.setter
    def signal(self, signum: int) -> None:
        self._signal = signum
        self.reason = f"signal {int(signum)} ({signal.Signals(signum).name})"

    def request_stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def _handle(self, signum, _frame) -> None:
        if signum in SAVE_SIGNALS:
            self.save_now = True
            return
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:  # a second Ctrl-C: the user will not wait for the step boundary
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                raise KeyboardInterrupt
        if self.reason is None:
            self.signal = signum

    def poll(self, backend) -> tuple[str | None, bool]:
        """``(why to stop or None, whether to save now)``, agreed by every rank (a host sync under DeepSpeed).
        On a stop the ranks also share their reasons, so a rank that has not yet seen the signal or the lost
        launcher itself (its watch runs a moment later) still names the cause."""
        reason = self.reason  # one snapshot: a handler or the watch thread may set it meanwhile
        flags = torch.tensor([float(reason is not None), float(self.save_now)], dtype=torch.float64)
        stop, save = (backend.all_reduce_sum(flags) > 0).tolist()
        self.save_now = False
        if not stop:
            return None, save
        reasons = backend.gather_objects(reason)  # every rank takes part; a stop is rare, so it costs nothing
        if reason is not None:
            return reason, save
        rank = next(r for r, why in enumerate(reasons) if why is not None)
        return f"{reasons[rank]} (seen on rank {rank})", save

    # ---- launchers --------------------------------------------------------------------------------
    def _watch_parents(self) -> None:
        import psutil  # a DeepSpeed requirement; only DeepSpeed runs watch

        while not self._watching.wait(WATCH_EVERY_S):
            for pid, parent, name in self.watch:
                try:
                    alive = psutil.Process(pid).ppid() == parent  # an orphan is re-parented at once
                except psutil.Error:
                    alive = False
                if not alive:
                    self.request_stop(f"{name} (pid {parent}) is gone")
                    return

    def __enter__(self) -> StopRequests:
        for sig in STOP_SIGNALS + SAVE_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if self.watch:
            self._watching.clear()
            threading.Thread(target=self._watch_parents, name="fastjepa-launcher-watch", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._watching.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


__all__ = ["SAVE_SIGNALS", "STOP_SIGNALS", "StopRequests"]
