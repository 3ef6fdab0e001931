"""Atomic checkpoints: written to a temporary file in the same folder, fsynced, then renamed.

A kill at any moment leaves either the old set of files or the new one; a half-written file never
carries a checkpoint's name. Loading uses ``torch.load(weights_only=True)`` or safetensors only.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

CHECKPOINT_RE = re.compile(r"^step_(\d{8})\.pt$")


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step_{step:08d}.pt"


def save_checkpoint(folder: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write ``state`` as ``folder/step_XXXXXXXX.pt`` and drop all but the newest ``keep``."""
    path = checkpoint_path(folder, step)
    _atomic_write(path, lambda tmp: torch.save(state, tmp))
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CHECKPOINT_RE.match(p.name))


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load without unpickling arbitrary objects; a damaged file is an error that names it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise RuntimeError(f"checkpoint '{path}' cannot be loaded: {err}") from err


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def export_safetensors(path: Path, state_dict: dict, metadata: dict | None = None) -> None:
    """Atomically write a state dict (contiguous CPU copies) as safetensors."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))
