"""Linear probe of a frozen encoder: ``python -m fastjepa.eval.linear_probe --checkpoint PATH [--data-root DIR]``.

Recipe: the features of fastjepa.eval.features (average-pooled final tokens, ``--layers 4`` for the last
four blocks concatenated) of every train and test image, without augmentation; standardised with the
train split's mean and variance; a multinomial logistic regression (scikit-learn, L-BFGS, C=1, at most
1000 iterations) fit on the train split; top-1 and top-5 on the test split (``root/val`` of
``--data-root``, else the run's own data set: Fashion-MNIST's test split for the demo).
``--random-init`` probes the same architecture at initialisation. The last line printed is a JSON
object with ``top1`` and ``top5`` in percent (``top5`` null with five classes or fewer).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from .features import add_eval_args, eval_features, percent, report, topk_accuracy


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, C: float = 1.0, max_iter: int = 1000):
    """A fitted scikit-learn pipeline: StandardScaler, then multinomial logistic regression (L-BFGS)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter)).fit(train_x, train_y)


def probe_accuracy(train_x, train_y, test_x, test_y, C: float = 1.0, max_iter: int = 1000) -> dict:
    """``{"top1": %, "top5": %}`` of a probe fit on the train features, on the test features."""
    probe = fit_probe(train_x, train_y, C, max_iter)
    # predict_proba's columns are probe.classes_: the labels seen in training, sorted
    return topk_accuracy(probe.predict_proba(test_x), test_y, column_labels=probe.classes_)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_eval_args(parser)
    parser.add_argument("--C", type=float, default=1.0, help="inverse L2 regularisation strength")
    parser.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations at most")
    args = parser.parse_args(argv)
    try:
        data = eval_features(args)
    except (FileNotFoundError, ValueError) as err:  # CheckpointError and ConfigError are ValueErrors
        print(f"linear_probe: error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    acc = probe_accuracy(data.train_x, data.train_y, data.test_x, data.test_y, args.C, args.max_iter)
    print(f"probe fit in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    report({"top1": percent(acc["top1"]), "top5": percent(acc["top5"]), **data.info, "C": args.C}, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
