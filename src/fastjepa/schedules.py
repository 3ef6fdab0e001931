"""Per-step schedules of the official recipe (facebookresearch/ijepa ``src/utils/schedulers.py``)."""
from __future__ import annotations

import math


def learning_rate(step: int, cfg, total: int) -> float:
    """Linear warmup ``start_lr -> lr`` over ``warmup_steps``, then cosine ``lr -> final_lr`` to ``total``."""
    if step < cfg.warmup_steps:
        return cfg.start_lr + (cfg.lr - cfg.start_lr) * step / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.final_lr + (cfg.lr - cfg.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def weight_decay(step: int, cfg, total: int) -> float:
    """Cosine ``weight_decay -> final_weight_decay`` over the run (0.04 -> 0.4 officially)."""
    progress = min(1.0, step / max(1, total))
    return cfg.final_weight_decay + (cfg.weight_decay - cfg.final_weight_decay) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_momentum(step: int, cfg, total: int) -> float:
    """Linear ``ema_momentum[0] -> ema_momentum[1]`` over the run (0.996 -> 1.0 officially)."""
    start, end = cfg.ema_momentum
    return start + (end - start) * min(1.0, step / max(1, total))
