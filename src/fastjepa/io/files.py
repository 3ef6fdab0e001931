"""Files on disk: the one atomic writer, the one weights-only reader, and checkpoint names.

Every file fastjepa writes goes through :func:`atomic_write`: a temporary file in the same folder, fsynced,
renamed over the final name, then the folder fsynced, so a kill at any moment leaves either the old file
or the new one and a half-written file never carries a real name. Every weights file it reads goes
through :func:`read_weights`: safetensors, or ``torch.load(weights_only=True)`` (tensors and plain
containers only: nothing else is unpickled). Any problem is a :class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^step_(\d{8})(\.pt)?$")  # a file step_XXXXXXXX.pt, or a DeepSpeed tag folder
TMP_SUFFIX = ".tmp"
TARGET_FILE = "target_encoder.safetensors"  # a run's exported target encoder, beside checkpoints/


class CheckpointError(ValueError):
    """A weights or checkpoint file that is missing, unreadable, or does not fit the model; the message
    names the file and, for a misfit, the keys."""


def checkpoint_tag(step: int) -> str:
    """``step_XXXXXXXX``: the name of a checkpoint (``.pt`` file, or DeepSpeed tag folder)."""
    return f"step_{step:08d}"


def checkpoint_file(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"{checkpoint_tag(step)}.pt"


def step_of(path: str | Path) -> int | None:
    """The step a checkpoint's name carries, or None for any other name (temporary files included)."""
    match = CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The ``step_XXXXXXXX.pt`` files of a folder, oldest first (temporary files are not among them)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix == ".pt" and step_of(p) is not None)


def newest_checkpoint_file(folder: str | Path) -> Path | None:
    found = checkpoint_files(folder)
    return found[-1] if found else None


def prune_checkpoint_files(folder: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoint files of a folder."""
    for old in checkpoint_files(folder)[:-keep]:
        old.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Create ``path`` through ``write(temporary_path)``: all of it or, after a crash, none of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a crash
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def export_safetensors(path: str | Path, state_dict: dict, metadata: dict | None = None) -> Path:
    """Atomically write a state dict (contiguous CPU copies) as safetensors."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def torch_save(path: str | Path, obj) -> Path:
    """Atomically ``torch.save`` an object of tensors and plain containers."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_weights(path: str | Path, map_location="cpu") -> tuple[dict, dict]:
    """``(contents, metadata)``: a safetensors file's tensors and string metadata, or the dict a
    ``torch.save`` file holds (metadata empty). Raises :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"'{path}' does not exist")
    if path.is_dir():
        raise CheckpointError(f"'{path}' is a directory, not a weights file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"'{path}' is not a readable safetensors file: {_first_line(err)}") from None
    import torch

    try:
        contents = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a page long; its "Unsupported global: GLOBAL x.Y" sentence names the culprit
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        reason = f"it refuses {found.group(1)}" if found else _first_line(err)
        raise CheckpointError(
            f"'{path}' holds Python objects besides tensors and plain containers, which "
            f"torch.load(weights_only=True) will not unpickle ({reason}); re-save its state dicts alone (a dict "
            "of tensors) to load it") from None
    except Exception as err:  # noqa: BLE001 - a truncated zip, a foreign file: name the file
        raise CheckpointError(f"'{path}' cannot be read as a PyTorch checkpoint (truncated, or not a torch.save "
                              f"file): {_first_line(err)}") from None
    if not isinstance(contents, dict):
        raise CheckpointError(f"'{path}' holds a {type(contents).__name__}, not a dict of state dicts")
    return contents, {}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


__all__ = ["CHECKPOINT_RE", "TARGET_FILE", "CheckpointError", "atomic_write", "checkpoint_file", "checkpoint_files", "checkpoint_tag",
           "export_safetensors", "newest_checkpoint_file", "prune_checkpoint_files", "read_weights", "step_of",
           "torch_save"]
