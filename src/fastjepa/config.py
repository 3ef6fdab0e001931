"""Typed run configuration: JSON file -> dotted ``key=value`` overrides -> validated dataclasses.

Sections: ``model``, ``mask``, ``data``, ``optim``, ``train``, ``deepspeed``. An unknown key is an error
that names it and the closest valid key; a bad value is an error that names its key. Keys that start
with ``_`` are comments.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key or file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_range(name: str, pair: tuple[float, float], low: float, high: float) -> tuple[float, float]:
    a, b = pair
    if not (low <= a <= b <= high):
        raise ValueError(f"{name} must satisfy {low} <= min <= max <= {high}, got {list(pair)}")
    return pair


class ModelConfig(_Section):
    arch: Literal["tiny", "small", "base", "large", "huge", "giant"] = "huge"
    embed_dim: int | None = None  # None: the arch's width (tiny 192 ... giant 1408)
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    patch_size: int = 14
    img_size: int = 224
    in_chans: int = 3
    pred_depth: int = 12
    pred_embed_dim: int = 384
    pred_num_heads: int | None = None  # None: the encoder's head count (official init_model)
    attention_backend: Literal["auto", "sdpa", "triton"] = "auto"
    # recompute each transformer block in the backward pass instead of keeping its activations
    # (fastjepa.models.vit.run_blocks); ZeRO-3 needs "reentrant"
    activation_checkpointing: Literal["off", "reentrant", "non_reentrant"] = "off"

    @model_validator(mode="after")
    def _grid(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        return self


class MaskConfig(_Section):
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    context_aspect: tuple[float, float] = (1.0, 1.0)
    min_keep: int = 10
    allow_overlap: bool = False
    truncate: bool = False  # True: cut every mask to the batch minimum, like the official collator

    @field_validator("target_scale", "context_scale")
    @classmethod
    def _scale(cls, v, info):
        return _check_range(f"mask.{info.field_name}", v, 0.0, 1.0)

    @field_validator("target_aspect", "context_aspect")
    @classmethod
    def _aspect(cls, v, info):
        return _check_range(f"mask.{info.field_name}", v, 1e-3, 1e3)


class DataConfig(_Section):
    dataset: Literal["folder", "fashion-mnist", "synthetic"] = "folder"
    root: str | None = None  # folder: the tree; fashion-mnist: the .gz directory
    loader: Literal["auto", "torch", "dali"] = "auto"
    num_workers: int = 2
    crop_scale: tuple[float, float] = (0.3, 1.0)
    synthetic_size: int = 4096

    @field_validator("crop_scale")
    @classmethod
    def _crop(cls, v):
        return _check_range("data.crop_scale", v, 1e-3, 1.0)


class OptimConfig(_Section):
    lr: float = 1e-3
    start_lr: float = 2e-4
    final_lr: float = 1e-6
    warmup_steps: int = 25_000
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float | None = None
    ema_momentum: tuple[float, float] = (0.996, 1.0)

    @field_validator("ema_momentum")
    @classmethod
    def _ema(cls, v):
        return _check_range("optim.ema_momentum", v, 0.0, 1.0)


class WandbConfig(_Section):
    """``train.wandb``: a Weights & Biases run (``wandb.init`` arguments)."""

    project: str = Field(description="the W&B project")
    entity: str | None = Field(None, description="the W&B team or user (null: the login's default)")
    name: str | None = Field(None, description="the run's name (null: the output folder's name)")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="online, offline (written under OUTPUT/wandb, synced later with `wandb sync`) or "
        "disabled; null: WANDB_MODE or online")

    @model_validator(mode="before")
    @classmethod
    def _project_name(cls, value):
        return {"project": value} if isinstance(value, str) else value  # train.wandb=my-project


class TrainConfig(_Section):
    max_steps: int = 187_500
    # the step count the lr, weight-decay and EMA schedules span (None: max_steps). Larger than
    # max_steps runs the first steps of a longer run's schedule: the official recipe's ipe_scale 1.25
    # is schedule_steps = 1.25 x max_steps; a short test can stop early on the demo's own schedule.
    schedule_steps: int | None = None
    batch_size: int = 128  # per rank, per micro-step
    grad_accum_steps: int = 1
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "bf16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    loss: Literal["smooth_l1", "l2"] = "smooth_l1"
    max_nonfinite_steps: int = 10  # this many skipped steps in a row stop the run (with a checkpoint)
    tensorboard: bool | None = Field(
        None, description="TensorBoard event files in OUTPUT/tensorboard: null = on when the tensorboard package is "
        "installed (silently off otherwise), true = required (start-up error without it), false = off")
    wandb: WandbConfig | None = Field(
        None, description="Weights & Biases logging from rank 0: null = off, a project name, or "
        '{"project", "entity", "name", "mode"} (mode offline needs no network; WANDB_MODE also works)')
    online_probe: bool = Field(
        False, description="train a linear classifier on the detached, pooled and standardised target-encoder "
        "features beside the run (on the data set's labels); logs online_probe_top1, never touches the encoder's "
        "gradients")
    online_probe_every: int = Field(1, description="train the online probe every this many optimizer steps")
    online_probe_lr: float = Field(1e-2, description="the online probe's AdamW learning rate (no weight decay)")
    progress: Literal["auto", "on", "off"] = "auto"
    # torch.compile each transformer block (regional: one compiled graph shared by all blocks of a
    # width; dynamic token counts). Fuses LayerNorm, bias, GELU and residual adds around the kernels.
    compile: bool = False

    @model_validator(mode="after")
    def _positive(self):
        for key in ("max_steps", "batch_size", "grad_accum_steps", "log_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1")
        if self.online_probe_every < 1:
            raise ValueError("train.online_probe_every must be >= 1")
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise ValueError("train.schedule_steps must be >= 1 (or null for train.max_steps)")
        return self


SizeOrAuto = int | Literal["auto"]


class DeepSpeedConfig(_Section):
    enabled: Literal["auto", "on", "off"] = "auto"  # auto: on when started by the deepspeed launcher
    zero_stage: int = 0
    # DeepSpeed's bf16 mode (bf16 weights and gradients, fp32 master weights in the optimizer): auto = on
    # for train.precision=bf16 on CUDA; off = fp32 weights under torch autocast (the CPU path)
    bf16: Literal["auto", "on", "off"] = "auto"
    overlap_comm: bool = True
    # "auto": derived from the model width D (DeepSpeed's Hugging Face integration): reduce bucket D^2,
    # ZeRO-3 prefetch 0.9 D^2, parameters below 10 D elements stay whole on every rank under ZeRO-3
    reduce_bucket_size: SizeOrAuto = "auto"
    allgather_bucket_size: SizeOrAuto = "auto"
    stage3_prefetch_bucket_size: SizeOrAuto = "auto"
    stage3_param_persistence_threshold: SizeOrAuto = "auto"
    # resume from a universal checkpoint (python -m fastjepa.train.zero to-universal), e.g. on another world size
    load_universal: bool = False

    @field_validator("zero_stage")
    @classmethod
    def _stage(cls, v):
        if v not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0, 1, 2 or 3 (got {v})")
        return v


class Config(_Section):
    model: ModelConfig = ModelConfig()
    mask: MaskConfig = MaskConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def _check_keys(raw: dict, schema: type[BaseModel], prefix: str = "") -> None:
    """Raise ConfigError for the first key the schema does not know, naming the closest valid one."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a JSON object")
    fields = schema.model_fields
    for key, value in raw.items():
        if key not in fields:
            valid = [prefix + name for name in fields]
            close = difflib.get_close_matches(prefix + key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown config key '{prefix + key}'{hint}")
        sub = fields[key].annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            _check_keys(value, sub, prefix + key + ".")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string such as data.root=/data/in1k


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as JSON when they parse) to a raw dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        path, text = item.split("=", 1)
        parts = path.split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = _parse_value(text)
    return raw


def _strip_comments(raw):
    """Keys that start with '_' are comments (JSON has none) and are dropped at every level."""
    if isinstance(raw, dict):
        return {k: _strip_comments(v) for k, v in raw.items() if not k.startswith("_")}
    return raw


def build_config(raw: dict) -> Config:
    raw = _strip_comments(raw)
    _check_keys(raw, Config)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"config key '{key}': {first['msg']}") from None


PRESET_DIR = Path(__file__).resolve().parent / "configs"  # shipped with the package


def presets() -> list[str]:
    """Names of the packaged configs (``demo``, ``vith14``, ...)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def resolve_config_path(name: str | Path) -> Path:
    """A config file: ``name`` itself when it exists, else the packaged preset it names (``vith14``,
    ``vith14.json`` or ``configs/vith14.json``, so the repository's paths work from anywhere)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"config '{path}' is a folder, not a JSON file")
    if path.parent in (Path("."), Path("configs")) and path.suffix in ("", ".json"):
        preset = PRESET_DIR / f"{path.stem}.json"
        if preset.is_file():
            return preset
    raise ConfigError(f"config file '{path}' does not exist (packaged presets: {', '.join(presets())})")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a JSON config (a file, or a packaged preset by name; the defaults when path is None) and apply
    the overrides."""
    raw: dict = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file '{path}' is not valid JSON: {err}") from None
    return build_config(apply_overrides(raw, list(overrides)))
