"""Weighted k-nearest-neighbour classification on frozen features: ``python -m fastjepa.eval.knn --checkpoint PATH``.

DINO's recipe (Caron et al. 2021, ``eval_knn.py``: k=20, temperature 0.07): features L2-normalised;
each test image's k most cosine-similar train images vote for their class with weight
``exp(similarity / temperature)``; classes are ranked by their summed votes. No training, so it is a
quick read of how well the frozen features cluster by class. The last line printed is a JSON object
with ``top1`` and ``top5`` in percent (``top5`` null with five classes or fewer).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from .features import add_eval_args, eval_features, leave_ranks, percent, report, resolve_device, topk_accuracy

K, TEMPERATURE = 20, 0.07  # DINO eval_knn.py defaults


@torch.no_grad()
def knn_scores(train_x, train_y, test_x, num_classes: int, k: int = K, temperature: float = TEMPERATURE,
               chunk: int = 1024, device: str | torch.device = "cpu") -> np.ndarray:
    """Class votes ``[n_test, num_classes]`` (the dtype of the features: float32 or float64).

    ``train_x [n_train, F]``, ``train_y [n_train]`` ints in ``[0, num_classes)``, ``test_x [n_test, F]``.
    The train features live on ``device``; test rows go through in chunks, so memory is
    ``chunk x n_train`` similarities at a time."""
    train = torch.nn.functional.normalize(torch.as_tensor(train_x).to(device), dim=1)
    labels = torch.as_tensor(np.asarray(train_y, dtype=np.int64)).to(device)
    k = min(k, len(train))
    out = []
    for start in range(0, len(test_x), chunk):
        test = torch.nn.functional.normalize(torch.as_tensor(test_x[start:start + chunk]).to(device), dim=1)
        sims, idx = (test @ train.T).topk(k, dim=1)  # [c, k], most similar first
        votes = torch.zeros(len(test), num_classes, dtype=sims.dtype, device=sims.device)
        votes.scatter_add_(1, labels[idx], (sims / temperature).exp())
        out.append(votes.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, num_classes), np.asarray(train_x).dtype)


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = K, temperature: float = TEMPERATURE,
                 device: str | torch.device = "cpu") -> dict:
    """``{"top1": %, "top5": %}`` of the weighted kNN vote."""
    num_classes = int(max(np.max(train_y), np.max(test_y))) + 1
    return topk_accuracy(knn_scores(train_x, train_y, test_x, num_classes, k, temperature, device=device), test_y)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_eval_args(parser)
    parser.add_argument("--k", type=int, default=K, help="neighbours that vote")
    parser.add_argument("--temperature", type=float, default=TEMPERATURE, help="vote weight exp(cosine / T)")
    args = parser.parse_args(argv)
    try:
        if args.k < 1 or args.temperature <= 0:
            raise ValueError("--k must be >= 1 and --temperature > 0")
        data = eval_features(args)
    except (FileNotFoundError, ValueError) as err:  # CheckpointError and ConfigError are ValueErrors
        print(f"knn: error: {err}", file=sys.stderr)
        return 2
    leave_ranks()  # under a launcher the features are on rank 0 now: it alone fits and reports
    if data.rank != 0:
        return 0
    acc = knn_accuracy(data.train_x, data.train_y, data.test_x, data.test_y, args.k, args.temperature,
                       device=resolve_device(args.device))
    report({"top1": percent(acc["top1"]), "top5": percent(acc["top5"]), **data.info, "k": args.k,
            "temperature": args.temperature}, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
