"""AdamW with the official parameter groups: no weight decay on biases and 1-D parameters."""
from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """Fused AdamW: one kernel per step, and ``found_inf`` lets a non-finite step be skipped on the
    device without a host sync."""
    return torch.optim.AdamW(param_groups(model), lr=cfg.start_lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=True)


def set_hyperparameters(optimizer, lr: float, wd: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_wd", True):
            group["weight_decay"] = wd
