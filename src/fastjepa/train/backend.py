"""Execution backends: how the step's forward, backward, update and collectives run.

One protocol, two implementations: :class:`SingleProcess` (one CPU or one GPU) here, and
``fastjepa.train.deepspeed_backend.DeepSpeedBackend`` (data parallel through DeepSpeed ZeRO 0-3). The step, the
checkpoints and the loop talk to a backend only through :class:`ExecutionBackend`; :func:`make_backend`
is the one place that decides which runs.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn

from ..config import Config, ConfigError
from .checkpoint import CheckpointStore, FileStore
from .launch import Launch, LaunchError, batch_step_note, detect_launch


class ExecutionBackend(Protocol):
    """``rank``/``world_size``/``is_main``/``device`` describe this process; ``optimizer`` is the optimizer
    the schedules set (the engine's under DeepSpeed)."""

    rank: int
    world_size: int
    is_main: bool
    device: torch.device
    optimizer: torch.optim.Optimizer

    def prepare(self, model: nn.Module, target: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Wrap the online model, the target encoder and the optimizer for this backend."""

    def forward(self, images: torch.Tensor, masks) -> torch.Tensor:
        """The online model: predictions ``[T_tgt, D]``."""

    def target_forward(self, images: torch.Tensor) -> torch.Tensor:
        """The target encoder: features ``[B, N, D]`` (the caller holds ``no_grad``)."""

    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        """Accumulate the gradient of one micro-batch's mean loss (of ``accum``; ``last`` ends the window)."""

    def update(self, found_inf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """The optimizer step, skipped on the device where ``found_inf`` (0-d bool) or the gradients say so.
        Returns ``(found_inf as applied, the pre-clip gradient norm)``; gradients are cleared."""

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(target tensors, online fp32 tensors)`` the EMA updates pairwise: this rank's own parts."""

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """float64 CPU ``values`` summed over ranks (logging only: a host sync)."""

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (a host sync)."""

    def gather_objects(self, obj) -> list:
        """``obj`` of every rank, in rank order."""

    def barrier(self) -> None: ...

    def orphan_watch(self) -> list[tuple[int, int, str]]:
        """``(pid, parent pid, parent's name)`` of the processes whose parent must outlive them: the run
        stops (with a checkpoint) when one is orphaned, e.g. when a launcher is killed."""

    def checkpoint_store(self, folder: Path, keep: int) -> CheckpointStore:
        """Where and how this backend writes and reads checkpoints."""

    def close(self) -> None: ...


def pick_device(cfg: Config, local_rank: int | None = None) -> torch.device:
    """``train.device``: ``cuda`` (this process's local GPU), ``cpu``, or ``auto`` (CUDA when visible)."""
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no CUDA device is visible")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        index = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
        # --- launcher detection (launch.py): a task that sees one GPU only (srun --gpus-per-task=1) uses it
        count = torch.cuda.device_count()
        if count == 1:
            index = 0
        elif index >= count:
            raise ConfigError(f"local rank {index} but only {count} CUDA devices are visible to this process")
        # ---
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


class SingleProcess:
    """One process, one device: plain autograd, fused AdamW with a device-side skip (``found_inf``)."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self, cfg: Config, local_rank: int | None = None):
        self.cfg = cfg
        self.device = pick_device(cfg, local_rank)

    def prepare(self, model, target, optimizer) -> None:
        self.model, self.target, self.optimizer = model, target, optimizer
        self.grad_params = [p for p in model.parameters() if p.requires_grad]

    def forward(self, images, masks):
        return self.model(images, masks)

    def target_forward(self, images):
        return self.target(images)

    def backward(self, loss, accum: int, last: bool) -> None:
        (loss / accum).backward()

    def update(self, found_inf):
        clip = self.cfg.optim.clip_grad
        if clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.grad_params, clip, foreach=True)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.grad_params if p.grad is not None],
                                                      foreach=True)
        found_inf = found_inf | ~torch.isfinite(grad_norm)
        self.optimizer.found_inf = found_inf.float()  # fused AdamW skips the update on the device
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return found_inf, grad_norm

    def ema_pairs(self):
        return list(self.target.parameters()), list(self.model.encoder.parameters())

    def all_reduce_sum(self, values):
        return values

    def any_rank(self, flag: bool) -> bool:
        return flag

    def gather_objects(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    def orphan_watch(self) -> list[tuple[int, int, str]]:
        return []  # one process: whoever started it may go (nohup, a finished shell)

    def checkpoint_store(self, folder: Path, keep: int) -> CheckpointStore:
        return FileStore(folder, keep, self)

    def close(self) -> None:
        pass


# --- launcher detection (launch.py): every multi-process launch goes through DeepSpeed, or stops -------------
def deepspeed_wanted(cfg: Config, launch: Launch) -> bool:
    """``deepspeed.enabled``: ``on``, ``off``, or ``auto`` (on under the deepspeed launcher, and under any
    launcher that started several processes). Several processes with DeepSpeed off or not installed raise
    :class:`LaunchError`: each would train alone into the same folder."""
    several = launch.world_size > 1
    if cfg.deepspeed.enabled == "off":
        if several:
            raise LaunchError(f"deepspeed.enabled=off but {launch.kind} started {launch.world_size} processes: "
                              "each would train alone into the same folder (set deepspeed.enabled=auto)")
        return False
    wanted = cfg.deepspeed.enabled == "on" or several or launch.kind == "deepspeed"
    if wanted and importlib.util.find_spec("deepspeed") is None:
        why = f"{launch.kind} started {launch.world_size} processes" if several else "deepspeed.enabled=on"
        raise LaunchError(f"{why} but DeepSpeed is not installed, and data-parallel runs go through it: "
                          "pip install 'fastjepa[deepspeed]'")
    return wanted


def make_backend(cfg: Config, local_rank: int | None = None, environ=None) -> ExecutionBackend:
    """The backend this run asks for: ``local_rank`` is the ``--local_rank`` argument (the DeepSpeed
    launcher's), ``environ`` the environment to read the launcher from (default ``os.environ``)."""
    launch = detect_launch(environ, local_rank)
    if deepspeed_wanted(cfg, launch):
        from .deepspeed_backend import DeepSpeedBackend  # DeepSpeed is optional: imported only when it runs

        return DeepSpeedBackend(cfg, launch)
    note = batch_step_note(environ)
    if note:
        print(note, file=sys.stderr, flush=True)
    return SingleProcess(cfg, launch.local_rank if launch.distributed else local_rank)
# ---


__all__ = ["ExecutionBackend", "SingleProcess", "deepspeed_wanted", "make_backend", "pick_device"]
