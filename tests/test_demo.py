"""The demo learns: a short run of configs/demo.json on Fashion-MNIST, then the linear probe of its
target encoder against the same architecture at random init (both on the same image subsets).

The full demo (README) trains for longer and shows a larger margin; this short version must still
beat random init and must not collapse (per-dimension feature std well above zero).
"""
from __future__ import annotations

import json

import pytest
import torch

from fastjepa.data.sources import FASHION_MNIST_DIR, FASHION_MNIST_FILES
from fastjepa.eval import linear_probe

pytestmark = pytest.mark.demo

STEPS = 150
TRAIN_IMAGES, TEST_IMAGES = 10_000, 2_000


def _have_fashion_mnist() -> bool:
    from pathlib import Path

    return all((Path(FASHION_MNIST_DIR) / f).is_file() for f in FASHION_MNIST_FILES["train"] + FASHION_MNIST_FILES["test"])


@pytest.mark.skipif(not _have_fashion_mnist(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_short_demo_run_beats_random_init(tmp_path, helpers, capsys):
    from fastjepa.trainer import main

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the demo's own setting; conftest pins tests to one thread
    try:
        code = main(["--config", str(helpers.REPO / "configs" / "demo.json"), "--output-dir", str(tmp_path),
                     f"train.max_steps={STEPS}", "train.progress=off", "train.tensorboard=false",
                     "train.checkpoint_every=1000", "data.num_workers=0"])
        assert code == 0
        records = helpers.read_metrics(tmp_path)
        assert records[-1]["step"] == STEPS
        assert records[-1]["loss"] < 0.5 * records[0]["loss"]
        assert records[-1]["target_feature_std"] > 0.1  # no collapse

        results = {}
        for random_init in (False, True):
            args = ["--checkpoint", str(tmp_path), "--train-limit", str(TRAIN_IMAGES), "--test-limit", str(TEST_IMAGES)]
            assert linear_probe.main(args + (["--random-init"] if random_init else [])) == 0
            last = capsys.readouterr().out.strip().splitlines()[-1]
            results[random_init] = json.loads(last)["top1"]
    finally:
        torch.set_num_threads(threads)
    assert results[False] > results[True] + MARGIN, results


MARGIN = 0.5  # points of top-1 on 2,000 test images (one image = 0.05 points)
