"""Evaluation at scale: feature extraction in images/s, and the torch linear probe's fit at ImageNet's size.

- ``test_extraction[demo|vith14]``: ``fastjepa.eval.features.extract_features`` over synthetic images,
  last four blocks (the probe's grid needs them), on the GPU under bf16 autocast when there is one, else
  the CPU; ViT-H/14 on CUDA only.
- ``test_probe_fit``: ``linear_probe.torch_probe`` (its default grid: 7 learning rates x {1, 4 blocks}, then
  the refit) on synthetic features of ImageNet-1K's shape, 1.28 M x 1280 with 1,000 classes on a GPU;
  on a CPU 16k x 1280 with 100 classes (``extra_info`` says which). Reports the seconds and rows/s.

Run: ``pytest benchmarks/test_eval.py --benchmark-only``.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

pytest.importorskip("pydantic", reason="the trainer's config needs pydantic (scripts/fetch_device_wheels.sh)")

from fastjepa.config import load_config  # noqa: E402
from fastjepa.data.sources import build_source  # noqa: E402
from fastjepa.data.transforms import ImageTransform  # noqa: E402
from fastjepa.eval import features as F  # noqa: E402
from fastjepa.eval import linear_probe  # noqa: E402
from fastjepa.models import build_encoder  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("preset", ["demo", "vith14"])
def test_extraction(benchmark, preset):
    if preset == "vith14" and DEVICE.type != "cuda":
        pytest.skip("ViT-H/14 extraction is timed on a GPU only")
    benchmark.group = "eval"
    images = 2048 if DEVICE.type == "cuda" else 512
    cfg = load_config(preset, ["data.dataset=synthetic", f"data.synthetic_size={images}"])
    encoder = build_encoder(cfg.model).to(DEVICE)
    source = build_source(cfg.data, cfg.model.img_size, "train")
    transform = ImageTransform(cfg.model.img_size, cfg.model.in_chans)
    batch = 256 if preset == "demo" else 128
    kw = dict(batch_size=batch, layers=4, progress=False, device=DEVICE, workers=F.default_workers(DEVICE))
    F.extract_features(encoder, source, transform, limit=batch, **kw)  # warm-up (kernels, allocator)

    def run():
        start = time.perf_counter()
        F.extract_features(encoder, source, transform, **kw)
        return time.perf_counter() - start

    seconds = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(config=preset, device=str(DEVICE), images=images, batch=batch, layers=4,
                                images_per_s=round(images / seconds, 1))


def test_probe_fit(benchmark):
    benchmark.group = "eval"
    rows, dim, classes = (1_281_167, 1280, 1000) if DEVICE.type == "cuda" else (16_000, 1280, 100)
    gen = torch.Generator(device="cpu").manual_seed(0)
    centres = torch.randn(classes, dim, generator=gen)
    labels = torch.randint(0, classes, (rows,), generator=gen)
    feats = (centres[labels] + 4 * torch.randn(rows, dim, generator=gen)).numpy().astype(np.float32)
    test = slice(0, 10_000)
    # the probe's feature sets for a 4-block extraction of width 320: the last block, and all four
    grid = {"1": slice(dim - dim // 4, None), "4": slice(None)}

    def run():
        start = time.perf_counter()
        acc = linear_probe.torch_probe(feats, labels.numpy(), feats[test], labels.numpy()[test], grid, device=DEVICE)
        return time.perf_counter() - start, acc

    seconds, acc = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(device=str(DEVICE), rows=rows, dim=dim, classes=classes, seconds=round(seconds, 1),
                                epochs=10, grid=len(linear_probe.LEARNING_RATES) * len(grid),
                                rows_per_s=round(rows * 10 * (len(grid) + 1) / seconds), top1=acc["top1"])
    assert acc["top1"] > 100 / classes  # it learned something
