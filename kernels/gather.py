"""Packed token gather and its inverse.

``x`` is ``[B, N, D]`` (or already flat ``[B*N, D]``); ``index`` is int32/int64 ``[T]`` of flat rows
``b * N + n``. Autograd handles the backward (scatter-add into ``x`` and ``pos``).
"""
from __future__ import annotations

import torch


def gather_tokens(x: torch.Tensor, index: torch.Tensor, pos: torch.Tensor | None = None, out_dtype=None):
    """Rows of ``x.reshape(-1, D)`` picked by ``index`` -> ``[T, D]``, plus ``pos[index % N]``.

    pos: ``[N, D]`` position embedding, added after the gather (needs a 3-D ``x`` to know N).
    """
    flat = x.reshape(-1, x.shape[-1])
    out = flat.index_select(0, index)
    if pos is not None:
        if x.dim() != 3:
            raise ValueError("gather_tokens with pos needs x as [B, N, D]")
        out = out + pos.index_select(0, index % x.shape[1])
    return out if out_dtype is None else out.to(out_dtype)


def scatter_tokens(tokens: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Inverse of :func:`gather_tokens`: ``[T, D]`` rows into a zero ``[num_rows, D]`` at ``index``."""
    out = tokens.new_zeros(num_rows, tokens.shape[-1])
    return out.index_add(0, index, tokens)
