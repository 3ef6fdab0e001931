"""Frozen-encoder features for evaluation, cached on disk, and the command line the probe and kNN share.

A feature is the mean over tokens of the final-LayerNorm'd block output: ``layers=1`` is the encoder's
own output (the I-JEPA feature); ``layers=4`` concatenates the last four blocks' pooled outputs, each
through the final norm, oldest first (DINO's linear evaluation, ``n_last_blocks=4``), so its last ``D``
columns are the ``layers=1`` feature. Extraction runs in batches under ``no_grad`` on the GPU when there
is one (bf16 autocast there), with decoding workers and a progress bar on stderr. An image that cannot be
read is skipped and counted, as the trainer does. The cache is one ``.npz`` per (encoder, data set,
options), named by a digest of the encoder's weights and architecture, the data set's files and the
options, so a changed encoder or folder never reads stale features.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import UnidentifiedImageError
from tqdm import tqdm

from ..config import build_config
from ..data.sources import ImageFolder, build_source
from ..data.transforms import EvalTransform, ImageTransform
from ..io.encoder import read_encoder
from ..io.files import atomic_write
from ..io.weights import encoder_from_state, inference_config
from ..models import build_encoder
from ..train.launch import detect_launch

CACHE_VERSION = "2"  # bump when the feature definition changes


# ---- features ---------------------------------------------------------------------------------------
def pooled_features(encoder: nn.Module, images: torch.Tensor, layers: int = 1) -> torch.Tensor:
    """``images [B, C, H, W]`` -> ``[B, layers * D]`` float32: the last ``layers`` blocks' outputs,
    each through the final norm and averaged over tokens, oldest first."""
    if layers == 1:
        return encoder(images).mean(dim=1).float()
    return torch.cat([h.mean(dim=1).float() for h in encoder.forward_intermediates(images, layers)], dim=1)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> this rank's CUDA device when there is one (``LOCAL_RANK`` under a launcher), else the
    CPU; any other name as given."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", detect_launch().local_rank % torch.cuda.device_count())
    return torch.device(name)


@dataclass(frozen=True)
class Ranks:
    """The processes that share an extraction: rank ``r`` of ``world`` extracts images ``r, r + world, ...``
    and rank 0 gathers them back in order (and alone fits and reports)."""

    rank: int = 0
    world: int = 1


ONE_PROCESS = Ranks()


def join_ranks(device: torch.device) -> Ranks:
    """This process's :class:`Ranks` under torchrun, ``srun`` or the deepspeed launcher (joining their
    process group: NCCL on CUDA, gloo on the CPU); one process without a launcher."""
    launch = detect_launch()
    if launch.world_size == 1:
        return Ranks()
    if not dist.is_initialized():
        os.environ.update(launch.torch_env())
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(launch.rank, launch.world_size)


def leave_ranks() -> None:
    """Leave the process group :func:`join_ranks` joined (nothing without one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def default_workers(device: torch.device) -> int:
    """Decoding processes: up to 8 beside a GPU; none on a CPU, whose cores run the encoder."""
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0


class _Images(torch.utils.data.Dataset):
    """``(image [C, H, W] or an empty tensor for an unreadable file, index)``."""

    def __init__(self, source, transform, indices: range):
        self.source, self.transform, self.indices = source, transform, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        i = self.indices[j]
        try:
            return self.transform(self.source.load(i)), i
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):  # what PIL raises on a broken file
            return torch.empty(0), i


def _collate(items):
    good = [(x, i) for x, i in items if x.numel()]
    bad = [i for x, i in items if not x.numel()]
    images = torch.stack([x for x, _ in good]) if good else torch.empty(0)
    return images, [i for _, i in good], bad


@torch.no_grad()
def extract_features_kept(encoder: nn.Module, source, transform, batch_size: int = 256, limit: int | None = None,
                          layers: int = 1, workers: int = 0, progress: bool = True, desc: str = "features",
                          device: str | torch.device = "cpu", ranks: Ranks = ONE_PROCESS) -> tuple[np.ndarray, np.ndarray]:
    """``(features [n_kept, layers * D] float32, kept [n_kept] int64)``: the features of the readable
    images among the first ``limit`` of ``source`` (all by default), in order, and their indices. The
    encoder runs in eval mode on ``device``, under bf16 autocast on CUDA. With several ``ranks`` each
    extracts its stride and rank 0 returns the whole (the other ranks: empty arrays)."""
    device = torch.device(device)
    count = len(source) if limit is None else min(limit, len(source))
    mine = range(ranks.rank, count, ranks.world)
    loader = torch.utils.data.DataLoader(_Images(source, transform, mine), batch_size=batch_size,
                                         num_workers=workers, shuffle=False, collate_fn=_collate,
                                         pin_memory=device.type == "cuda")
    was_training = encoder.training
    encoder.eval()
    out, kept, skipped = [], [], []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    try:
        with tqdm(total=len(mine), desc=desc, unit="img", file=sys.stderr, disable=not progress) as bar:
            for images, good, bad in loader:
                if good:
                    with autocast:
                        feats = pooled_features(encoder, images.to(device, non_blocking=True), layers)
                    out.append(feats.float().cpu().numpy())
                kept += good
                skipped += bad
                bar.update(len(good) + len(bad))
    finally:
        encoder.train(was_training)
    feats = np.concatenate(out) if out else np.zeros((0, layers * encoder.embed_dim), np.float32)
    kept = np.asarray(kept, dtype=np.int64)
    if ranks.world > 1:  # rank 0 takes every rank's share and puts the images back in order
        parts = [None] * ranks.world if ranks.rank == 0 else None
        dist.gather_object((feats, kept, skipped), parts, dst=0)
        if ranks.rank != 0:
            return feats[:0], kept[:0]
        feats, kept = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        skipped = sorted(i for p in parts for i in p[2])
        order = np.argsort(kept, kind="stable")
        feats, kept = feats[order], kept[order]
    if skipped:
        first = source.describe(skipped[0]) if hasattr(source, "describe") else f"image {skipped[0]}"
        print(f"{desc}: skipped {len(skipped)} unreadable image(s) (the first: {first})", file=sys.stderr)
    return feats, kept


def extract_features(encoder: nn.Module, source, transform, **kw) -> np.ndarray:
    """``[n, layers * D]`` float32 features of the readable images (``extract_features_kept``'s first half)."""
    return extract_features_kept(encoder, source, transform, **kw)[0]


# ---- cache --------------------------------------------------------------------------------------------
def encoder_digest(encoder: nn.Module) -> str:
    """Digest of the weights (names, dtypes, shapes, bytes) and of what shapes the output without being
    a weight: heads and the patch grid."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([encoder.num_heads, list(encoder.grid), encoder.patch_size]).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def source_digest(source, count: int) -> str:
    """Digest of the first ``count`` images of a source: file paths, sizes and modification times for an
    image folder, the pixels for in-memory sets, the parameters for synthetic ones."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(source).__name__}:{count}".encode())
    if hasattr(source, "files"):
        for path in source.files[:count]:
            st = os.stat(path)
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    elif hasattr(source, "images"):
        h.update(np.ascontiguousarray(source.images[:count]).tobytes())
    else:
        h.update(json.dumps({k: v for k, v in vars(source).items() if isinstance(v, (int, float, str))},
                            sort_keys=True).encode())
    h.update(np.ascontiguousarray(source.labels[:count]).tobytes())
    return h.hexdigest()


def _save_npz(path: Path, **arrays) -> None:
    """One cache file, written atomically (a killed run never leaves half a cache)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))


def cached_features(encoder: nn.Module, source, transform, cache_dir: str | Path | None, limit: int | None = None,
                    layers: int = 1, desc: str = "features", **extract_kw) -> tuple[np.ndarray, np.ndarray]:
    """``(features [n, layers * D] float32, labels [n] int64)`` of the readable images, read from
    ``cache_dir`` when a run with the same encoder, images and options wrote them, else extracted (and
    written there unless ``cache_dir`` is None)."""
    count = len(source) if limit is None else min(limit, len(source))
    labels = np.asarray(source.labels[:count], dtype=np.int64)
    key = json.dumps({"version": CACHE_VERSION, "encoder": encoder_digest(encoder),
                      "data": source_digest(source, count), "layers": layers,
                      "transform": [type(transform).__name__, transform.size, transform.channels]}, sort_keys=True)
    path = None
    if cache_dir is not None:
        name = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
        path = Path(cache_dir) / f"{desc.replace(' ', '_')}-{name}.npz"
        if path.is_file():
            try:
                with np.load(path) as saved:
                    if str(saved["key"]) == key:
                        print(f"{desc}: {len(saved['labels'])} cached features from {path}", file=sys.stderr)
                        return saved["features"], saved["labels"]
            except (OSError, ValueError, KeyError):
                pass  # unreadable cache: extract again and overwrite it
    feats, kept = extract_features_kept(encoder, source, transform, limit=count, layers=layers, desc=desc,
                                        **extract_kw)
    labels = labels[kept]
    if path is not None and extract_kw.get("ranks", ONE_PROCESS).rank == 0:
        _save_npz(path, features=feats, labels=labels, key=np.array(key))
    return feats, labels


# ---- scores -------------------------------------------------------------------------------------------
def topk_accuracy(scores: np.ndarray, labels: np.ndarray, column_labels=None, ks=(1, 5)) -> dict:
    """``{"top1": %, "top5": %}`` of class ``scores [n, C]`` (column j is class ``column_labels[j]``,
    default j). A top-k with k >= C is right by construction and reported as None."""
    scores = np.asarray(scores)
    column_labels = np.arange(scores.shape[1]) if column_labels is None else np.asarray(column_labels)
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = column_labels[order]
    out = {}
    for k in ks:
        hit = (ranked[:, :k] == np.asarray(labels)[:, None]).any(axis=1)
        out[f"top{k}"] = None if k >= scores.shape[1] else 100.0 * float(hit.mean())
    return out


# ---- the shared command line ---------------------------------------------------------------------------
def add_eval_args(parser: argparse.ArgumentParser, layers_help: str | None = None) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a training output directory, a .safetensors encoder, a step_*.pt or a converted file")
    parser.add_argument("--random-init", action="store_true", help="evaluate the architecture at initialisation")
    parser.add_argument("--data-root", default=None,
                        help="an image folder with train/ and val/ sub-folders of class folders (default: the "
                             "run's own data config)")
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N train images")
    parser.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    parser.add_argument("--layers", type=int, default=None,
                        help=layers_help or "concatenate the pooled outputs of the last N blocks (4: DINO's "
                                            "linear-eval recipe; default 1)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None,
                        help="image-decoding worker processes (default: up to 8 beside a GPU, none on a CPU)")
    parser.add_argument("--device", default="auto",
                        help="where the encoder runs: auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    parser.add_argument("--cache-dir", default=None,
                        help="feature cache (default: CHECKPOINT/eval_cache for a directory, else "
                             "~/.cache/fastjepa/features)")
    parser.add_argument("--no-cache", action="store_true", help="always extract, write no cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--output", default=None, help="also write the result JSON to this file")
    parser.add_argument("--seed", type=int, default=0)


def folder_splits(root: str | Path):
    """``(train, val)`` image folders of ``root/train`` and ``root/val``, val labels numbered like train's
    classes (a val folder missing a class keeps the labels aligned)."""
    root = Path(root)
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"'{root / sub}' not found: the data root needs train/ and val/ sub-folders "
                                    "of class folders")
    train, val = ImageFolder(root / "train"), ImageFolder(root / "val")
    index = {name: i for i, name in enumerate(train.classes)}
    unknown = sorted(set(val.classes) - set(index))
    if unknown:
        raise ValueError(f"'{root / 'val'}' has classes that train/ lacks: {', '.join(unknown[:8])}")
    if val.classes:
        val.labels = np.asarray([index[val.classes[label]] for label in val.labels], dtype=np.int64)
    return train, val


def _default_cache_dir(checkpoint: Path) -> Path:
    if checkpoint.is_dir():
        return checkpoint / "eval_cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastjepa" / "features"


@dataclass
class EvalFeatures:
    """What an evaluation reads: features ``[n, F]`` float32 and labels ``[n]`` int64 per split."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    info: dict = field(default_factory=dict)
    rank: int = 0  # under a launcher only rank 0 holds the features (and fits and reports)


def eval_features(args, layers: int = 1) -> EvalFeatures:
    """The encoder and data the command-line arguments name, as (cached) features of the last ``layers``
    blocks (``args.layers`` when given)."""
    checkpoint = Path(args.checkpoint)
    if args.random_init:
        config_file = checkpoint / "config.json"
        if checkpoint.is_dir() and config_file.is_file():
            cfg = build_config(json.loads(config_file.read_text()))
        else:
            cfg, _ = read_encoder(checkpoint)
        torch.manual_seed(args.seed)
        encoder = build_encoder(inference_config(cfg).model).eval()
    else:
        cfg, state = read_encoder(checkpoint)
        encoder = encoder_from_state(cfg, state, f"encoder weights in '{checkpoint}'")
    layers = args.layers or min(layers, len(encoder.blocks))  # a default grid of 4 on a shallower encoder: all
    if not 1 <= layers <= len(encoder.blocks):
        raise ValueError(f"--layers must be in 1..{len(encoder.blocks)} (the encoder's depth), got {layers}")
    device = resolve_device(args.device)
    ranks = join_ranks(device)
    encoder.to(device)
    transform = ImageTransform(cfg.model.img_size, cfg.model.in_chans)
    if args.data_root is not None or cfg.data.dataset == "folder":
        if args.data_root is None and cfg.data.root is None:
            raise ValueError("the run's data config names no folder (data.root): pass --data-root")
        train_src, test_src = folder_splits(args.data_root or cfg.data.root)
        transform = EvalTransform(cfg.model.img_size, cfg.model.in_chans)  # photos: resize, then centre crop
    else:  # the built-in sets are already at the model's size
        train_src = build_source(cfg.data, cfg.model.img_size, "train")
        test_src = build_source(cfg.data, cfg.model.img_size, "test")
    train_count = len(train_src) if args.train_limit is None else min(args.train_limit, len(train_src))
    classes = np.unique(np.asarray(train_src.labels[:train_count]))
    if len(classes) < 2:
        where = args.data_root or cfg.data.root or cfg.data.dataset
        raise ValueError(f"the training split of '{where}' has {len(classes)} class(es): an evaluation needs at "
                         "least 2 class folders")
    cache_dir = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else _default_cache_dir(checkpoint)
    kw = dict(cache_dir=cache_dir, layers=layers, batch_size=args.batch_size, progress=not args.no_progress,
              workers=default_workers(device) if args.workers is None else args.workers, device=device, ranks=ranks)
    train_x, train_y = cached_features(encoder, train_src, transform, limit=args.train_limit, desc="train", **kw)
    test_x, test_y = cached_features(encoder, test_src, transform, limit=args.test_limit, desc="test", **kw)
    if ranks.rank != 0:
        return EvalFeatures(train_x, train_y, test_x, test_y, {}, rank=ranks.rank)
    where = f"{device}, {ranks.world} ranks" if ranks.world > 1 else str(device)
    print(f"features: train {train_x.shape}, test {test_x.shape} on {where} "
          f"(per-dimension std {train_x.std(axis=0).mean():.4f})", file=sys.stderr)
    info = {"encoder": "random-init" if args.random_init else "pretrained", "checkpoint": str(args.checkpoint),
            "data": str(args.data_root) if args.data_root else cfg.data.dataset, "layers": layers,
            "feature_dim": int(train_x.shape[1]), "train_images": len(train_x), "test_images": len(test_x),
            "skipped_images": train_count - len(train_x) + (min(args.test_limit or len(test_src), len(test_src))
                                                            - len(test_x))}
    return EvalFeatures(train_x, train_y, test_x, test_y, info)


def report(result: dict, output: str | None) -> None:
    """Print the result as the last stdout line (one JSON object) and write it to ``output`` if given."""
    line = json.dumps(result)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(line + "\n")
    print(line)


def percent(value):
    """A percentage rounded for the report (None stays None)."""
    return None if value is None else round(value, 2)
