"""NVIDIA DALI data path: image-folder files decoded and cropped by DALI, masks made beside it.

Pipeline (one per rank): ``fn.readers.file`` over the folder's (validated) file list, sharded by the
global rank, with one global shuffle per epoch (``shuffle_after_epoch``, the same seed on every rank) ->
``fn.decoders.image_random_crop`` (the I-JEPA crop: area 0.3-1.0 of the image, aspect 3/4-4/3; on the
GPU through nvImageCodec's ``mixed`` backend, with memory preallocated) -> ``fn.resize`` to the model's
size -> ``fn.crop_mirror_normalize`` to float32 CHW with the ImageNet statistics, no flip. On a GPU the
batch comes out of DALI as a CUDA tensor and goes straight into the step.

Masks come from a background thread, seeded by (seed, epoch, step, rank) exactly as the torch loader
seeds them, so a seed gives the same masks whichever loader runs. The pipeline's state (reader
position, shuffle and crop RNGs; DALI ``enable_checkpointing``) is part of the training checkpoint.

Bad files: before the pipeline is built every file is checked cheaply (its signature matches a JPEG,
PNG, BMP or WebP; a JPEG ends with its end-of-image marker, a PNG with its IEND chunk, so truncated files
are caught without decoding); failures are skipped, counted and named in one warning. A batch that still
fails to decode is dropped, counted as ``batch_size`` skipped images and replaced by the next one.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..masks import MaskSampler
from .batch import Batch, DataError
from .sources import ImageFolder, build_source
from .transforms import channel_stats

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import feed_ndarray

    DALI_AVAILABLE = True
except ImportError:  # optional: pip install nvidia-dali-cuda120 (or -cuda130)
    DALI_AVAILABLE = False

# nvImageCodec ("mixed") preallocation, from NVIDIA DALI's ResNet-50 training example
# (docs/examples/use_cases/pytorch/resnet50/main.py): enough for ImageNet's largest images without
# reallocating mid-run; hw_decoder_load 0.65 sends ~65 % of JPEGs to the A100/H100 hardware decoder.
MIXED_DECODER_ARGS = dict(device_memory_padding=211_025_920, host_memory_padding=140_544_512,
                          preallocate_width_hint=5980, preallocate_height_hint=6430, hw_decoder_load=0.65)
MAX_FAILED_BATCHES = 16  # undecodable batches in a row before the run stops (DataError)


# ---------------------------------------------------------------------------------------------------
# file checks
# ---------------------------------------------------------------------------------------------------
def file_problem(path: str | os.PathLike) -> str | None:
    """Why DALI could not decode ``path`` (cheap checks, no decoding), or None."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - 1024))
            tail = f.read()
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if head[:3] == b"\xff\xd8\xff":
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
    if head[:2] == b"BM" or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    return "not a JPEG, PNG, BMP or WebP file"


def checked_files(source: ImageFolder):
    """(files, labels, [(file, problem)]) of an image folder, the undecodable files left out."""
    problems = [file_problem(p) for p in source.files]
    keep = [i for i, problem in enumerate(problems) if problem is None]
    bad = [(str(source.files[i]), problems[i]) for i in range(len(problems)) if problems[i] is not None]
    return [str(source.files[i]) for i in keep], [int(source.labels[i]) for i in keep], bad


# ---------------------------------------------------------------------------------------------------
# availability
# ---------------------------------------------------------------------------------------------------
def dali_problem(cfg) -> str | None:
    """Why ``data.loader=dali`` cannot run with this config here, or None."""
    if not DALI_AVAILABLE:
        return "NVIDIA DALI is not installed (pip install nvidia-dali-cuda120, or nvidia-dali-cuda130 for CUDA 13)"
    if cfg.data.dataset != "folder":
        return f"DALI reads image folders; data.dataset is '{cfg.data.dataset}'"
    return None


def choose_loader(cfg) -> str:
    """``data.loader`` resolved: ``dali`` or ``torch``; an explicit ``dali`` that cannot run is an error."""
    problem = dali_problem(cfg)
    if cfg.data.loader == "dali" and problem:
        raise ValueError(f"data.loader='dali' cannot run: {problem}")
    if cfg.data.loader == "auto":
        return "torch" if problem else "dali"
    return cfg.data.loader


# ---------------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------------
def build_pipeline(files, labels, *, batch_size, size, channels, crop_scale, shard_id, num_shards, seed,
                   device_id=None, num_threads=2, checkpoint=None):
    """A DALI pipeline yielding (images float32 [B, C, size, size], labels int32 [B, 1]). ``device_id``
    None: CPU decoding; an int: nvImageCodec on that GPU."""
    mixed = device_id is not None
    mean, std = channel_stats(channels)

    @pipeline_def(enable_checkpointing=True)
    def jepa_pipeline():
        encoded, label = fn.readers.file(
            files=files, labels=labels, shard_id=shard_id, num_shards=num_shards, shuffle_after_epoch=True,
            seed=seed, pad_last_batch=True, name="Reader")
        images = fn.decoders.image_random_crop(
            encoded, device="mixed" if mixed else "cpu", output_type=types.GRAY if channels == 1 else types.RGB,
            random_area=list(crop_scale), random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10,
            **(MIXED_DECODER_ARGS if mixed else {}))
        images = fn.resize(images, resize_x=size, resize_y=size)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mirror=0,
                                          mean=[255 * m for m in mean], std=[255 * s for s in std])
        return images, label

    # the crop RNG differs per rank (pipeline seed); the shuffle is global (the reader's own seed)
    return jepa_pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                         seed=seed + 1000 * (shard_id + 1), prefetch_queue_depth=2, checkpoint=checkpoint)


class DaliBatches:
    """Sequential I-JEPA batches from DALI for one rank: a :class:`~fastjepa.data.batch.BatchStream`;
    ``steps_per_epoch`` like the torch loader's.

    The pipeline is run directly (not through DALI's iterator, whose epoch bookkeeping does not survive
    a batch that fails to decode): each epoch of a shard is ``ceil(S / B)`` batches of its ``S`` files
    (padded by DALI to the same count on every shard); the first ``S // B`` are used, a padded tail is
    run and dropped. ``state`` (from :meth:`state_dict`) resumes exactly where it was saved; so does
    :meth:`load_state_dict` on a stream built without it."""

    def __init__(self, cfg, grid, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
                 state: dict | None = None):
        source = build_source(cfg.data, cfg.model.img_size, "train")
        files, labels, bad = checked_files(source)
        if bad:
            shown = "; ".join(f"{Path(f).name}: {why}" for f, why in bad[:5])
            warnings.warn(f"DALI loader: skipping {len(bad)} undecodable file(s) of {len(source)} ({shown}"
                          f"{'; ...' if len(bad) > 5 else ''})", stacklevel=2)
        global_batch = cfg.train.batch_size * world_size
        if len(files) < global_batch:
            raise ValueError(f"the data set has {len(files)} decodable images, fewer than one global batch "
                             f"(train.batch_size={cfg.train.batch_size} x {world_size} ranks)")
        self.batch_size, self.rank, self.seed = cfg.train.batch_size, rank, cfg.train.seed
        self.files = files
        self.pending_skipped = 0 if state else len(bad)  # counted once, in the run's first batch
        self.device = device or torch.device("cpu")
        device_id = None
        if self.device.type == "cuda":
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self._pipeline_args = dict(
            files=files, labels=labels, batch_size=self.batch_size, size=cfg.model.img_size, channels=cfg.model.in_chans,
            crop_scale=cfg.data.crop_scale, shard_id=rank, num_shards=world_size, seed=cfg.train.seed,
            device_id=device_id, num_threads=max(1, cfg.data.num_workers))
        self.pipe = build_pipeline(**self._pipeline_args, checkpoint=None if state is None else state["pipeline"])
        meta = self.pipe.reader_meta("Reader")
        shard = meta["epoch_size_padded"] // world_size  # every shard padded to the same count
        self.steps_per_epoch = shard // self.batch_size
        self.batches_per_reader_epoch = -(-shard // self.batch_size)
        self.position = 0 if state is None else int(state["position"])  # batches run in this reader epoch
        self.masks = MaskSampler(cfg.mask, grid)
        self._mask_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastjepa-masks")

    def _mask_future(self, micro: int):
        epoch, step = divmod(micro, self.steps_per_epoch)
        return self._mask_thread.submit(self.masks, self.batch_size, self.seed, epoch, step, self.rank)

    def _run(self):
        """One pipeline iteration -> (images on the device, labels int64 on the CPU)."""
        images, labels = self.pipe.run()
        images = images.as_tensor()
        out = torch.empty(images.shape(), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(images, out, cuda_stream=stream)  # DALI's buffer -> ours (GPU to GPU on CUDA)
        return out, torch.from_numpy(np.array(labels.as_tensor())).view(-1).long()

    def _next_images(self):
        """(images, labels, skipped) of the next decodable batch of the current epoch."""
        skipped = 0
        for _ in range(MAX_FAILED_BATCHES):
            if self.position >= self.steps_per_epoch:  # the padded tail of the reader's epoch
                for _ in range(self.batches_per_reader_epoch - self.position):
                    try:
                        self.pipe.run()
                    except RuntimeError:
                        pass
                self.position = 0
            self.position += 1
            try:
                images, labels = self._run()
            except RuntimeError as err:  # a file that passed the checks and still failed to decode
                warnings.warn(f"DALI loader: dropping an undecodable batch: {str(err).strip().splitlines()[0][:200]}",
                              stacklevel=2)
                skipped += self.batch_size
                continue
            return images, labels, skipped
        raise DataError(f"{MAX_FAILED_BATCHES} DALI batches in a row failed to decode")

    def iterate(self, start_micro_step: int, stop_micro_step: int):
        """Batches for micro-steps ``[start, stop)``; the pipeline must be at ``start`` (fresh, or
        restored from a checkpoint taken there)."""
        upcoming = self._mask_future(start_micro_step) if start_micro_step < stop_micro_step else None
        for micro in range(start_micro_step, stop_micro_step):
            images, labels, skipped = self._next_images()
            masks = upcoming.result()
            if micro + 1 < stop_micro_step:
                upcoming = self._mask_future(micro + 1)  # made while the step runs
            skipped += self.pending_skipped
            self.pending_skipped = 0
            epoch, step = divmod(micro, self.steps_per_epoch)
            yield Batch(images, labels, masks, epoch, step, skipped)

    def state_dict(self) -> dict:
        """The pipeline's checkpoint after the last batch handed out, and the position in its epoch."""
        return {"loader": "dali", "pipeline": self.pipe.checkpoint(), "position": self.position}

    def load_state_dict(self, state: dict | None) -> None:
        """Continue where :meth:`state_dict` was taken: the pipeline is rebuilt from its checkpoint."""
        if state is None:
            return
        del self.pipe
        self.pipe = build_pipeline(**self._pipeline_args, checkpoint=state["pipeline"])
        self.position = int(state["position"])
        self.pending_skipped = 0  # counted by the run that saved the state

    def describe(self) -> str:
        return f"NVIDIA DALI, decoding on the {'GPU (nvImageCodec)' if self.device.type == 'cuda' else 'CPU'}"

    def close(self) -> None:
        self._mask_thread.shutdown(wait=False)


__all__ = ["DALI_AVAILABLE", "DaliBatches", "build_pipeline", "checked_files", "choose_loader", "dali_problem",
           "file_problem"]
