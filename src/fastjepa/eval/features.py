"""Frozen-encoder features for evaluation, cached on disk, and the command line the probe and kNN share.

A feature is the mean over tokens of the final-LayerNorm'd block output: ``layers=1`` is the encoder's
own output (the I-JEPA feature); ``layers=4`` concatenates the last four blocks' pooled outputs, each
through the final norm (DINO's linear evaluation, ``n_last_blocks=4``). Extraction runs in batches under
``no_grad`` with a progress bar on stderr. The cache is one ``.npz`` per (encoder, data set, options),
named by a digest of the encoder's weights and architecture, the data set's files and the options, so
a changed encoder or folder never reads stale features.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

CACHE_VERSION = "1"  # bump when the feature definition changes


# ---- features ---------------------------------------------------------------------------------------
def pooled_features(encoder: nn.Module, images: torch.Tensor, layers: int = 1) -> torch.Tensor:
    """``images [B, C, H, W]`` -> ``[B, layers * D]`` float32: the last ``layers`` blocks' outputs,
    each through the final norm and averaged over tokens, oldest first."""
    if layers == 1:
        return encoder(images).mean(dim=1).float()
    from ..models.vit import uniform_cu_seqlens

    depth = len(encoder.blocks)
    if not 1 <= layers <= depth:
        raise ValueError(f"layers must be in 1..{depth} (the encoder's depth), got {layers}")
    x = encoder.patchify(images)
    batch, n, dim = x.shape
    x = (x + encoder.pos_embed.to(x.dtype)).reshape(batch * n, dim)
    cu_seqlens = uniform_cu_seqlens(batch, n, x.device)
    pooled = []
    for i, block in enumerate(encoder.blocks):
        x = block(x, cu_seqlens, n)
        if i >= depth - layers:
            pooled.append(encoder.norm(x).view(batch, n, dim).mean(dim=1).float())
    return torch.cat(pooled, dim=1)


class _Images(torch.utils.data.Dataset):
    def __init__(self, source, transform, count: int):
        self.source, self.transform, self.count = source, transform, count

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        return self.transform(self.source.load(i))


@torch.no_grad()
def extract_features(encoder: nn.Module, source, transform, batch_size: int = 256, limit: int | None = None,
                     layers: int = 1, workers: int = 0, progress: bool = True, desc: str = "features",
                     device: str | torch.device = "cpu") -> np.ndarray:
    """``[n, layers * D]`` float32 features of the first ``limit`` images of ``source`` (all by default),
    in order; the encoder runs in eval mode on ``device``."""
    from tqdm import tqdm

    count = len(source) if limit is None else min(limit, len(source))
    loader = torch.utils.data.DataLoader(_Images(source, transform, count), batch_size=batch_size,
                                         num_workers=workers, shuffle=False)
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        with tqdm(total=count, desc=desc, unit="img", file=sys.stderr, disable=not progress) as bar:
            for images in loader:
                out.append(pooled_features(encoder, images.to(device), layers).cpu().numpy())
                bar.update(len(images))
    finally:
        encoder.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, layers * encoder.embed_dim), np.float32)


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
    """Write to a temporary file beside ``path``, then rename: a killed run never leaves half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cached_features(encoder: nn.Module, source, transform, cache_dir: str | Path | None, limit: int | None = None,
                    layers: int = 1, desc: str = "features", **extract_kw) -> tuple[np.ndarray, np.ndarray]:
    """``(features [n, layers * D] float32, labels [n] int64)``, read from ``cache_dir`` when a run with
    the same encoder, images and options wrote them, else extracted (and written there unless
    ``cache_dir`` is None)."""
    count = len(source) if limit is None else min(limit, len(source))
    labels = np.asarray(source.labels[:count], dtype=np.int64)
    key = json.dumps({"version": CACHE_VERSION, "encoder": encoder_digest(encoder),
                      "data": source_digest(source, count), "layers": layers,
                      "transform": [transform.size, transform.channels]}, sort_keys=True)
    path = None
    if cache_dir is not None:
        name = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
        path = Path(cache_dir) / f"{desc.replace(' ', '_')}-{name}.npz"
        if path.is_file():
            try:
                with np.load(path) as saved:
                    if str(saved["key"]) == key:
                        print(f"{desc}: {count} cached features from {path}", file=sys.stderr)
                        return saved["features"], saved["labels"]
            except (OSError, ValueError, KeyError):
                pass  # unreadable cache: extract again and overwrite it
    feats = extract_features(encoder, source, transform, limit=count, layers=layers, desc=desc, **extract_kw)
    if path is not None:
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
def add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a training output directory, a .safetensors encoder, a step_*.pt or a converted file")
    parser.add_argument("--random-init", action="store_true", help="evaluate the architecture at initialisation")
    parser.add_argument("--data-root", default=None,
                        help="an image folder with train/ and val/ sub-folders of class folders (default: the "
                             "run's own data config)")
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N train images")
    parser.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    parser.add_argument("--layers", type=int, default=1,
                        help="concatenate the pooled outputs of the last N blocks (4: DINO's linear-eval recipe)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="image-decoding worker processes")
    parser.add_argument("--device", default="cpu", help="where the encoder runs (cpu, cuda, cuda:1, ...)")
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
    from ..data.sources import ImageFolder

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


def eval_features(args) -> EvalFeatures:
    """The encoder and data the command-line arguments name, as (cached) features."""
    from ..data.sources import build_source
    from ..data.transforms import ImageTransform
    from ..io.encoder import read_encoder
    from ..io.weights import encoder_from_state, inference_config
    from ..models import build_encoder

    checkpoint = Path(args.checkpoint)
    if args.random_init:
        from ..config import build_config

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
    encoder.to(args.device)
    if args.data_root is not None:
        train_src, test_src = folder_splits(args.data_root)
    elif cfg.data.dataset == "folder":
        if cfg.data.root is None:
            raise ValueError("the run's data config names no folder (data.root): pass --data-root")
        train_src, test_src = folder_splits(cfg.data.root)
    else:
        train_src = build_source(cfg.data, cfg.model.img_size, "train")
        test_src = build_source(cfg.data, cfg.model.img_size, "test")
    transform = ImageTransform(cfg.model.img_size, cfg.model.in_chans)
    cache_dir = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else _default_cache_dir(checkpoint)
    kw = dict(cache_dir=cache_dir, layers=args.layers, batch_size=args.batch_size, workers=args.workers,
              progress=not args.no_progress, device=args.device)
    train_x, train_y = cached_features(encoder, train_src, transform, limit=args.train_limit, desc="train", **kw)
    test_x, test_y = cached_features(encoder, test_src, transform, limit=args.test_limit, desc="test", **kw)
    print(f"features: train {train_x.shape}, test {test_x.shape} (per-dimension std {train_x.std(axis=0).mean():.4f})",
          file=sys.stderr)
    info = {"encoder": "random-init" if args.random_init else "pretrained", "checkpoint": str(args.checkpoint),
            "data": str(args.data_root) if args.data_root else cfg.data.dataset, "layers": args.layers,
            "feature_dim": int(train_x.shape[1]), "train_images": len(train_x), "test_images": len(test_x)}
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
