"""Linear probe of a frozen encoder: ``fastjepa probe --checkpoint PATH [--data-root DIR] [--backend torch|sklearn]``.

``--backend torch`` (the default; GPU or CPU) follows DINOv2's linear evaluation (Oquab et al. 2023,
``dinov2/eval/linear.py``): every setting of a grid of learning rates x {the last block, the last four
blocks concatenated} of average-pooled tokens is trained at once, as one linear head per setting, on 90 %
of the training split; the setting with the best top-1 on the held-out 10 % is refit on the whole
training split and reported on the test split, with the setting chosen. Features are standardised with
the fitting split's mean and std; SGD with momentum 0.9 and a cosine schedule, no weight decay.

``--backend sklearn``: scikit-learn's multinomial logistic regression (L-BFGS, ``--C``) on standardised
features of ``--layers`` blocks, for small sets. ``--random-init`` probes the same architecture at
initialisation. The last line printed is a JSON object with ``top1`` and ``top5`` in percent (``top5``
null with five classes or fewer).
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch

from .features import add_eval_args, eval_features, leave_ranks, percent, report, resolve_device, topk_accuracy

LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # per 256 images: a log grid, as DINOv2 sweeps
HELD_OUT = 0.1  # DINOv2 chooses on 10 % of train


# ---- the torch probe ------------------------------------------------------------------------------------
def train_heads(x: torch.Tensor, y: torch.Tensor, num_classes: int, lrs, epochs: int, batch_size: int,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads ``(weight [L, F, C], bias [L, C])`` float32, one per learning rate in ``lrs``, trained together
    by SGD (momentum 0.9, cosine schedule) on cross-entropy over ``x [n, F]`` float32, ``y [n]`` int64."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n, feat = x.shape
    weight = torch.zeros(len(lrs), feat, num_classes, device=x.device, requires_grad=True)
    bias = torch.zeros(len(lrs), num_classes, device=x.device, requires_grad=True)
    lr = torch.tensor(lrs, device=x.device, dtype=torch.float32) * batch_size / 256  # linear scaling rule
    optimizer = torch.optim.SGD([weight, bias], lr=1.0, momentum=0.9)  # lr 1: the per-head rate is in the loss
    steps, step = epochs * math.ceil(n / batch_size), 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(x.device)
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            logits = torch.einsum("bf,lfc->lbc", x[rows], weight) + bias[:, None]  # [L, b, C]
            losses = torch.nn.functional.cross_entropy(
                logits.reshape(-1, num_classes), y[rows].repeat(len(lrs)), reduction="none").view(len(lrs), -1)
            scale = lr * 0.5 * (1 + math.cos(math.pi * step / steps))  # each head's lr, cosine-annealed
            optimizer.zero_grad(set_to_none=True)
            (losses.mean(dim=1) * scale).sum().backward()  # heads are independent: each sees its own lr
            optimizer.step()
            step += 1
    return weight.detach(), bias.detach()


def _standardise(fit: torch.Tensor, *others: torch.Tensor):
    mean, std = fit.mean(0), fit.std(0).clamp_min(1e-6)
    return [(t - mean) / std for t in (fit, *others)]


def torch_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                feature_sets: dict[str, slice], lrs=LEARNING_RATES, epochs: int = 10, batch_size: int = 256,
                device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """DINOv2's protocol on features ``[n, F]``: ``feature_sets`` names column slices (e.g. ``{"1": last
    block, "4": last four}``). Returns ``{"top1", "top5", "lr", "features", "held_out_top1"}``: test
    accuracy of the setting chosen on the held-out 10 %, refit on all of train."""
    device = torch.device(device)
    x_all = torch.as_tensor(np.asarray(train_x, np.float32), device=device)
    labels, y_all = np.unique(np.asarray(train_y), return_inverse=True)  # classes seen in training -> 0..C-1
    y_all = torch.as_tensor(y_all, device=device)
    num_classes = len(labels)
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(seed)).to(device)
    held = max(1, int(round(HELD_OUT * len(x_all))))
    held_idx, fit_idx = perm[:held], perm[held:]
    scores = {}
    for name, cols in feature_sets.items():
        fit_x, held_x = _standardise(x_all[fit_idx][:, cols], x_all[held_idx][:, cols])
        weight, bias = train_heads(fit_x, y_all[fit_idx], num_classes, lrs, epochs, batch_size, seed)
        pred = (torch.einsum("bf,lfc->lbc", held_x, weight) + bias[:, None]).argmax(-1)  # [L, held]
        for lr, hits in zip(lrs, (pred == y_all[held_idx]).float().mean(1).tolist()):
            scores[(name, lr)] = 100.0 * hits
    (name, lr), held_top1 = max(scores.items(), key=lambda kv: kv[1])  # ties: the first in grid order
    cols = feature_sets[name]
    fit_x, test_t = _standardise(x_all[:, cols], torch.as_tensor(np.asarray(test_x, np.float32), device=device)[:, cols])
    weight, bias = train_heads(fit_x, y_all, num_classes, [lr], epochs, batch_size, seed)
    logits = (test_t @ weight[0] + bias[0]).float().cpu().numpy()
    return {**topk_accuracy(logits, test_y, column_labels=labels), "lr": lr, "features": name,
            "held_out_top1": held_top1}


# ---- the scikit-learn probe -------------------------------------------------------------------------------
def fit_probe(train_x: np.ndarray, train_y: np.ndarray, C: float = 1.0, max_iter: int = 1000):
    """A fitted scikit-learn pipeline: StandardScaler, then multinomial logistic regression (L-BFGS)."""
    from sklearn.linear_model import LogisticRegression  # the optional small-set backend
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter)).fit(train_x, train_y)


def probe_accuracy(train_x, train_y, test_x, test_y, C: float = 1.0, max_iter: int = 1000) -> dict:
    """``{"top1": %, "top5": %}`` of a scikit-learn probe fit on the train features, on the test features."""
    probe = fit_probe(train_x, train_y, C, max_iter)
    # predict_proba's columns are probe.classes_: the labels seen in training, sorted
    return topk_accuracy(probe.predict_proba(test_x), test_y, column_labels=probe.classes_)


# ---- the command line -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_eval_args(parser, layers_help="torch backend: the grid's block counts are {1, 4} unless N is given; "
                                      "sklearn: the last N blocks (default 1)")
    parser.add_argument("--backend", choices=("torch", "sklearn"), default="torch")
    parser.add_argument("--epochs", type=int, default=10, help="torch: epochs of each fit")
    parser.add_argument("--C", type=float, default=1.0, help="sklearn: inverse L2 regularisation strength")
    parser.add_argument("--max-iter", type=int, default=1000, help="sklearn: L-BFGS iterations at most")
    args = parser.parse_args(argv)
    try:
        if args.epochs < 1 or args.C <= 0:
            raise ValueError("--epochs must be >= 1 and --C > 0")
        if args.backend == "sklearn":
            try:
                import sklearn  # noqa: F401  (the optional backend)
            except ImportError:
                raise ValueError("--backend sklearn needs scikit-learn: pip install 'fastjepa[eval]'") from None
        data = eval_features(args, layers=1 if args.backend == "sklearn" else 4)
    except (FileNotFoundError, ValueError) as err:  # CheckpointError and ConfigError are ValueErrors
        print(f"linear_probe: error: {err}", file=sys.stderr)
        return 2
    leave_ranks()  # under a launcher the features are on rank 0 now: it alone fits and reports
    if data.rank != 0:
        return 0
    start = time.perf_counter()
    if args.backend == "sklearn":
        acc = probe_accuracy(data.train_x, data.train_y, data.test_x, data.test_y, args.C, args.max_iter)
        extra = {"backend": "sklearn", "C": args.C}
    else:
        width = data.train_x.shape[1] // data.info["layers"]
        grid = {"1": slice(data.train_x.shape[1] - width, None)}  # the last D columns: the last block
        if data.info["layers"] > 1:
            grid[str(data.info["layers"])] = slice(None)
        acc = torch_probe(data.train_x, data.train_y, data.test_x, data.test_y, grid, epochs=args.epochs,
                          device=resolve_device(args.device), seed=args.seed)
        extra = {"backend": "torch", "chosen": {"lr": acc.pop("lr"), "layers": int(acc.pop("features")),
                                                "held_out_top1": percent(acc.pop("held_out_top1"))}}
    print(f"probe fit in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    report({"top1": percent(acc["top1"]), "top5": percent(acc["top5"]), **data.info, **extra}, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
