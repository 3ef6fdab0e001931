"""An online linear probe (``train.online_probe``): a linear classifier trained beside the run on the detached,
average-pooled target-encoder features and the batch labels, so the run reports a top-1 as it goes.

The features are standardised by a BatchNorm without affine parameters before the linear layer (MAE's
linear probe, He et al. 2022, appendix A.2; the offline probe, ``fastjepa.eval.linear_probe``, standardises
too): on raw pooled features a common offset dominates, and the probe learned much more slowly (measured:
42 % vs 62 % top-1 after 600 steps on the features of a 600-step demo encoder, 12.8k Fashion-MNIST images).

The probe has its own graph, parameters and optimizer, and reads the features through ``detach()``: the
encoder's and predictor's gradients are those of a run without it (``tests/test_monitoring.py`` checks this
bitwise). Its weights start at zero, so building it draws nothing from the global random stream either.
Top-1 is measured on each batch before the probe's update on it (a running training accuracy), summed on
the device and read once per logging step with the other metrics (``online_probe_top1``).

Under several ranks each rank trains its own head on its own shard (no collective in the step); the logged
top-1 is over every rank's batches. The main rank's head is saved beside the checkpoints
(``checkpoints/online_probe.pt``, atomically) and every rank starts from it on ``--resume``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config
from ..data.sources import Synthetic
from ..io.files import read_weights, torch_save

PROBE_FILE = "online_probe.pt"
FASHION_MNIST_CLASSES = 10  # Xiao et al. 2017, "Fashion-MNIST": ten clothing classes


def count_classes(cfg: Config) -> int:
    """The number of classes of the run's data set (0 or 1: no labels to learn)."""
    data = cfg.data
    if data.dataset == "fashion-mnist":
        return FASHION_MNIST_CLASSES
    if data.dataset == "synthetic":
        return int(Synthetic(data.synthetic_size, cfg.model.img_size).labels.max()) + 1
    root = Path(data.root) if data.root else None
    if root is None or not root.is_dir():
        return 0
    return sum(1 for p in root.iterdir() if p.is_dir())  # data.sources.ImageFolder: one class per sub-folder


class OnlineProbe:
    """``nn.Linear(dim, num_classes)`` on pooled features standardised by ``nn.BatchNorm1d(dim, affine=False)``
    (batch statistics in training, running ones kept for the checkpoint), AdamW (no weight decay) at ``lr``, trained every
    ``every`` optimizer steps. ``correct``/``loss_sum`` (0-d, on ``device``) and ``seen`` (host) are the
    logging window's sums."""

    def __init__(self, dim: int, num_classes: int, lr: float = 1e-2, every: int = 1, device="cpu"):
        self.norm = nn.BatchNorm1d(dim, affine=False, device=device)
        self.head = nn.Linear(dim, num_classes, device=device)
        nn.init.zeros_(self.head.weight)  # zero start: convex problem, and no draw from the global RNG
        nn.init.zeros_(self.head.bias)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=0.0)
        self.every, self.device = every, torch.device(device)
        self.correct = torch.zeros((), device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.seen = 0

    def wants(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) trains the probe."""
        return step % self.every == 0

    def update(self, h: torch.Tensor, labels: torch.Tensor) -> None:
        """One step on target features ``h`` [B, N, D] (any float dtype) and ``labels`` [B] int64 (any device).
        A batch of one image is skipped (no batch statistics)."""
        if h.shape[0] < 2:
            return
        labels = labels.to(self.device, non_blocking=True)
        with torch.enable_grad(), torch.autocast(self.device.type, enabled=False):
            features = h.detach().float().mean(1)  # [B, D]: average-pooled, as the linear-probe evaluation does
            logits = self.head(self.norm(features))
            loss = F.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        with torch.no_grad():  # counted before this update took effect: the logits are the head's before it
            self.correct += (logits.argmax(1) == labels).sum()
            self.loss_sum += loss * labels.numel()
        self.seen += labels.numel()

    def take_window(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(correct, loss sum, images seen)`` since the last call (copies), then a fresh window."""
        out = self.correct.clone(), self.loss_sum.clone(), self.seen
        self.correct.zero_()
        self.loss_sum.zero_()
        self.seen = 0
        return out

    def state_dict(self) -> dict:
        return {"norm": self.norm.state_dict(), "head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.norm.load_state_dict(state["norm"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])

    def save(self, folder: str | Path, step: int) -> Path:
        """``folder/online_probe.pt`` (atomic), tagged with ``step``."""
        return torch_save(Path(folder) / PROBE_FILE, {"step": step, **self.state_dict()})

    def load(self, folder: str | Path) -> int | None:
        """Restore from ``folder/online_probe.pt``; the step it was saved at, or None when there is none."""
        path = Path(folder) / PROBE_FILE
        if not path.is_file():
            return None
        state = read_weights(path, map_location=self.device)[0]
        self.load_state_dict(state)
        return int(state["step"])


def build_online_probe(cfg: Config, dim: int, device) -> tuple[OnlineProbe | None, str | None]:
    """The probe ``train.online_probe`` asks for, and a line for the log when it cannot run (no labels)."""
    t = cfg.train
    if not t.online_probe:
        return None, None
    classes = count_classes(cfg)
    if classes < 2:
        return None, (f"fastjepa: train.online_probe: the data set has {classes} class(es), nothing to classify; "
                      "the online probe is off")
    return OnlineProbe(dim, classes, lr=t.online_probe_lr, every=t.online_probe_every, device=device), None


__all__ = ["OnlineProbe", "build_online_probe", "count_classes"]
