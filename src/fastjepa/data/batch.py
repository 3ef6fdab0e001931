"""What every data loader hands the trainer, and the one interface they share.

A loader is a :class:`BatchStream`: ``iterate(start, stop)`` yields the :class:`Batch` of each global
micro-step in ``[start, stop)``, in order; ``state_dict()`` / ``load_state_dict()`` carry whatever a
checkpoint needs beyond the step to continue with the very next batch (None when the step is enough).
Implementations: the torch DataLoader (``fastjepa.data.loader.TorchBatches``) and NVIDIA DALI
(``fastjepa.data.dali.DaliBatches``).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ..masks import PackedMasks


class DataError(RuntimeError):
    """The data cannot feed the run (e.g. a long run of unreadable images); the trainer stops cleanly."""


@dataclass
class Batch:
    images: torch.Tensor  # [B, C, S, S] float32, normalised (on the device already when DALI decodes there)
    labels: torch.Tensor  # [B] int64
    masks: PackedMasks
    epoch: int
    step_in_epoch: int
    skipped: int  # unreadable images replaced in this batch

    def pin_memory(self) -> Batch:
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.masks.pin_memory(),
                     self.epoch, self.step_in_epoch, self.skipped)


class BatchStream(Protocol):
    """One rank's batches. ``steps_per_epoch``: micro-steps in an epoch of this rank's shard."""

    steps_per_epoch: int

    def iterate(self, start_micro_step: int, stop_micro_step: int) -> Iterator[Batch]: ...

    def state_dict(self) -> dict | None: ...

    def load_state_dict(self, state: dict | None) -> None: ...

    def describe(self) -> str:
        """One line for the start-up log: which loader, decoding where."""

    def close(self) -> None: ...


__all__ = ["Batch", "BatchStream", "DataError"]
