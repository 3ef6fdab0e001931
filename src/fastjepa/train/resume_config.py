"""Resuming under another config: the checkpoint's config against the current one, key by key.

- keys that change the model or the masks (the weights or the task would not fit): an error naming them;
- keys that change the lr, weight-decay and EMA schedules: a warning that says what changes at the resume step;
- keys that only change logging, checkpoint cadence or speed: nothing;
- any other key (data, batch, precision, ...): a warning naming it, old -> new.
"""
from __future__ import annotations

from .. import schedules
from ..config import ConfigError, build_config

# the model's shape and the masks: a checkpoint of another model cannot be loaded, other masks are another task
MODEL_KEYS = ("model.arch", "model.embed_dim", "model.depth", "model.num_heads", "model.mlp_ratio",
              "model.patch_size", "model.img_size", "model.in_chans", "model.pred_depth", "model.pred_embed_dim",
              "model.pred_num_heads")
MODEL_PREFIXES = ("mask.",)
SCHEDULE_KEYS = ("train.max_steps", "train.schedule_steps", "optim.lr", "optim.start_lr", "optim.final_lr",
                 "optim.warmup_steps", "optim.weight_decay", "optim.final_weight_decay", "optim.ema_momentum")
# how a run logs, checkpoints and runs fast: free to change at any resume
SILENT_KEYS = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.tensorboard",
               "train.progress", "train.max_nonfinite_steps", "train.compile", "train.device", "data.num_workers",
               "data.loader", "model.attention_backend", "model.activation_checkpointing")
SILENT_PREFIXES = ("deepspeed.",)


class ResumeConfigError(ConfigError):
    """The current config changes the model or the masks of the checkpoint being resumed."""


def flatten(raw: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def differences(saved: dict, current: dict) -> dict[str, tuple]:
    """``{key: (saved value, current value)}`` for the keys whose values differ (lists and tuples alike)."""
    old, new = flatten(saved), flatten(current)
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
            if k in old and k in new and norm(old[k]) != norm(new[k])}


def check_resume_config(saved: dict, current: dict, step: int, where: str) -> list[str]:
    """Raise :class:`ResumeConfigError` when the model or masks differ; else the warnings to print."""
    diff = differences(saved, current)
    show = lambda keys: ", ".join(f"{k} {diff[k][0]!r} -> {diff[k][1]!r}" for k in keys)  # noqa: E731
    fatal = [k for k in diff if k in MODEL_KEYS or k.startswith(MODEL_PREFIXES)]
    if fatal:
        raise ResumeConfigError(
            f"the config differs from the checkpoint {where}: {show(fatal)}; these change the model or the masks, "
            "so the run cannot resume: resume with the checkpoint's values (they are in the run's config.json) "
            "or start a new run in another --output-dir")
    warnings = []
    schedule = [k for k in diff if k in SCHEDULE_KEYS]
    if schedule:
        warnings.append(f"resuming with other schedule settings ({show(schedule)}): "
                        f"{_schedule_change(saved, current, step)}")
    other = [k for k in diff if k not in SCHEDULE_KEYS and k not in SILENT_KEYS and not k.startswith(SILENT_PREFIXES)]
    if other:
        warnings.append(f"resuming with settings that differ from the checkpoint's: {show(other)}")
    return warnings


def _schedule_change(saved: dict, current: dict, step: int) -> str:
    """What the schedules give at ``step`` under the saved and the current config, in words."""
    try:
        old, new = build_config(saved), build_config(current)
    except ConfigError:  # a checkpoint of another fastjepa version: no numbers, the keys were named
        return "the lr, wd and EMA schedules change"
    spans = [c.train.schedule_steps or c.train.max_steps for c in (old, new)]
    parts = []
    for name, fn, fmt in (("lr", schedules.learning_rate, ".3g"), ("wd", schedules.weight_decay, ".3g"),
                          ("EMA momentum", schedules.ema_momentum, ".6g")):
        a, b = fn(step, old.optim, spans[0]), fn(step, new.optim, spans[1])
        parts.append(f"{name} {b:{fmt}} (was {a:{fmt}})" if a != b else f"{name} {b:{fmt}} (unchanged)")
    text = f"at step {step} the " + ", ".join(parts)
    if spans[0] != spans[1]:
        text += (f"; the schedules now span {spans[1]} steps instead of {spans[0]} "
                 f"(train.schedule_steps={spans[0]} keeps the old span)")
    return text


__all__ = ["ResumeConfigError", "check_resume_config", "differences"]
