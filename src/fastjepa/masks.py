"""I-JEPA multi-block masks, packed for variable-length execution.

Semantics of the official collator (facebookresearch/ijepa ``src/masks/multiblock.py``): per batch one
target-block size and one context-block size are drawn (scale and aspect ratio from one shared uniform
number); per image ``num_targets`` target blocks are placed at random and one context block is placed at
random, minus the union of the targets unless overlap is allowed; a mask needs at least ``min_keep``
tokens. Fixed here: blocks may touch the last row/column (the official ``randint(0, H - h)`` never
does) and a block may span the whole grid (the official ``while h >= H`` clamp pins a 16x16 context
block to 15x15 at the top left). Every image keeps its own number of context tokens unless
``truncate`` asks for the official cut to the batch minimum.

All randomness comes from a numpy generator seeded by (seed, epoch, step, rank), so a batch's masks
are the same whichever process or worker makes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from .config import MaskConfig


@dataclass
class PackedMasks:
    """One batch of masks. Flat indices are ``b * N + n`` into the ``[B, N]`` patch grid.

    Sequences: ``B`` context sets; ``B * M`` target blocks ordered (image, block); ``B * M`` predictor
    sequences, each = the image's context tokens followed by one block's mask tokens.
    Tensors are int32; the ``*_lens`` lists and ``*_max_seqlen`` ints live on the host.
    """

    ctx_index: torch.Tensor  # [T_ctx]
    ctx_cu_seqlens: torch.Tensor  # [B + 1]
    tgt_index: torch.Tensor  # [T_tgt]
    tgt_cu_seqlens: torch.Tensor  # [B * M + 1]
    pred_src: torch.Tensor  # [T_pred] row of cat(context rows, mask token) feeding each predictor row
    pred_pos: torch.Tensor  # [T_pred] patch position n of each predictor row
    pred_out: torch.Tensor  # [T_tgt] predictor rows that hold the target predictions
    pred_cu_seqlens: torch.Tensor  # [B * M + 1]
    ctx_lens: list
    tgt_lens: list
    pred_lens: list
    num_patches: int

    @property
    def batch_size(self) -> int:
        return len(self.ctx_lens)

    @property
    def ctx_max_seqlen(self) -> int:
        return max(self.ctx_lens)

    @property
    def pred_max_seqlen(self) -> int:
        return max(self.pred_lens)

    def _map(self, fn) -> PackedMasks:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return PackedMasks(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})

    def to(self, device, non_blocking: bool = False) -> PackedMasks:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedMasks:
        return self._map(lambda t: t.pin_memory())


class MaskSampler:
    """Draws multi-block masks on a ``height x width`` patch grid (any size, square or not)."""

    def __init__(self, cfg: MaskConfig, grid: tuple[int, int]):
        self.cfg = cfg
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        self._validate()

    # ---- block geometry -------------------------------------------------------------------------
    def _block_size(self, u: float, scale, aspect) -> tuple[int, int]:
        s = scale[0] + u * (scale[1] - scale[0])
        max_keep = int(self.num_patches * s)
        ar = aspect[0] + u * (aspect[1] - aspect[0])
        h = int(round(math.sqrt(max_keep * ar)))
        w = int(round(math.sqrt(max_keep / ar)))
        return min(max(h, 1), self.height), min(max(w, 1), self.width)

    def _smallest_area(self, scale, aspect) -> int:
        """The exact smallest block area over all draws u in [0, 1].

        The size is piecewise constant in u: it changes only where ``int(N * s(u))`` steps or where
        ``sqrt(k * ar(u))`` or ``sqrt(k / ar(u))`` crosses a half-integer (the rounding). Evaluating
        one point inside every piece between those breakpoints (and at the ends) covers every size.
        """
        n, (s0, s1), (a0, a1) = self.num_patches, scale, aspect
        breaks = [0.0, 1.0]
        keeps = range(int(n * s0), int(n * s1) + 1)
        if s1 > s0:
            breaks += [(k / n - s0) / (s1 - s0) for k in keeps]
        if a1 > a0:
            for k in keeps:
                for j in range(max(self.height, self.width) + 1):
                    for ar in ((j + 0.5) ** 2 / max(k, 1), k / (j + 0.5) ** 2):
                        breaks.append((ar - a0) / (a1 - a0))
        breaks = sorted(u for u in set(breaks) if 0.0 <= u <= 1.0)
        probes = breaks + [(a + b) / 2 for a, b in zip(breaks, breaks[1:])]
        return min(int(np.prod(self._block_size(u, scale, aspect))) for u in probes)

    def _validate(self) -> None:
        c = self.cfg
        if c.num_targets < 1:
            raise ValueError(f"mask.num_targets must be >= 1, got {c.num_targets}")
        if c.min_keep < 1 or c.min_keep > self.num_patches:
            raise ValueError(
                f"mask.min_keep={c.min_keep} cannot be met on a {self.height}x{self.width} patch grid "
                f"({self.num_patches} tokens); choose 1..{self.num_patches}"
            )
        for name, scale, aspect in (
            ("target", c.target_scale, c.target_aspect),
            ("context", c.context_scale, c.context_aspect),
        ):
            area = self._smallest_area(scale, aspect)
            if area < c.min_keep:
                raise ValueError(
                    f"mask.{name}_scale={list(scale)} gives {name} blocks of only {area} tokens on a "
                    f"{self.height}x{self.width} grid, fewer than mask.min_keep={c.min_keep}; "
                    f"raise mask.{name}_scale or lower mask.min_keep"
                )

    def _place(self, rng: np.random.Generator, size) -> np.ndarray:
        """A [H, W] bool block of ``size`` at a uniform position (last row/column included)."""
        h, w = size
        top = int(rng.integers(0, self.height - h + 1))
        left = int(rng.integers(0, self.width - w + 1))
        block = np.zeros((self.height, self.width), dtype=bool)
        block[top : top + h, left : left + w] = True
        return block

    # ---- one batch --------------------------------------------------------------------------------
    def sample(self, batch_size: int, rng: np.random.Generator):
        """Per-image sorted index arrays: (context list [B], targets list [B][M])."""
        c = self.cfg
        tgt_size = self._block_size(rng.random(), c.target_scale, c.target_aspect)
        ctx_size = self._block_size(rng.random(), c.context_scale, c.context_aspect)
        contexts, targets = [], []
        for _ in range(batch_size):
            blocks = [self._place(rng, tgt_size) for _ in range(c.num_targets)]
            exclude = [] if c.allow_overlap else list(blocks)
            for tries in range(1, 20 * (len(exclude) + 1) + 1):
                region = self._place(rng, ctx_size)
                for block in exclude:
                    region &= ~block
                if region.sum() >= c.min_keep:
                    break
                if tries % 20 == 0 and exclude:  # the official fallback: give up one exclusion
                    exclude.pop()
            else:  # unreachable when _validate holds: with no exclusion left a block has >= min_keep
                raise RuntimeError(f"context block {ctx_size} cannot hold mask.min_keep={c.min_keep} tokens")
            contexts.append(np.flatnonzero(region))
            targets.append([np.flatnonzero(b) for b in blocks])
        if c.truncate:
            keep_ctx = min(len(x) for x in contexts)
            keep_tgt = min(len(t) for ts in targets for t in ts)
            contexts = [x[:keep_ctx] for x in contexts]
            targets = [[t[:keep_tgt] for t in ts] for ts in targets]
        return contexts, targets

    def __call__(self, batch_size: int, seed: int, epoch: int = 0, step: int = 0, rank: int = 0) -> PackedMasks:
        rng = np.random.default_rng([seed, epoch, step, rank, 0x4A45])  # 0x4A45: a stream of its own
        contexts, targets = self.sample(batch_size, rng)
        return pack_masks(contexts, targets, self.num_patches)


def _cumsum0(lengths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def pack_masks(contexts: list, targets: list, num_patches: int) -> PackedMasks:
    """Pack per-image index arrays (local patch ids) into flat int32 tensors; see PackedMasks."""
    n = num_patches
    ctx_lens = [len(x) for x in contexts]
    tgt_lens = [len(t) for ts in targets for t in ts]
    ctx_cu = _cumsum0(ctx_lens)
    t_ctx = int(ctx_cu[-1])
    ctx_index = np.concatenate([x + b * n for b, x in enumerate(contexts)])
    tgt_index = np.concatenate([t + b * n for b, ts in enumerate(targets) for t in ts])

    src, pos, out, pred_lens = [], [], [], []
    row = 0
    for b, ts in enumerate(targets):
        ctx_rows = np.arange(ctx_cu[b], ctx_cu[b + 1])
        for t in ts:
            src += [ctx_rows, np.full(len(t), t_ctx)]  # row t_ctx of the source table is the mask token
            pos += [contexts[b], t]
            out.append(np.arange(row + len(ctx_rows), row + len(ctx_rows) + len(t)))
            pred_lens.append(len(ctx_rows) + len(t))
            row += pred_lens[-1]

    def i32(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))

    return PackedMasks(
        ctx_index=i32(ctx_index),
        ctx_cu_seqlens=i32(ctx_cu),
        tgt_index=i32(tgt_index),
        tgt_cu_seqlens=i32(_cumsum0(tgt_lens)),
        pred_src=i32(np.concatenate(src)),
        pred_pos=i32(np.concatenate(pos)),
        pred_out=i32(np.concatenate(out)),
        pred_cu_seqlens=i32(_cumsum0(pred_lens)),
        ctx_lens=ctx_lens,
        tgt_lens=tgt_lens,
        pred_lens=pred_lens,
        num_patches=n,
    )
