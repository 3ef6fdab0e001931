"""Run metrics: the logging window's sums (:class:`MetricsWindow`) and where records go
(:class:`MetricsLogger`: ``metrics.jsonl``, one object per logged step, TensorBoard when installed, a
progress bar on a terminal; only rank 0 writes)."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..flops import step_flops

try:  # optional
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # tensorboard not installed
    SummaryWriter = None


class MetricsWindow:
    """Sums over the steps since the last logged one. Device sums (loss of the finite steps, finite-step
    count) stay on the device until :meth:`record`, the one host sync of a logging step; host counts
    (images, tokens, FLOPs, time waited for data) come from the host-side masks."""

    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device
        self.loss = torch.zeros((), device=device)
        self.finite = torch.zeros((), device=device)  # steps in the window with a finite loss
        self._reset_host()

    def _reset_host(self) -> None:
        self.images, self.ctx_tokens, self.tgt_tokens, self.flops, self.data_wait = 0, 0, 0, 0.0, 0.0
        self.start = time.perf_counter()

    def add(self, out: dict, micro_batches, data_wait: float) -> None:
        self.loss += torch.where(out["skipped"], 0.0, out["loss"])  # a skipped step's NaN stays out
        self.finite += ~out["skipped"]
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
        totals = torch.tensor([0.0, 0.0, self.images, self.ctx_tokens, self.tgt_tokens, self.flops, skipped_images],
                              dtype=torch.float64)
        totals[0], totals[1] = self.loss.double().cpu(), self.finite.double().cpu()
        loss, finite, images, ctx, tgt, flops, skipped = backend.all_reduce_sum(totals).tolist()
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
        }
        self.loss.zero_()
        self.finite.zero_()
        self._reset_host()
        return record


class MetricsLogger:
    def __init__(self, output_dir: Path, total_steps: int, start_step: int, enabled: bool = True,
                 progress: str = "auto", tensorboard: bool = True):
        self.enabled = enabled
        self.file = open(Path(output_dir) / "metrics.jsonl", "a") if enabled else None
        show = {"on": True, "off": False}.get(progress, sys.stderr.isatty())
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not (enabled and show),
                        dynamic_ncols=True, unit="step")
        self.tb = None
        if enabled and tensorboard:
            if SummaryWriter is None:
                print("fastjepa: tensorboard not installed; logging to metrics.jsonl only", file=sys.stderr)
            else:
                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

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
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text) if not self.bar.disable else print(text, flush=True)

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
