"""One I-JEPA optimizer step, top to bottom.

  images -> target encoder (all N tokens, no grad) --------------------------------> h [B, N, D]
  images -> context encoder (packed context tokens) -> predictor (context + mask tokens per block)
         -> predictions [T_tgt, D] -> loss vs layer_norm(h) at the target rows -> backward  (x grad_accum_steps)
  -> update: AdamW, skipped on the device when the loss or the gradients are not finite
  -> EMA: target <- momentum * target + (1 - momentum) * context encoder (momentum 1 on a skipped step)

The host never waits on the device here: a non-finite step is decided by ``found_inf`` on the device, the
schedules are host floats, and the sequence lengths come from the host-side masks.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from fastjepa_kernels import ema_, jepa_target_loss

from .. import schedules
from ..config import Config
from ..optim import set_hyperparameters
from .metrics import rankme


class TrainStep:
    """The step of a run. ``backend`` (an ``ExecutionBackend``) runs the forward, backward, update and EMA
    views; ``skipped_steps`` and ``nonfinite_run`` (steps skipped in all, and in a row) are 0-d device
    counters, read only when logging or checkpointing."""

    def __init__(self, cfg: Config, backend, ops_backend: str):
        self.cfg, self.backend, self.ops_backend = cfg, backend, ops_backend
        device = backend.device
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                         if cfg.train.precision == "bf16" else nullcontext())
        self.total_steps = cfg.train.schedule_steps or cfg.train.max_steps  # what the schedules span
        self.skipped_steps = torch.zeros((), device=device)
        self.nonfinite_run = torch.zeros((), device=device)
        self.probe = None  # an OnlineProbe (online_probe.py) the trainer may set: trained on detached features

    def __call__(self, step: int, micro_batches, want_stats: bool = False) -> dict:
        """Optimizer step ``step`` (0-based) over ``grad_accum_steps`` micro-batches. Returns device tensors
        (``loss``, ``skipped``, ``grad_norm``, the collapse watch when ``want_stats``) and the host schedules."""
        cfg, backend = self.cfg, self.backend
        # as the official train_step: its schedulers step before each update (the first update already uses
        # the lr and wd of step 1), its momentum generator yields step 0's value first
        lr = schedules.learning_rate(step + 1, cfg.optim, self.total_steps)
        wd = schedules.weight_decay(step + 1, cfg.optim, self.total_steps)
        momentum = schedules.ema_momentum(step, cfg.optim, self.total_steps)
        set_hyperparameters(backend.optimizer, lr, wd)

        # ---- forward, loss, backward per micro-batch -------------------------------------------------
        accum = len(micro_batches)
        loss_sum = torch.zeros((), device=backend.device)
        stats = {}
        for i, batch in enumerate(micro_batches):
            images = batch.images.to(backend.device, non_blocking=True)
            masks = batch.masks.to(backend.device, non_blocking=True)
            with torch.no_grad(), self.autocast:
                h = backend.target_forward(images)  # [B, N, D]
            with self.autocast:
                pred = backend.forward(images, masks)  # [T_tgt, D]
            loss = jepa_target_loss(pred, h, masks.tgt_index, cfg.train.loss, eps=cfg.train.target_norm_eps,
                                    backend=self.ops_backend)
            loss_sum += loss.detach()
            backend.backward(loss, accum, last=i + 1 == accum)
            if self.probe is not None and self.probe.wants(step):  # its own graph: h is detached inside
                self.probe.update(h, batch.labels)
            if want_stats:  # collapse watch: per-dimension std of the features, and their effective rank
                stats["target_feature_std"] = h.float().std(dim=(0, 1)).mean()
                stats["pred_feature_std"] = pred.detach().float().std(dim=0).mean()
                # RankMe on one pooled embedding per image, as Garrido et al. (ICML 2023) compute it on image
                # representations; so it is at most min(B, D) for a micro-batch of B images
                stats["target_rankme"] = rankme(h.float().mean(1))
        loss_mean = loss_sum / accum

        # ---- update, skipped on the device when anything is not finite ---------------------------------
        found_inf, grad_norm = backend.update(~torch.isfinite(loss_mean))

        # ---- EMA: a skipped step keeps the target still (momentum 1), decided on the device ------------
        # (float64 momentum: in fp32, 1 - 0.9999 would be off by ~6e-4 relative)
        momentum_t = torch.full((), momentum, dtype=torch.float64, device=backend.device)  # a fill, not a copy
        targets, sources = backend.ema_pairs()
        ema_(targets, sources, torch.where(found_inf, 1.0, momentum_t), backend=self.ops_backend)
        self.skipped_steps += found_inf
        self.nonfinite_run = (self.nonfinite_run + 1) * found_inf
        return {"loss": loss_mean, "skipped": found_inf, "grad_norm": grad_norm, "lr": lr, "wd": wd,
                "momentum": momentum, **stats}

    # ---- the counters in a checkpoint ------------------------------------------------------------------
    def counters(self) -> dict:
        """``skipped_steps`` and ``nonfinite_run`` on the CPU, as :class:`~fastjepa.io.train_state.TrainState` holds them."""
        return {"skipped_steps": self.skipped_steps.cpu(), "nonfinite_run": self.nonfinite_run.cpu()}

    def load_counters(self, state) -> None:
        self.skipped_steps.copy_(torch.as_tensor(state.skipped_steps))
        self.nonfinite_run.copy_(torch.as_tensor(state.nonfinite_run))


__all__ = ["TrainStep"]
