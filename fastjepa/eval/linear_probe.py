"""Linear probe of a frozen encoder: ``python -m fastjepa.eval.linear_probe --checkpoint DIR [--random-init]``.

Loads ``DIR/config.json`` and the target encoder (``DIR/target_encoder.safetensors``), average-pools the
final tokens of every train and test image (no augmentation), standardises the features, fits a
multinomial logistic regression (scikit-learn, L-BFGS) on the train split and reports top-1 on the
test split. ``--random-init`` probes the same architecture at initialisation instead. The last line
printed is a JSON object with ``top1``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..config import build_config
from ..data.sources import build_source
from ..data.transforms import ImageTransform
from ..models import build_encoder


@torch.no_grad()
def extract_features(encoder, source, transform, batch_size: int = 500, limit: int | None = None) -> np.ndarray:
    """Average-pooled final tokens ``[n, D]`` float32 for the first ``limit`` images of ``source``."""
    n = len(source) if limit is None else min(limit, len(source))
    feats = []
    for start in range(0, n, batch_size):
        images = torch.stack([transform(source.load(i)) for i in range(start, min(n, start + batch_size))])
        feats.append(encoder(images).mean(dim=1).float().numpy())
    return np.concatenate(feats)


def fit_probe(train_x, train_y, test_x, test_y, max_iter: int = 1000, C: float = 1.0) -> float:
    """Top-1 (fraction) of a logistic-regression probe on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=max_iter, C=C)
    clf.fit(scaler.transform(train_x), train_y)
    return float((clf.predict(scaler.transform(test_x)) == test_y).mean())


def load_target_encoder(run_dir: Path, random_init: bool = False, seed: int = 0):
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"'{cfg_path}' not found: --checkpoint must be a training output directory")
    cfg = build_config(json.loads(cfg_path.read_text()))
    torch.manual_seed(seed)
    encoder = build_encoder(cfg.model)
    if not random_init:
        weights = run_dir / "target_encoder.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"'{weights}' not found: the run has not saved a checkpoint yet")
        encoder.load_state_dict(load_file(weights))
    return cfg, encoder.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a training output directory")
    parser.add_argument("--random-init", action="store_true", help="probe the architecture at initialisation")
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N train images")
    parser.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        cfg, encoder = load_target_encoder(Path(args.checkpoint), args.random_init, args.seed)
        transform = ImageTransform(cfg.model.img_size, cfg.model.in_chans)
        train_src = build_source(cfg.data, cfg.model.img_size, "train")
        test_src = build_source(cfg.data, cfg.model.img_size, "test")
    except (FileNotFoundError, ValueError) as err:
        print(f"linear_probe: error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    train_x = extract_features(encoder, train_src, transform, limit=args.train_limit)
    test_x = extract_features(encoder, test_src, transform, limit=args.test_limit)
    train_y = train_src.labels[: len(train_x)]
    test_y = test_src.labels[: len(test_x)]
    print(f"features: train {train_x.shape}, test {test_x.shape} in {time.perf_counter() - start:.1f}s "
          f"(per-dimension std {train_x.std(axis=0).mean():.4f})", file=sys.stderr)
    top1 = fit_probe(train_x, train_y, test_x, test_y)
    result = {"top1": round(100 * top1, 2), "encoder": "random-init" if args.random_init else "pretrained",
              "checkpoint": str(args.checkpoint), "train_images": len(train_x), "test_images": len(test_x)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
