"""Data for I-JEPA: image sources, transforms, and the two loaders behind one interface (``BatchStream``)."""
from __future__ import annotations

from . import dali, loader
from .batch import Batch, BatchStream, DataError


def build_batch_stream(cfg, grid, rank: int = 0, world_size: int = 1, device=None) -> tuple[BatchStream, str]:
    """This rank's batches as ``data.loader`` asks (``auto``: DALI when it can run, else torch), and one
    line for the log saying which loader runs and, for ``auto``, why DALI does not."""
    if dali.choose_loader(cfg) == "dali":
        stream = dali.DaliBatches(cfg, grid, rank, world_size, device)
        return stream, stream.describe()
    pin = device is not None and device.type == "cuda"
    stream = loader.TorchBatches(loader.build_batches(cfg, grid, rank, world_size), cfg.data.num_workers, pin_memory=pin)
    why = dali.dali_problem(cfg) if cfg.data.loader == "auto" else None
    return stream, stream.describe() + (f" ({why})" if why else "")


def restore_stream(stream: BatchStream, saved: list | None, rank: int, world_size: int) -> str | None:
    """Give this rank's saved loader state (``saved``: every rank's, in rank order) back to ``stream``.
    Returns a warning when the states cannot be used (another world size: the data order restarts)."""
    if not saved:
        return None
    if len(saved) != world_size:
        return (f"the checkpoint's data-loader state is for {len(saved)} ranks, not {world_size}: the data "
                "order restarts (masks and step count continue)")
    stream.load_state_dict(saved[rank])
    return None


__all__ = ["Batch", "BatchStream", "DataError", "build_batch_stream", "restore_stream"]
