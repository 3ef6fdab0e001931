"""``TrainState``: the one schema of a training checkpoint, written and read by the trainer and by the
official-checkpoint converter.

On disk a single-process checkpoint is ``checkpoints/step_XXXXXXXX.pt``, a ``torch.save`` of
:meth:`TrainState.to_dict` (a dict of tensors and plain values, read back with ``weights_only=True``). Under
DeepSpeed the engine writes the model and optimizer partitions itself and the rest of the state rides in
its client state as ``{"fastjepa": to_dict()}`` (``model`` and ``optimizer`` left out); under ZeRO-3 the
target encoder is in per-rank shard files (``fastjepa.train.zero``), so ``target`` is left out too.

Schema 1 (every checkpoint written before the ``schema`` key existed) has the same keys; it loads as is.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import CheckpointError, read_weights, torch_save

SCHEMA = 2
REQUIRED = ("step", "config")


@dataclass
class TrainState:
    """Everything a run needs to continue exactly.

    step: optimizer steps done. model: the online model's state dict (context encoder + predictor, keys
    ``encoder.*`` / ``predictor.*``). target: the target encoder's fp32 state dict. optimizer: AdamW's
    state dict. skipped_images: unreadable images skipped so far, summed over ranks. skipped_steps,
    nonfinite_run: 0-d tensors (steps skipped in all, and in a row at the end). torch_rng: the CPU RNG
    state. data: every rank's data-loader state, in rank order (None: nothing to restore, the loader
    resumes from the step alone). config: the resolved run config (``Config.to_dict()``).
    """

    step: int
    config: dict
    model: dict | None = None
    target: dict | None = None
    optimizer: dict | None = None
    skipped_images: int = 0
    skipped_steps: Any = 0
    nonfinite_run: Any = 0
    torch_rng: Any = None
    data: list | None = None

    # ---- dict form ---------------------------------------------------------------------------------
    def to_dict(self, *, weights: bool = True) -> dict:
        """The on-disk dict. ``weights=False`` leaves out ``model`` and ``optimizer`` (DeepSpeed's client
        state: the engine saves those); a ``target`` of None is left out (ZeRO-3 shard files)."""
        out = {"schema": SCHEMA, "step": int(self.step)}
        if weights:
            out["model"], out["optimizer"] = self.model, self.optimizer
        if self.target is not None:
            out["target"] = self.target
        out.update(skipped_images=int(self.skipped_images), skipped_steps=self.skipped_steps,
                   nonfinite_run=self.nonfinite_run, torch_rng=self.torch_rng, data=self.data, config=self.config)
        return out

    @classmethod
    def from_dict(cls, raw: dict, where: str = "checkpoint", need: tuple[str, ...] = ()) -> TrainState:
        """Read the on-disk dict (any schema so far); ``need``: keys this caller cannot do without
        (e.g. ``model``, ``optimizer``, ``target``). A missing key is a :class:`CheckpointError` naming it."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where} holds a {type(raw).__name__}, not a fastjepa training state")
        missing = [k for k in REQUIRED + tuple(need) if raw.get(k) is None]
        if missing:
            found = ", ".join(sorted(map(str, raw))[:10]) or "nothing"
            raise CheckpointError(f"{where} is not a complete fastjepa training state: missing {', '.join(missing)} "
                                  f"(it has: {found})")
        schema = raw.get("schema", 1)
        if not isinstance(schema, int) or schema > SCHEMA:
            raise CheckpointError(f"{where} was written by a newer fastjepa (checkpoint schema {schema}; this "
                                  f"version reads up to {SCHEMA}): upgrade fastjepa to resume it")
        return cls(step=int(raw["step"]), config=raw["config"], model=raw.get("model"), target=raw.get("target"),
                   optimizer=raw.get("optimizer"), skipped_images=int(raw.get("skipped_images") or 0),
                   skipped_steps=raw.get("skipped_steps", 0), nonfinite_run=raw.get("nonfinite_run", 0),
                   torch_rng=raw.get("torch_rng"), data=raw.get("data"))

    # ---- files -------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Atomically write the whole state as one ``.pt`` file."""
        return torch_save(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, map_location="cpu", need: tuple[str, ...] = ("model", "optimizer")) -> TrainState:
        contents, _ = read_weights(path, map_location=map_location)
        return cls.from_dict(contents, f"checkpoint '{path}'", need=need)


__all__ = ["SCHEMA", "TrainState"]
