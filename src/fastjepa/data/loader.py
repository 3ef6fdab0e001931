"""The torch loader: each DataLoader item is a whole batch (images + packed masks), made in a worker.

The sampler yields keys ``(epoch, step_in_epoch, micro_step)``; the dataset turns a key into this
rank's share of that global batch. Everything random (the permutation, crops, masks) is seeded by
(seed, epoch, step, rank), so resuming at a step reproduces the exact batches that would have come.
"""
from __future__ import annotations

import signal
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..masks import MaskSampler
from .batch import Batch, DataError
from .sources import build_source
from .transforms import ImageTransform

MAX_REPLACEMENTS = 16  # unreadable images in a row before a batch gives up


class BatchKeys(Sampler):
    """Keys of micro-batches from ``start`` (a global micro-step) to ``stop``."""

    def __init__(self, steps_per_epoch: int, start: int, stop: int):
        self.steps_per_epoch, self.start, self.stop = steps_per_epoch, start, stop

    def __iter__(self):
        for micro in range(self.start, self.stop):
            yield divmod(micro, self.steps_per_epoch)

    def __len__(self):
        return self.stop - self.start


class JEPABatches(Dataset):
    def __init__(self, source, transform: ImageTransform, mask_sampler: MaskSampler, batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1):
        self.source, self.transform, self.mask_sampler = source, transform, mask_sampler
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        global_batch = batch_size * world_size
        if len(source) < global_batch:
            raise ValueError(
                f"the data set has {len(source)} images, fewer than one global batch "
                f"(train.batch_size={batch_size} x {world_size} ranks)"
            )
        self.steps_per_epoch = len(source) // global_batch

    def indices(self, epoch: int, step: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch, 0x5045]).permutation(len(self.source))
        start = (step * self.world_size + self.rank) * self.batch_size
        return order[start : start + self.batch_size]

    def _load(self, index: int, rng: np.random.Generator):
        """(tensor, label, skipped): an unreadable image is replaced by the next one and counted."""
        for skipped in range(MAX_REPLACEMENTS):
            i = (index + skipped) % len(self.source)
            try:
                img = self.source.load(i)
            except Exception as err:  # noqa: BLE001 -- any decode failure: skip and count
                warnings.warn(f"skipping unreadable image {self.source.describe(i)}: {err}", stacklevel=2)
                continue
            return self.transform(img, rng), int(self.source.labels[i]), skipped
        raise DataError(f"{MAX_REPLACEMENTS} unreadable images in a row from {self.source.describe(index)}: "
                        "is the data folder made of image files PIL can open?")

    def __getitem__(self, key) -> Batch:
        epoch, step = key
        rng = np.random.default_rng([self.seed, epoch, step, self.rank, 0x494D])
        images, labels, skipped = [], [], 0
        for i in self.indices(epoch, step):
            x, y, s = self._load(int(i), rng)
            images.append(x)
            labels.append(y)
            skipped += s
        masks = self.mask_sampler(len(images), self.seed, epoch, step, self.rank)
        return Batch(torch.stack(images), torch.tensor(labels), masks, epoch, step, skipped)

    def __len__(self):
        return self.steps_per_epoch


def _worker_init(_):
    torch.set_num_threads(1)
    # a signal to the process group (Slurm, Kubernetes, `timeout`, Ctrl-C, DeepSpeed's launch.py) reaches the
    # workers too: they leave it to the trainer, which checkpoints and then shuts them down
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def build_batches(cfg, grid, rank: int = 0, world_size: int = 1) -> JEPABatches:
    """The torch loader's dataset: random access by (epoch, step) (DALI's batches: fastjepa.data.dali)."""
    source = build_source(cfg.data, cfg.model.img_size, "train")
    transform = ImageTransform(cfg.model.img_size, cfg.model.in_chans, cfg.data.crop_scale)
    masks = MaskSampler(cfg.mask, grid)
    return JEPABatches(source, transform, masks, cfg.train.batch_size, cfg.train.seed, rank, world_size)


def build_loader(batches: JEPABatches, start_micro_step: int, stop_micro_step: int, num_workers: int,
                 pin_memory: bool = False) -> DataLoader:
    keys = BatchKeys(batches.steps_per_epoch, start_micro_step, stop_micro_step)
    return DataLoader(
        batches, batch_size=None, sampler=keys, num_workers=num_workers, pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers else None, persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )


class TorchBatches:
    """The torch DataLoader as a :class:`~fastjepa.data.batch.BatchStream`. Every batch is a pure function of
    (seed, epoch, step, rank), so the step alone resumes it: ``state_dict()`` is None.

    ``batches`` is the random-access dataset (``batches[(epoch, step)]``), read by benchmarks and tests."""

    def __init__(self, batches: JEPABatches, num_workers: int, pin_memory: bool = False):
        self.batches, self.num_workers, self.pin_memory = batches, num_workers, pin_memory

    @property
    def steps_per_epoch(self) -> int:
        return self.batches.steps_per_epoch

    def iterate(self, start_micro_step: int, stop_micro_step: int):
        return iter(build_loader(self.batches, start_micro_step, stop_micro_step, self.num_workers, self.pin_memory))

    def state_dict(self):
        return None

    def load_state_dict(self, state) -> None:
        pass  # nothing beyond the step

    def describe(self) -> str:
        return "torch DataLoader"

    def close(self) -> None:
        pass
