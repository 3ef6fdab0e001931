"""Image sources: an image-folder tree, Fashion-MNIST read from its ``*-ubyte.gz`` files, synthetic.

A source has ``len()``, ``load(i) -> PIL.Image`` and ``labels`` (an int array). Decoding errors
propagate from ``load``; the batch dataset skips and counts them.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_HELP = (
    "Fashion-MNIST not found in {root}. On Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist` "
    "(installs to /usr/share/datasets/fashion-mnist); elsewhere put the four *-ubyte.gz files of "
    "github.com/zalandoresearch/fashion-mnist in a folder and pass data.root=FOLDER."
)


class ImageFolder:
    """``root/<class>/<image>``; images directly under ``root`` get label 0. Classes sorted by name."""

    def __init__(self, root: str | os.PathLike):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data.root '{root}' does not exist or is not a folder")
        files, labels = [], []
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        direct = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        files += direct
        labels += [0] * len(direct)
        for label, name in enumerate(classes):
            found = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            files += found
            labels += [label] * len(found)
        if not files:
            raise FileNotFoundError(
                f"data.root '{root}' holds no images: expected class sub-folders of "
                f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files"
            )
        self.root, self.files, self.classes = root, files, classes
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self):
        return len(self.files)

    def describe(self, i: int) -> str:
        return str(self.files[i])

    def load(self, i: int) -> Image.Image:
        with Image.open(self.files[i]) as img:
            img.load()  # decode now, so a truncated file fails here and not later
            return img.copy()


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): big-endian magic with the dimension count, then the sizes."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class FashionMNIST:
    """60k train / 10k test 28x28 grayscale images in 10 classes, read straight from the gz files."""

    def __init__(self, root: str | None = None, split: str = "train"):
        root = Path(root or FASHION_MNIST_DIR)
        image_file, label_file = FASHION_MNIST_FILES[split]
        if not (root / image_file).is_file() or not (root / label_file).is_file():
            raise FileNotFoundError(FASHION_MNIST_HELP.format(root=root))
        self.images = _read_idx(root / image_file)
        self.labels = _read_idx(root / label_file).astype(np.int64)

    def __len__(self):
        return len(self.images)

    def describe(self, i: int) -> str:
        return f"fashion-mnist[{i}]"

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i], mode="L")


class Synthetic:
    """Deterministic random RGB images (smooth noise) for benchmarks; label = index mod 10."""

    def __init__(self, size: int, img_size: int, seed: int = 0):
        self.size, self.img_size, self.seed = size, img_size, seed
        self.labels = np.arange(size, dtype=np.int64) % 10

    def __len__(self):
        return self.size

    def describe(self, i: int) -> str:
        return f"synthetic[{i}]"

    def load(self, i: int) -> Image.Image:
        rng = np.random.default_rng([self.seed, i])
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        return Image.fromarray(coarse, mode="RGB").resize((self.img_size, self.img_size), Image.BILINEAR)


def build_source(data_cfg, img_size: int, split: str = "train"):
    """The source a ``DataConfig`` names. ``split`` is train/test (folder: ``root/train``, ``root/val``
    when they exist, else ``root`` itself for training)."""
    if data_cfg.dataset == "fashion-mnist":
        return FashionMNIST(data_cfg.root, split)
    if data_cfg.dataset == "synthetic":
        return Synthetic(data_cfg.synthetic_size, img_size, seed=0 if split == "train" else 1)
    if data_cfg.root is None:
        raise ValueError("data.dataset='folder' needs data.root (a folder of class sub-folders of images)")
    root = Path(data_cfg.root)
    sub = root / ("train" if split == "train" else "val")
    if sub.is_dir():
        return ImageFolder(sub)
    if split != "train":
        raise FileNotFoundError(f"evaluation needs '{sub}' (class sub-folders of images) under data.root")
    return ImageFolder(root)
