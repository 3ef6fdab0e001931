"""The exit codes of ``fastjepa train``, and the one line that says why a run stopped early.

0: done, or stopped by a signal with a checkpoint; 2: bad input (the command line's: config, folder,
checkpoint); 3: ``train.max_nonfinite_steps`` non-finite steps in a row (a checkpoint of the last good
state); 4: unreadable data; 5: a write failed (disk full, read-only: the earlier checkpoints are kept);
130: a second Ctrl-C (stopped at once, no checkpoint).
"""
from __future__ import annotations

from pathlib import Path

from ..data import DataError
from ..io.files import SaveError, free_space

EXIT_OK, EXIT_USAGE, EXIT_NONFINITE, EXIT_DATA, EXIT_SAVE, EXIT_INTERRUPTED = 0, 2, 3, 4, 5, 130


def stop_line(err: BaseException, step: int, newest: int | None, output_dir: Path) -> tuple[str, int]:
    """``(line, exit code)`` for a run stopped at ``step`` by bad data, a failed write or a second Ctrl-C."""
    if isinstance(err, DataError):  # raised in a loader worker; its last line names the files
        return f"fastjepa: error: {str(err).strip().splitlines()[-1]} (stopped at step {step})", EXIT_DATA
    if isinstance(err, KeyboardInterrupt):  # a second Ctrl-C (signals.py)
        return (f"fastjepa: interrupted again: stopped at once at step {step} without a checkpoint (the newest is "
                f"step {newest or 0})"), EXIT_INTERRUPTED
    if not isinstance(err, SaveError):  # metrics.jsonl, config.json, tensorboard: disk full, read-only, gone
        err = f"could not write '{err.filename or output_dir}': {err.strerror} ({free_space(output_dir)})"
    return f"fastjepa: error: {err}; stopped at step {step}, the checkpoints before it are kept", EXIT_SAVE


__all__ = ["EXIT_DATA", "EXIT_INTERRUPTED", "EXIT_NONFINITE", "EXIT_OK", "EXIT_SAVE", "EXIT_USAGE", "stop_line"]
