"""I-JEPA regression loss between predictions and layer-normed target features.

``pred [T, D]``; ``target [B, N, D]`` (target-encoder output, no grad); ``index`` int ``[T]`` of flat
rows ``b * N + n`` in ``target``. The target rows are layer-normed without affine (eps 1e-6) and the
loss is averaged over all ``T * D`` elements. smooth-L1 uses beta 1 (the official default).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("smooth_l1", "l2")


def jepa_target_loss_reference(pred, target, index, kind="smooth_l1"):
    """Plain-PyTorch chain: gather -> layer_norm -> loss (fp32 maths)."""
    rows = target.reshape(-1, target.shape[-1]).index_select(0, index)
    rows = F.layer_norm(rows.float(), (rows.shape[-1],), eps=1e-6)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred.float(), rows, beta=1.0)
    if kind == "l2":
        return F.mse_loss(pred.float(), rows)
    raise ValueError(f"unknown loss kind {kind!r}; choose one of {KINDS}")


def jepa_target_loss(pred, target, index, kind: str = "smooth_l1", backend: str = "reference"):
    """Scalar fp32 loss; gradient flows to ``pred`` only."""
    if pred.shape[0] != index.shape[0] or pred.shape[-1] != target.shape[-1]:
        raise ValueError(f"pred {tuple(pred.shape)} does not match index {tuple(index.shape)} / target {tuple(target.shape)}")
    if backend != "reference":
        raise ValueError(f"target-loss backend {backend!r} is unknown; only 'reference' exists")
    return jepa_target_loss_reference(pred, target.detach(), index, kind)
