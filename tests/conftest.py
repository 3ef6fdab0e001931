"""Shared fixtures: a tiny run configuration, image-folder trees, helpers to run the trainer.

Everything here is sized for a 2-core CPU machine: a 16 px image, 4 px patches (a 4x4 grid), width 32,
two blocks. Torch runs on one thread (the machine's second core is often busy; two threads fighting
for one core make a tiny step ~100x slower).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Triton kernels run compiled on a GPU and in Triton's interpreter on CPU tensors elsewhere. The
# interpreter is chosen when a kernel is decorated, so this must precede every fastjepa_kernels import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# the path launchers are given in the docs: deepspeed fastjepa/train.py --config ...
TRAIN_SCRIPT = REPO / "fastjepa" / "train.py"
CONFIGS = REPO / "src" / "fastjepa" / "configs"

torch.set_num_threads(1)

# A tiny model and data set: every override the trainer understands, as ``section.key=value``.
TINY = [
    "model.arch=tiny", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "model.pred_depth=1", "model.pred_embed_dim=16", "model.pred_num_heads=2",
    "model.img_size=16", "model.patch_size=4", "model.in_chans=3",
    "mask.min_keep=1",
    "data.dataset=synthetic", "data.synthetic_size=64", "data.num_workers=0",
    "train.batch_size=8", "train.precision=fp32", "train.device=cpu",
    "train.progress=off", "train.tensorboard=false", "train.log_every=1",
    "train.checkpoint_every=1000",
    "optim.lr=1e-3", "optim.start_lr=1e-3", "optim.warmup_steps=0",
]


def tiny_config_dict(**sections) -> dict:
    """The TINY overrides as a JSON config dict, optionally updated per section."""
    from fastjepa.config import apply_overrides

    raw = apply_overrides({}, list(TINY))
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def subprocess_env(**extra) -> dict:
    """Environment for child Python processes: one thread each, the repo importable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")])))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def nan_empty(*shape, dtype=None, device=None, **kw):
    """``torch.empty`` whose floating-point results start as NaN: a kernel's launcher allocating with it
    leaves NaN wherever the kernel forgot to write, and the comparison with the reference fails."""
    out = torch.empty(*shape, dtype=dtype, device=device, **kw)
    return out.fill_(float("nan")) if out.is_floating_point() else out


def read_metrics(output_dir) -> list[dict]:
    """metrics.jsonl as strict JSON (NaN/Infinity are not JSON and fail here)."""
    def reject(constant):
        raise ValueError(f"metrics.jsonl holds the non-JSON constant {constant}")

    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines() if line.strip()]


def make_image(path: Path, size, mode: str, seed: int) -> None:
    """A smooth random image (so JPEG keeps it) of ``size`` = (width, height) in ``mode``."""
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    coarse = rng.integers(0, 256, size=(4, 4, channels), dtype=np.uint8)
    img = Image.fromarray(coarse[..., 0] if channels == 1 else coarse, mode=mode).resize(size, Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def make_image_tree(root: Path, per_class: int = 8, classes=("cat", "dog")) -> list[Path]:
    """``root/<class>/<i>.{jpg,png}``: JPEG and PNG, RGB and grayscale, sizes from 9x40 to 64x48."""
    sizes = [(32, 32), (64, 48), (20, 30), (9, 40), (40, 9), (17, 17), (50, 21), (24, 64)]
    modes = ["RGB", "L", "RGB", "L", "RGBA", "RGB", "L", "RGB"]
    files = []
    for c, name in enumerate(classes):
        for i in range(per_class):
            mode = modes[i % len(modes)]
            ext = "png" if (i % 2 or mode == "RGBA") else "jpg"
            path = root / name / f"{i:03d}.{ext}"
            make_image(path, sizes[(i + c) % len(sizes)], mode, seed=100 * c + i)
            files.append(path)
    return files


def one_file_per_class(root: Path, count: int = 16) -> Path:
    """``count`` class folders of one image each (JPEG and PNG, RGB and grayscale): a batch's labels
    name its files. Returns ``root``."""
    for i in range(count):
        ext = "png" if i % 3 == 0 else "jpg"
        make_image(root / f"c{i:02d}" / f"img.{ext}", (40 + 3 * i, 30 + 2 * i), "RGB" if i % 4 else "L", seed=i)
    return root


@pytest.fixture
def tiny():
    """The tiny override list (a copy: tests append to it)."""
    return list(TINY)


@pytest.fixture
def image_tree(tmp_path):
    """A folder of 16 generated images in two classes; returns its root."""
    root = tmp_path / "images"
    make_image_tree(root)
    return root


# The helpers reach the test modules as fixtures (never ``import conftest``: benchmarks/ has its own).
@pytest.fixture(scope="session")
def helpers():
    """Namespace of the helper functions above."""
    import types

    return types.SimpleNamespace(
        TINY=list(TINY), REPO=REPO, CONFIGS=CONFIGS, TRAIN_SCRIPT=TRAIN_SCRIPT, tiny_config_dict=tiny_config_dict,
        subprocess_env=subprocess_env, read_metrics=read_metrics, make_image=make_image,
        make_image_tree=make_image_tree, one_file_per_class=one_file_per_class, nan_empty=nan_empty,
    )
