"""Stop requests: a signal sets a flag that the loop acts on at the next step boundary (checkpoint, then a
clean exit), so a kill by the scheduler loses no finished step."""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM,)


class StopRequests:
    """While installed (``with StopRequests() as stop:``), the signals in ``STOP_SIGNALS`` set
    ``stop.signal`` instead of ending the process."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def _handle(self, signum, _frame) -> None:
        self.signal = signum

    def __enter__(self) -> StopRequests:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


__all__ = ["STOP_SIGNALS", "StopRequests"]
