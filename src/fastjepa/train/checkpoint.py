"""Checkpointing: save and resume a run's :class:`~fastjepa.io.train_state.TrainState`, keep the newest
``train.keep_checkpoints``, and export the target encoder.

A backend writes through its :class:`CheckpointStore`: :class:`FileStore` here (one process: one atomic
``checkpoints/step_XXXXXXXX.pt`` per save) or ``fastjepa.train.deepspeed_backend.DeepSpeedStore`` (DeepSpeed's tag
folders, every rank writing its partitions, plus the ZeRO-3 target shards). A store fills in the weights
itself (the model, optimizer and target it was given) and loads them back itself, so :class:`Checkpoints`
handles only what every backend shares.

Resuming takes the newest checkpoint that loads: one that does not (truncated, empty, damaged, not a
checkpoint, missing keys) is named in one line with its reason, moved to ``checkpoints/corrupt/``, and the
one before it is tried. Before any weights are loaded, the checkpoint's config is compared with the
current one (``resume_config.py``).
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ..io.files import (
    TARGET_FILE,
    CheckpointError,
    checkpoint_file,
    checkpoint_files,
    export_safetensors,
    move_aside,
    prune_checkpoint_files,
    verify_checkpoint_file,
)
from ..io.train_state import TrainState
from .resume_config import check_resume_config

CORRUPT_DIR = "corrupt"  # checkpoints/corrupt/: checkpoints that did not load, kept for a post-mortem
Accept = Callable[[TrainState, str], None]  # (state, where): raises to refuse a checkpoint before it loads


def set_aside(path: Path, corrupt_dir: Path, err: Exception) -> Path:
    """Move a checkpoint that does not load into ``corrupt_dir``, saying so in one line."""
    dest = move_aside(path, corrupt_dir)
    print(f"fastjepa: {err}; moved it to {dest} and trying the checkpoint before it", file=sys.stderr, flush=True)
    return dest


class CheckpointStore(Protocol):
    def save(self, state: TrainState) -> None:
        """Write ``state`` (counters, RNG, data, config) with the weights; collective under DeepSpeed."""

    def load_latest(self, accept: Accept) -> tuple[TrainState, str] | None:
        """Load the newest checkpoint that loads into the models and optimizer: ``(state, where)``, None
        when there is none, a :class:`CheckpointError` when there were some but none loads."""

    def export_target(self, state: TrainState, final: bool) -> dict | None:
        """The whole target encoder's state dict to export on the main rank now, or None (not now / not here)."""


class FileStore:
    """One process: ``folder/step_XXXXXXXX.pt``, each a whole :class:`TrainState`, the newest ``keep`` kept."""

    def __init__(self, folder: Path, keep: int, backend):
        self.folder, self.keep, self.backend = Path(folder), keep, backend

    def save(self, state: TrainState) -> None:
        b = self.backend
        state.model, state.optimizer = b.model.state_dict(), b.optimizer.state_dict()
        state.target = b.target.state_dict()
        state.save(checkpoint_file(self.folder, state.step))
        prune_checkpoint_files(self.folder, self.keep)

    def load_latest(self, accept: Accept):
        b, found = self.backend, checkpoint_files(self.folder)
        for path in reversed(found):
            try:
                verify_checkpoint_file(path)  # torch.load checks no CRC: a flipped byte would load
                state = TrainState.load(path, map_location=b.device, need=("model", "optimizer", "target"))
            except CheckpointError as err:
                set_aside(path, self.folder / CORRUPT_DIR, err)
                continue
            accept(state, f"'{path}'")
            try:
                b.model.load_state_dict(state.model)
                b.optimizer.load_state_dict(state.optimizer)
                b.target.load_state_dict(state.target)
            except (RuntimeError, ValueError, KeyError) as err:  # same config, other weights: not corruption
                first = str(err).strip().splitlines()
                raise CheckpointError(f"'{path}' does not fit the model its own config builds: "
                                      f"{' '.join(first[:2])[:300]}") from None
            return state, str(path)
        if found:
            raise CheckpointError(f"none of the {len(found)} checkpoints in '{self.folder}' loads (all moved to "
                                  f"{self.folder / CORRUPT_DIR}): start again with --overwrite, or restore one")
        return None

    def export_target(self, state: TrainState, final: bool):
        return self.backend.target.state_dict()


class Checkpoints:
    """The run's checkpoints under ``output_dir``: what to write when, and the exported target encoder."""

    def __init__(self, output_dir: Path, backend, keep: int):
        self.output_dir, self.backend = Path(output_dir), backend
        self.store: CheckpointStore = backend.checkpoint_store(self.output_dir / "checkpoints", keep)
        self.saved_step: int | None = None  # the newest checkpoint written or loaded

    def save(self, state: TrainState, final: bool = False) -> None:
        """Checkpoint ``state`` (on every rank under DeepSpeed) unless its step is saved already, and export
        the target encoder as safetensors (ZeRO-3: only when ``final``, its one whole copy being the shards)."""
        if state.step != self.saved_step:
            self.store.save(state)
            self.saved_step = state.step
        target = self.store.export_target(state, final)
        if target is not None and self.backend.is_main:
            export_safetensors(self.output_dir / TARGET_FILE, target,
                               metadata={"step": str(state.step), "config": json.dumps(state.config)})

    def resume(self, config: dict, say: Callable[[str], None]) -> tuple[TrainState, str] | None:
        """Load the newest checkpoint that loads into the models and optimizer: ``(state, where)``, or None.
        A checkpoint whose config differs from ``config`` in a way that matters is refused before its
        weights load; a harmless difference is a warning through ``say``."""
        def accept(state: TrainState, where: str) -> None:
            for line in check_resume_config(state.config, config, state.step, where):
                say(f"fastjepa: warning: {line}")

        found = self.store.load_latest(accept)
        if found is None:
            say(f"fastjepa: --resume found no checkpoint in {self.output_dir / 'checkpoints'}; starting from step 0")
        else:
            self.saved_step = found[0].step
        return found


__all__ = ["CORRUPT_DIR", "TARGET_FILE", "CheckpointStore", "Checkpoints", "FileStore", "set_aside"]
