"""The demo learns: the first 300 of configs/demo.json's 2,000 steps (on the demo's own schedules, via
``train.schedule_steps``), then the linear probe of its target encoder against the same architecture at
random init, on 10k/2k subsets of Fashion-MNIST.

Measured on the 2-core development machine with the scikit-learn probe: 75.8 % pretrained vs 72.75 %
random init (+3.05); the default torch probe (a grid over learning rates and {1, 4} blocks) widens the gap
on the full demo (78.6 % vs 72.3 % after 2,000 steps, against 79.2 % vs 76.0 % for scikit-learn). The
assertion asks for half the narrower margin so that another CPU build's rounding cannot flip it, while an
encoder that learned nothing (or collapsed) fails. A run of 300 steps on its own compressed schedule
(EMA at 1.0 and lr annealed by step 300) does not learn: 72.85 % vs 72.75 %.
"""
from __future__ import annotations

import json

import pytest
import torch

from fastjepa.data.sources import FASHION_MNIST_DIR, FASHION_MNIST_FILES
from fastjepa.eval import linear_probe

pytestmark = pytest.mark.demo

STEPS, SCHEDULE_STEPS = 300, 2000
TRAIN_IMAGES, TEST_IMAGES = 10_000, 2_000
MIN_MARGIN = 1.5  # top-1 points over random init


def _have_fashion_mnist() -> bool:
    from pathlib import Path

    return all((Path(FASHION_MNIST_DIR) / f).is_file() for f in FASHION_MNIST_FILES["train"] + FASHION_MNIST_FILES["test"])


def _probe(checkpoint, capsys, *extra) -> dict:
    args = ["--checkpoint", str(checkpoint), "--train-limit", str(TRAIN_IMAGES), "--test-limit", str(TEST_IMAGES),
            "--no-progress", *extra]
    assert linear_probe.main(args) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.skipif(not _have_fashion_mnist(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_short_demo_run_beats_random_init(tmp_path, helpers, capsys):
    from fastjepa.cli import train_main as main

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the demo's own setting; conftest pins tests to one thread
    try:
        code = main(["--config", str(helpers.CONFIGS / "demo.json"), "--output-dir", str(tmp_path),
                     f"train.max_steps={STEPS}", f"train.schedule_steps={SCHEDULE_STEPS}", "train.progress=off",
                     "train.tensorboard=false", "train.checkpoint_every=1000", "data.num_workers=0"])
        assert code == 0
        records = helpers.read_metrics(tmp_path)
        assert records[-1]["step"] == STEPS
        assert records[-1]["loss"] < 0.5 * records[0]["loss"]
        assert records[-1]["target_feature_std"] > 0.1  # no collapse (0.29 measured; ~0.38 at init)

        pretrained = _probe(tmp_path, capsys)
        random_init = _probe(tmp_path, capsys, "--random-init")
    finally:
        torch.set_num_threads(threads)
    assert pretrained["encoder"] == "pretrained" and random_init["encoder"] == "random-init"
    assert pretrained["test_images"] == random_init["test_images"] == TEST_IMAGES
    assert pretrained["top1"] > random_init["top1"] + MIN_MARGIN, (pretrained["top1"], random_init["top1"])
