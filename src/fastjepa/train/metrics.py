"""Run metrics: the logging window's sums (:class:`MetricsWindow`), the collapse measure (:func:`rankme`) and
where records go (:class:`MetricsLogger`: ``metrics.jsonl``, one object per logged step; TensorBoard when
installed; Weights & Biases when asked for; a progress bar on a terminal; only rank 0 writes)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import Config, ConfigError
from ..flops import step_flops

RANKME_EPS = 1e-7  # Garrido et al., ICML 2023 ("RankMe"), eq. 1: the epsilon added to each normalised singular value
WANDB_ID_FILE = "wandb_run_id"  # beside metrics.jsonl: a resumed run continues the same W&B run


def rankme(features: torch.Tensor, eps: float = RANKME_EPS) -> torch.Tensor:
    """RankMe (Garrido et al., ICML 2023), the effective rank of ``features`` [n, D]: with singular values
    sigma_k and p_k = sigma_k / sum(sigma) + eps, ``exp(-sum p_k log p_k)``. Between 1 (every row on one
    line) and min(n, D); NaN when a feature is not finite. A 0-d float32 tensor on the features' device: no
    host copy here (on CUDA the SVD itself waits for the device, so the step calls this on logging steps only)."""
    features = features.float()
    finite = torch.isfinite(features).all()  # a non-finite step's features: NaN out, decided on the device
    sigma = torch.linalg.svdvals(torch.where(finite, features, 0.0))  # (the SVD fails on NaN input)
    p = sigma / sigma.sum().clamp_min(torch.finfo(sigma.dtype).tiny) + eps  # all-zero features: RankMe 1
    return torch.where(finite, torch.exp(-(p * torch.log(p)).sum()), float("nan"))


def check_monitoring(cfg: Config) -> None:
    """Start-up check: a logger asked for by name must be importable (one line naming the key, exit 2)."""
    t = cfg.train
    if t.tensorboard is True and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("train.tensorboard=true but the tensorboard package is not installed: "
                          "pip install 'fastjepa[tensorboard]' (or leave train.tensorboard at null: on when installed)")
    if t.wandb is not None and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"train.wandb={t.wandb.project!r} but the wandb package is not installed: "
                          "pip install 'fastjepa[wandb]' (or set train.wandb=null)")


class MetricsWindow:
    """Sums over the steps since the last logged one. Device sums (loss of the finite steps, finite-step
    count) stay on the device until :meth:`record`, the one host sync of a logging step; host counts
    (images, tokens, FLOPs, time waited for data) come from the host-side masks."""

    def __init__(self, model, device: torch.device, probe=None):
        self.model, self.device, self.probe = model, device, probe  # probe: an OnlineProbe or None
        self.loss = torch.zeros((), device=device)
        self.finite = torch.zeros((), device=device)  # steps in the window with a finite loss
        self._reset_host()

    def _reset_host(self) -> None:
        self.steps, self.images, self.ctx_tokens, self.tgt_tokens, self.flops, self.data_wait = 0, 0, 0, 0, 0.0, 0.0
        self.start = time.perf_counter()

    def add(self, out: dict, micro_batches, data_wait: float) -> None:
        self.loss += torch.where(out["skipped"], 0.0, out["loss"])  # a skipped step's NaN stays out
        self.finite += ~out["skipped"]
        self.steps += 1
        self.data_wait += data_wait
        for b in micro_batches:
            self.images += b.masks.batch_size
            self.ctx_tokens += sum(b.masks.ctx_lens)
            self.tgt_tokens += sum(b.masks.tgt_lens)
            self.flops += step_flops(self.model, b.masks, b.masks.batch_size)

    def record(self, step: int, epoch: int, out: dict, backend, skipped_images: int, skipped_steps) -> dict:
        """The window's metrics record (summed over ranks through ``backend``), then a fresh window."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # logging interval only
        elapsed = time.perf_counter() - self.start
        # float64: token and FLOP counts stay exact; the device sums are copied to the host here (the sync)
        totals = torch.tensor([0.0, 0.0, self.images, self.ctx_tokens, self.tgt_tokens, self.flops, skipped_images,
                               0.0, 0.0, 0.0], dtype=torch.float64)
        totals[0], totals[1] = self.loss.double().cpu(), self.finite.double().cpu()
        if self.probe is not None:  # the probe's window: top-1 hits and loss summed on the device, images on the host
            correct, probe_loss, seen = self.probe.take_window()
            totals[7], totals[8], totals[9] = correct.double().cpu(), probe_loss.double().cpu(), seen
        loss, finite, images, ctx, tgt, flops, skipped, correct, probe_loss, seen = backend.all_reduce_sum(totals).tolist()
        record = {
            "step": step,
            "epoch": epoch,
            "loss": loss / finite if finite else None,  # mean over every rank's finite steps
            "lr": out["lr"], "wd": out["wd"], "momentum": out["momentum"],
            "grad_norm": float(out["grad_norm"]),
            "images_per_s": images / elapsed,
            "tflops": flops / elapsed / 1e12,
            "data_wait_s": self.data_wait,
            "context_tokens": ctx / images,
            "target_tokens": tgt / images,
            "target_feature_std": float(out["target_feature_std"]),
            "pred_feature_std": float(out["pred_feature_std"]),
            "skipped_images": int(skipped),
            "skipped_steps": int(skipped_steps),
            "window_steps": self.steps,  # the steps averaged (fewer in the first window after a resume)
        }
        if "target_rankme" in out:
            record["target_rankme"] = float(out["target_rankme"])
        if self.probe is not None:  # None for a window without a probe step (train.online_probe_every)
            record["online_probe_top1"] = correct / seen if seen else None
            record["online_probe_loss"] = probe_loss / seen if seen else None
        self.loss.zero_()
        self.finite.zero_()
        self._reset_host()
        return record


class MetricsLogger:
    """Where the records go (rank 0 only: ``enabled``). ``tensorboard``: True, False, or None (on when the
    package is installed, silently off otherwise). ``wandb``: a ``WandbConfig`` or None; ``config`` (the
    run's resolved config) is logged with it. :func:`check_monitoring` has run at start-up."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int, enabled: bool = True,
                 progress: str = "auto", tensorboard: bool | None = None, wandb=None, config: dict | None = None):
        self.enabled = enabled
        output_dir = Path(output_dir)
        self.file = open(output_dir / "metrics.jsonl", "a") if enabled else None
        show = {"on": True, "off": False}.get(progress, sys.stderr.isatty())
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not (enabled and show),
                        dynamic_ncols=True, unit="step")
        self.tb = None
        if enabled and tensorboard is not False and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter  # optional: imported only when it writes

            # after a resume, events of the steps that come again are dropped (purge_step), as metrics.jsonl is cut
            self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.wandb = start_wandb(wandb, output_dir, config) if enabled and wandb is not None else None

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        # NaN/Infinity are not JSON (jq, JavaScript, strict parsers reject the line): write null instead
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.file.write(json.dumps(clean, allow_nan=False) + "\n")
        self.file.flush()
        loss = clean.get("loss")
        self.bar.set_postfix(loss="skipped" if loss is None else f"{loss:.4f}", ips=f"{record['images_per_s']:.0f}",
                             refresh=False)
        if self.bar.disable:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                  flush=True)
        scalars = {k: v for k, v in clean.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text) if not self.bar.disable else print(text, flush=True)

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(settings, output_dir: Path, config: dict | None):
    """A W&B run for ``train.wandb`` (``settings``: project, entity, name, mode) writing under
    ``output_dir/wandb``; the run id is kept in ``output_dir/wandb_run_id`` so ``--resume`` continues it."""
    import wandb  # optional: imported only when asked for (check_monitoring made sure it is there)

    id_file = output_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None  # None: W&B makes one
    run = wandb.init(project=settings.project, entity=settings.entity, name=settings.name or output_dir.name,
                     mode=settings.mode, dir=str(output_dir), config=config, id=run_id, resume="allow")
    id_file.write_text(run.id + "\n")
    return run
