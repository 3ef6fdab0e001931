"""Data: every source gives [B, C, S, S] float batches; ranks shard the global batch; batches are a pure
function of (seed, epoch, step, rank); RandomResizedCrop follows torchvision's algorithm; unreadable files
are skipped, warned about and counted."""
from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fastjepa.cli import train_main as main
from fastjepa.config import load_config
from fastjepa.data.loader import JEPABatches, build_batches, build_loader
from fastjepa.data.sources import FASHION_MNIST_DIR, FashionMNIST, ImageFolder, Synthetic
from fastjepa.data.transforms import ImageTransform, random_resized_crop_box

GRID = (4, 4)  # 16 px images, 4 px patches
HAVE_FASHION_MNIST = os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
needs_fashion_mnist = pytest.mark.skipif(
    not HAVE_FASHION_MNIST, reason=f"Fashion-MNIST not in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")


def cfg_for(tiny, *extra):
    return load_config(None, tiny + list(extra))


# ---- shapes from every source -------------------------------------------------------------------

@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("dataset", ["folder", pytest.param("fashion-mnist", marks=needs_fashion_mnist), "synthetic"])
def test_batches_have_model_shape(tiny, image_tree, dataset, in_chans):
    extra = [f"data.dataset={dataset}", f"model.in_chans={in_chans}"]
    if dataset == "folder":
        extra.append(f"data.root={image_tree}")
    cfg = cfg_for(tiny, *extra)
    batches = build_batches(cfg, GRID)
    for key in [(0, 0), (0, batches.steps_per_epoch - 1), (3, 1)]:
        b = batches[key]
        assert b.images.shape == (8, in_chans, 16, 16)
        assert b.images.dtype == torch.float32 and torch.isfinite(b.images).all()
        assert -3.0 < b.images.mean().item() < 3.0 and b.images.std().item() > 0.01  # normalised, not blank
        assert b.labels.shape == (8,) and b.labels.dtype == torch.int64
        assert b.masks.batch_size == 8 and b.skipped == 0
        assert (b.epoch, b.step_in_epoch) == key


@needs_fashion_mnist
def test_fashion_mnist_source_matches_the_published_set():
    train, test = FashionMNIST(split="train"), FashionMNIST(split="test")
    assert (len(train), len(test)) == (60000, 10000)
    assert np.bincount(train.labels).tolist() == [6000] * 10  # balanced classes, per the dataset card
    img = train.load(0)
    assert img.mode == "L" and img.size == (28, 28)


def test_fashion_mnist_missing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        FashionMNIST(str(tmp_path))


def test_image_folder_classes_and_extensions(image_tree, helpers):
    helpers.make_image(image_tree / "zebra" / "deep" / "nested.png", (20, 20), "RGB", seed=1)
    (image_tree / "cat" / "readme.txt").write_text("ignored")
    folder = ImageFolder(image_tree)
    assert folder.classes == ["cat", "dog", "zebra"]
    assert len(folder) == 17 and folder.labels.tolist() == [0] * 8 + [1] * 8 + [2]


# ---- sharding and determinism -------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 300), batch=st.integers(1, 16), world=st.integers(1, 4),
       seed=st.integers(0, 2**31), epoch=st.integers(0, 5))
def test_ranks_shard_the_global_batch(size, batch, world, seed, epoch):
    if size < batch * world:
        with pytest.raises(ValueError, match="fewer than one global batch"):
            JEPABatches(Synthetic(size, 16), None, None, batch, seed, 0, world)
        return
    ranks = [JEPABatches(Synthetic(size, 16), None, None, batch, seed, r, world) for r in range(world)]
    whole = JEPABatches(Synthetic(size, 16), None, None, batch * world, seed, 0, 1)
    steps = ranks[0].steps_per_epoch
    assert steps == size // (batch * world) == whole.steps_per_epoch
    seen = []
    for step in range(steps):
        parts = [r.indices(epoch, step) for r in ranks]
        assert all(len(p) == batch for p in parts)
        union = np.concatenate(parts)
        assert len(set(union.tolist())) == batch * world  # disjoint
        assert sorted(union.tolist()) == sorted(whole.indices(epoch, step).tolist())  # = the global batch
        seen += union.tolist()
    assert len(set(seen)) == len(seen) == steps * batch * world  # no image twice in an epoch
    assert all(0 <= i < size for i in seen)


def _same_batch(a, b):
    return (torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
            and torch.equal(a.masks.ctx_index, b.masks.ctx_index) and torch.equal(a.masks.tgt_index, b.masks.tgt_index))


def test_batches_are_deterministic(tiny, image_tree):
    cfg = cfg_for(tiny, "data.dataset=folder", f"data.root={image_tree}")
    one, two = build_batches(cfg, GRID, rank=1, world_size=2), build_batches(cfg, GRID, rank=1, world_size=2)
    assert _same_batch(one[(2, 0)], two[(2, 0)])  # a fresh object, same (seed, epoch, step, rank)
    other_rank = build_batches(cfg, GRID, rank=0, world_size=2)
    assert not _same_batch(one[(2, 0)], other_rank[(2, 0)])
    assert not torch.equal(one[(2, 0)].images, one[(3, 0)].images)
    other_seed = build_batches(cfg_for(tiny, "data.dataset=folder", f"data.root={image_tree}", "train.seed=1"), GRID, 1, 2)
    assert not torch.equal(one[(2, 0)].images, other_seed[(2, 0)].images)


@pytest.mark.subprocess
def test_worker_processes_give_the_same_batches(tiny):
    batches = build_batches(cfg_for(tiny), GRID)
    inline = list(build_loader(batches, 5, 9, num_workers=0))
    workers = list(build_loader(batches, 5, 9, num_workers=2))
    assert [(b.epoch, b.step_in_epoch) for b in inline] == [(0, 5), (0, 6), (0, 7), (1, 0)]
    assert all(_same_batch(a, b) for a, b in zip(inline, workers, strict=True))


# ---- RandomResizedCrop --------------------------------------------------------------------------

def torchvision_get_params(width, height, scale, ratio, uniform, randint):
    """torchvision.transforms.RandomResizedCrop.get_params (v0.2x), re-derived with injectable random
    draws. Returns (top, left, h, w, fallback)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * uniform(scale[0], scale[1])
        aspect_ratio = math.exp(uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = randint(0, height - h + 1)
            j = randint(0, width - w + 1)
            return i, j, h, w, False
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, True


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 400), height=st.integers(1, 400), lo=st.floats(0.01, 1.0), span=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**32 - 1))
def test_random_resized_crop_matches_torchvision(width, height, lo, span, seed):
    scale = (lo, min(1.0, lo + span))
    ratio = (3 / 4, 4 / 3)
    ref_rng = np.random.default_rng(seed)
    top, left, h, w, fallback = torchvision_get_params(
        width, height, scale, ratio, uniform=lambda a, b: ref_rng.uniform(a, b),
        randint=lambda a, b: int(ref_rng.integers(a, b)))
    box = random_resized_crop_box(width, height, np.random.default_rng(seed), scale, ratio)
    assert box == (left, top, left + w, top + h)

    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height  # in bounds, never empty
    if not fallback:
        # area within scale and aspect within ratio, up to the rounding of w and h to integers
        a = width * height
        slack = 0.5 * (w + h) + 0.75
        assert scale[0] * a - slack <= w * h <= scale[1] * a + slack
        assert (w - 0.5) / (h + 0.5) <= ratio[1] + 1e-9 and (w + 0.5) / (h - 0.5) >= ratio[0] - 1e-9


def test_random_resized_crop_falls_back_to_a_centre_crop():
    # a 400x10 strip: no 3/4..4/3 box of >= 30 % area fits, so the centre crop of ratio 4/3 is used
    box = random_resized_crop_box(400, 10, np.random.default_rng(0), (0.3, 1.0))
    w, h = box[2] - box[0], box[3] - box[1]
    assert (w, h) == (13, 10) and box[0] == (400 - 13) // 2


def test_transform_applies_the_drawn_box():
    """The tensor is the drawn box cropped, resized bilinearly and normalised, as torchvision's
    crop-then-resize (non-square input, so a swapped width/height would show). PIL's ``resize(box=)``
    also reads the pixels just outside the box at its edges: equal up to that on a smooth image."""
    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 256, size=(3, 5, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((50, 30), Image.BILINEAR)  # 50 wide, 30 high, smooth
    tf = ImageTransform(16, 3, crop_scale=(0.3, 1.0))
    out = tf(img, np.random.default_rng(11))
    box = random_resized_crop_box(50, 30, np.random.default_rng(11), (0.3, 1.0))
    ref = np.asarray(img.crop(box).resize((16, 16), Image.BILINEAR), dtype=np.float32) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    ref = torch.from_numpy(((ref - mean) / std).transpose(2, 0, 1)).float()
    torch.testing.assert_close(out, ref, rtol=0, atol=0.1)
    assert (out - ref).abs().mean() < 0.02
    plain = tf(img)  # no rng: the whole image resized
    assert plain.shape == (3, 16, 16)


def test_sixteen_bit_grayscale_is_not_saturated():
    """A 16-bit PNG (mode I;16) must map to the same picture as its 8-bit version, not to white."""
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    img16 = Image.fromarray(ramp)
    assert img16.mode == "I;16"
    img8 = Image.fromarray((ramp >> 8).astype(np.uint8), mode="L")
    for channels in (1, 3):
        tf = ImageTransform(16, channels)
        torch.testing.assert_close(tf(img16), tf(img8), rtol=0, atol=2.5 / 255 / 0.22)


# ---- unreadable files ---------------------------------------------------------------------------

def _add_bad_files(root, helpers):
    """A truncated JPEG and a text file named .jpg, not adjacent in file order (each is replaced by
    the next file, which must be readable)."""
    helpers.make_image(root / "cat" / "002b.jpg", (64, 64), "RGB", seed=9)
    data = (root / "cat" / "002b.jpg").read_bytes()
    (root / "cat" / "002b.jpg").write_bytes(data[: len(data) // 2])
    (root / "dog" / "005b.jpg").write_text("this is not a JPEG\n")
    # drop two good images so the tree still has 16 files: 2 steps of 8 per epoch
    (root / "cat" / "007.png").unlink()
    (root / "dog" / "007.png").unlink()
    return [root / "cat" / "002b.jpg", root / "dog" / "005b.jpg"]


def test_unreadable_images_are_skipped_and_counted(tiny, image_tree, helpers):
    bad = _add_bad_files(image_tree, helpers)
    batches = build_batches(cfg_for(tiny, "data.dataset=folder", f"data.root={image_tree}"), GRID)
    assert batches.steps_per_epoch == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epoch = [batches[(0, s)] for s in range(2)]
    assert sum(b.skipped for b in epoch) == 2
    messages = " ".join(str(w.message) for w in caught)
    assert all(str(p) in messages for p in bad) and "skipping unreadable image" in messages
    assert all(b.images.shape == (8, 3, 16, 16) and torch.isfinite(b.images).all() for b in epoch)


def test_trainer_counts_skipped_images(tmp_path, tiny, image_tree, helpers):
    _add_bad_files(image_tree, helpers)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        code = main(["--output-dir", str(tmp_path / "run")] + tiny
                    + ["data.dataset=folder", f"data.root={image_tree}", "train.max_steps=4",
                       "data.loader=torch"])  # the DALI loader's version: tests/test_dali.py
    assert code == 0
    records = helpers.read_metrics(tmp_path / "run")
    assert records[1]["skipped_images"] == 2 and records[-1]["skipped_images"] == 4  # 2 per epoch


def test_folder_of_only_unreadable_files_stops_cleanly(tmp_path, tiny, capsys):
    """Every file is broken: no crash with a traceback but exit code 4 and one line naming the data."""
    root = tmp_path / "broken"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(20):
            (root / c / f"{i:02d}.jpg").write_text("not an image\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["--output-dir", str(tmp_path / "run")] + tiny
                    + ["data.dataset=folder", f"data.root={root}", "train.max_steps=2", "data.loader=torch"])
    err = capsys.readouterr().err
    assert code == 4
    assert "unreadable images in a row" in err and str(root) in err and "Traceback" not in err
