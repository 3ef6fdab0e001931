"""Fixed 2-D sine-cosine position embeddings (MAE / I-JEPA layout)."""
from __future__ import annotations

import torch


def sincos_1d(dim: int, coords: torch.Tensor) -> torch.Tensor:
    """``[len(coords), dim]`` float64: first half sin, second half cos, frequencies 1 / 10000^(i / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = coords.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """``[height * width, dim]`` float32, row-major patches. As in the official code, the first half
    of the channels encodes the column and the second half the row."""
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    return emb.float()
