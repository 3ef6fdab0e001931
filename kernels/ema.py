"""In-place exponential moving average of weights: ``target = m * target + (1 - m) * source``.

``target`` is fp32 (bf16 targets stall: with 1 - m <= 0.004 an update is below one bf16 ulp);
``source`` is fp32 or bf16. Works on one tensor or lists, and on any contiguous slice (a ZeRO shard).
"""
from __future__ import annotations

from typing import Sequence

import torch


def ema_reference_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], weight) -> None:
    """``torch._foreach_lerp_``: ``t += w * (s - t)`` with ``w = 1 - m`` (a float or a 0-d tensor)."""
    sources = [s if s.dtype == t.dtype else s.to(t.dtype) for t, s in zip(targets, sources)]
    if isinstance(weight, torch.Tensor):
        # lerp has no tensor-scalar overload: t + w * (s - t) with w on the device (no host sync)
        delta = torch._foreach_sub(sources, targets)
        torch._foreach_mul_(delta, weight)
        torch._foreach_add_(targets, delta)
    else:
        torch._foreach_lerp_(list(targets), sources, weight)


def ema_(target, source, momentum, backend: str = "reference") -> None:
    """Update ``target`` in place towards ``source``.

    target, source: a tensor or equal-length lists of tensors of matching shapes; target fp32.
    momentum: float, or a 0-d device tensor (e.g. 1.0 on a skipped step, so no host sync is needed).
    """
    targets = [target] if isinstance(target, torch.Tensor) else list(target)
    sources = [source] if isinstance(source, torch.Tensor) else list(source)
    if len(targets) != len(sources):
        raise ValueError(f"ema_: {len(targets)} targets but {len(sources)} sources")
    for t, s in zip(targets, sources):
        if t.dtype != torch.float32:
            raise TypeError(f"ema_: target must be float32 (bf16 EMA stalls), got {t.dtype}")
        if t.shape != s.shape:
            raise ValueError(f"ema_: shape mismatch {tuple(t.shape)} vs {tuple(s.shape)}")
    if backend != "reference":
        raise ValueError(f"ema backend {backend!r} is unknown; only 'reference' exists")
    weight = 1.0 - momentum
    with torch.no_grad():
        ema_reference_(targets, sources, weight)
