"""Image -> normalised tensor at the model's size and channel count (PIL only, no torchvision)."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def channel_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel in [0, 1] units: ImageNet's for RGB; for one grey channel the average of
    ImageNet's three (what every loader here normalises grey images with)."""
    if channels == 1:
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    return IMAGENET_MEAN, IMAGENET_STD


def random_resized_crop_box(width, height, rng: np.random.Generator, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3)):
    """A crop box (left, top, right, bottom) with area in ``scale`` of the image and log-uniform aspect
    ``ratio``: torchvision's RandomResizedCrop.get_params algorithm (10 tries, then a centre crop)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height  # fallback: the largest centred crop within the ratio bounds
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class ImageTransform:
    """PIL image -> float32 ``[C, S, S]`` normalised; grayscale replicated to RGB or RGB reduced to
    grayscale as ``channels`` asks. ``rng`` given: random-resized crop; else a plain resize."""

    def __init__(self, size: int, channels: int, crop_scale=(0.3, 1.0)):
        if channels not in (1, 3):
            raise ValueError(f"model.in_chans must be 1 or 3, got {channels}")
        self.size, self.channels, self.crop_scale = size, channels, crop_scale
        mean, std = channel_stats(channels)
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        img = self.convert(img)
        box = None if rng is None else random_resized_crop_box(*img.size, rng, self.crop_scale)
        return self.to_tensor(img.resize((self.size, self.size), Image.BILINEAR, box=box))

    def convert(self, img: Image.Image) -> Image.Image:
        """Any PIL mode -> ``L`` (one channel) or ``RGB``."""
        if img.mode.startswith("I"):  # 16-bit grayscale (PNG "I;16"): PIL's convert clips at 255, i.e. white
            arr = np.asarray(img, dtype=np.float64) / 257.0
            img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))  # uint8 2-D: mode L
        return img.convert("L" if self.channels == 1 else "RGB")

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """A converted image -> float32 ``[C, H, W]``, normalised."""
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).float().div_(255.0)
        x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
        return (x - self.mean) / self.std


class EvalTransform(ImageTransform):
    """The standard evaluation transform: the short side resized to ``size * 256 / 224``, then the centre
    ``size x size`` crop (the ImageNet convention of the DINO and DINOv2 linear evaluations)."""

    RESIZE = 256 / 224

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        img = self.convert(img)
        width, height = img.size
        short = round(self.size * self.RESIZE)
        scale = short / min(width, height)
        new_w, new_h = max(short, round(width * scale)), max(short, round(height * scale))
        img = img.resize((new_w, new_h), Image.BILINEAR)
        left, top = round((new_w - self.size) / 2), round((new_h - self.size) / 2)
        return self.to_tensor(img.crop((left, top, left + self.size, top + self.size)))
