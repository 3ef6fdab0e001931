"""Data loading throughput: the DALI pipeline against the torch DataLoader on the same JPEG folder.

The folder holds generated ImageNet-like JPEGs (~500 x 375, smooth content, quality 90) in 4 classes.
Both loaders make whole I-JEPA batches for configs/vith14.json (224 px, RandomResizedCrop 0.3-1.0, masks
for a 16 x 16 grid), with the same number of CPU cores: torch with ``cores`` DataLoader workers, DALI
with ``cores`` threads (CPU decoding) or nvImageCodec on the GPU (``mixed``). Reported: images/s, images/s
per core, and the ratio to the ViT-H/14 step's consumption goal (~500 images/s on one H100, issue 5).

``FASTJEPA_BENCH_LOADER_IMAGES`` sets the folder size (default 768 on CPU, 2048 on CUDA).
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

pytest.importorskip("pydantic", reason="the trainer's config needs pydantic")

from fastjepa.config import load_config  # noqa: E402
from fastjepa.data.loader import build_batches, build_loader  # noqa: E402

CUDA = torch.cuda.is_available()
CORES = int(os.environ.get("FASTJEPA_BENCH_LOADER_CORES", os.cpu_count() or 1))
IMAGES = int(os.environ.get("FASTJEPA_BENCH_LOADER_IMAGES", 2048 if CUDA else 768))
BATCH = 32
VITH_STEP_IMAGES_PER_S = 500.0  # issue 5: the ViT-H/14 step's consumption at our goal on one H100


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        w, h = int(rng.integers(420, 580)), int(rng.integers(320, 430))
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        path = root / f"class{i % 4}" / f"{i:05d}.jpg"
        path.parent.mkdir(exist_ok=True)
        img.save(path, quality=90)
    return root


def _config(root, loader):
    return load_config(REPO_CONFIG, [f"data.root={root}", f"data.loader={loader}", f"data.num_workers={CORES}",
                                     f"train.batch_size={BATCH}", "data.dataset=folder"])


REPO_CONFIG = "vith14"  # the packaged preset


def _torch_images_per_s(cfg, batches_to_time):
    data = build_batches(cfg, (16, 16))
    loader = iter(build_loader(data, 0, batches_to_time + 2, CORES))
    next(loader)  # workers started, first batch out
    start = time.perf_counter()
    n = sum(next(loader).images.shape[0] for _ in range(batches_to_time))
    return n / (time.perf_counter() - start)


def _dali_images_per_s(cfg, batches_to_time):
    from fastjepa.data.dali import DaliBatches

    device = torch.device("cuda", 0) if CUDA else torch.device("cpu")
    data = DaliBatches(cfg, (16, 16), device=device)
    it = data.iterate(0, batches_to_time + 2)
    next(it)
    start = time.perf_counter()
    n = sum(next(it).images.shape[0] for _ in range(batches_to_time))
    if CUDA:
        torch.cuda.synchronize()
    data.close()
    return n / (time.perf_counter() - start)


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_loader_images_per_second(benchmark, bench_tools, jpeg_folder, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed")
    benchmark.group = "loader"
    cfg = _config(jpeg_folder, loader)
    batches_to_time = max(2, IMAGES // BATCH - 3)
    measure = _dali_images_per_s if loader == "dali" else _torch_images_per_s
    rate = benchmark.pedantic(lambda: measure(cfg, batches_to_time), rounds=1, iterations=1)
    info = bench_tools.describe(torch.device("cuda" if CUDA and loader == "dali" else "cpu"))
    info.update(loader=loader, decode="gpu (mixed)" if CUDA and loader == "dali" else "cpu", cores=CORES,
                images=IMAGES, batch=BATCH, img_size=224, images_per_s=rate, images_per_s_per_core=rate / CORES,
                fraction_of_vith14_step_consumption=rate / VITH_STEP_IMAGES_PER_S)
    benchmark.extra_info.update(info)
    assert rate > 0
