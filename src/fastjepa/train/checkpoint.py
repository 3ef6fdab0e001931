"""Checkpointing: save and resume a run's :class:`~fastjepa.io.train_state.TrainState`, keep the newest
``train.keep_checkpoints``, and export the target encoder.

A backend writes through its :class:`CheckpointStore`: :class:`FileStore` here (one process: one atomic
``checkpoints/step_XXXXXXXX.pt`` per save) or ``fastjepa.train.deepspeed_backend.DeepSpeedStore`` (DeepSpeed's tag
folders, every rank writing its partitions, plus the ZeRO-3 target shards). A store fills in the weights
itself (the model, optimizer and target it was given) and loads them back itself, so :class:`Checkpoints`
handles only what every backend shares.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from ..io.files import TARGET_FILE, checkpoint_file, export_safetensors, newest_checkpoint_file, prune_checkpoint_files
from ..io.train_state import TrainState


class CheckpointStore(Protocol):
    def save(self, state: TrainState) -> None:
        """Write ``state`` (counters, RNG, data, config) with the weights; collective under DeepSpeed."""

    def load_latest(self) -> tuple[TrainState, str] | None:
        """Load the newest checkpoint's weights into the models and optimizer; ``(state, where)`` or None."""

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

    def load_latest(self):
        path = newest_checkpoint_file(self.folder)
        if path is None:
            return None
        b = self.backend
        state = TrainState.load(path, map_location=b.device, need=("model", "optimizer", "target"))
        b.model.load_state_dict(state.model)
        b.optimizer.load_state_dict(state.optimizer)
        b.target.load_state_dict(state.target)
        return state, str(path)

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

    def resume(self) -> tuple[TrainState, str] | None:
        """Load the newest checkpoint into the models and optimizer: ``(state, where)``, or None if none."""
        found = self.store.load_latest()
        if found is not None:
            self.saved_step = found[0].step
        return found


__all__ = ["TARGET_FILE", "CheckpointStore", "Checkpoints", "FileStore"]
