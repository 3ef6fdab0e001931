"""Run logging: ``metrics.jsonl`` (one object per logged step), TensorBoard when installed, and a
progress bar on a terminal. Only rank 0 writes."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

try:  # optional
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # tensorboard not installed
    SummaryWriter = None


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
