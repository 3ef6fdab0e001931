"""Typed run configuration: JSON file -> dotted ``key=value`` overrides -> validated pydantic sections.

Sections: ``model``, ``mask``, ``data``, ``optim``, ``train``, ``deepspeed``. An unknown key is an error
that names it and the closest valid key; a bad value is an error that names its key and the value. Keys
that start with ``_`` are comments. Everything is checked here, before anything is built.

A key is one line: ``name: type = Field(default, <range>, description="one short line")``. The range
(``gt``/``ge``/``le``, or a validator for what a range cannot say) and the description are the single
source of ``fastjepa train --help`` and of the README's configuration reference
(``scripts/config_reference.py``); ``tests/test_cli.py`` fails for a key without a description.
"""
from __future__ import annotations

import difflib
import json
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUndefined


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key or file."""


class _Section(BaseModel):
    # allow_inf_nan=False: optim.lr=NaN or 1e999 is an error, not a run that writes NaN weights
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _check_range(pair: tuple[float, float], low: float, high: float, low_open: bool = False):
    """``[min, max]`` with ``low <= min <= max <= high`` (``low < min`` when ``low_open``)."""
    a, b = pair
    if not ((low < a if low_open else low <= a) and a <= b <= high):
        raise ValueError(f"must be [min, max] with {low:g} {'<' if low_open else '<='} min <= max <= {high:g}")
    return pair


# name: (width, depth, heads, mlp_ratio) -- facebookresearch/ijepa src/models/vision_transformer.py
# (the same table as fastjepa.models.vit.PRESETS, which builds them; tests/test_config.py keeps the two equal)
ARCHS = {
    "tiny": (192, 12, 3, 4.0),
    "small": (384, 12, 6, 4.0),
    "base": (768, 12, 12, 4.0),
    "large": (1024, 24, 16, 4.0),
    "huge": (1280, 32, 16, 4.0),
    "giant": (1408, 40, 16, 48 / 11),
}


class ModelConfig(_Section):
    arch: Literal["tiny", "small", "base", "large", "huge", "giant"] = Field(
        "huge", description="width x depth x heads: tiny 192x12x3, small 384x12x6, base 768x12x12, "
                            "large 1024x24x16, huge 1280x32x16, giant 1408x40x16")
    embed_dim: int | None = Field(None, ge=4,
        description="encoder width (null: the arch's); a multiple of 4 and of the heads")
    depth: int | None = Field(None, ge=1, description="encoder blocks (null: the arch's)")
    num_heads: int | None = Field(None, ge=1, description="encoder attention heads (null: the arch's)")
    mlp_ratio: float | None = Field(None, gt=0, description="MLP hidden width / width (null: the arch's)")
    patch_size: int = Field(14, ge=1, description="patch side in pixels; model.img_size must be a multiple of it")
    img_size: int = Field(224, ge=1, description="image side in pixels: every data source delivers this size")
    in_chans: Literal[1, 3] = Field(3, description="image channels: 1 (grey) or 3 (RGB)")
    pred_depth: int = Field(12, ge=1, description="predictor blocks")
    pred_embed_dim: int = Field(384, ge=4, description="predictor width; a multiple of 4 and of the predictor's heads")
    pred_num_heads: int | None = Field(None, ge=1,
        description="predictor attention heads (null: the encoder's, as the official init_model)")
    attention_backend: Literal["auto", "sdpa", "triton"] = Field(
        "auto", description="triton: fused kernels for attention, gathers, target loss and EMA; sdpa: the PyTorch "
                            "references; auto: Triton on CUDA, references on CPU (equal-length batches go to SDPA)")
    activation_checkpointing: Literal["off", "reentrant", "non_reentrant"] = Field(
        "off", description="recompute each transformer block in the backward pass instead of keeping its "
                           "activations (ZeRO-3 uses reentrant)")

    # the fused block path (attention_backend triton, or auto on CUDA): fp32 is the official code's stream
    # under autocast (its fp32 position table promotes the sum); bf16 halves the stream's bytes
    residual_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="dtype of the residual stream on the fused block path (the reference path keeps its own)")

    def shape(self) -> tuple[int, int, int, float]:
        """``(width, depth, heads, mlp_ratio)`` after the arch's values fill in the nulls."""
        width, depth, heads, ratio = ARCHS[self.arch]
        pick = lambda value, preset: preset if value is None else value  # an explicit value always wins
        return pick(self.embed_dim, width), pick(self.depth, depth), pick(self.num_heads, heads), pick(self.mlp_ratio, ratio)

    @model_validator(mode="after")
    def _shapes(self):
        # a check of several keys says "<key>: <why>", and the error names that key (see _error_line)
        if self.img_size % self.patch_size:
            raise ValueError(f"model.img_size: {self.img_size} is not a multiple of model.patch_size {self.patch_size}")
        width, _, heads, _ = self.shape()
        pred_heads = heads if self.pred_num_heads is None else self.pred_num_heads
        # sin-cos 2-D position tables split the width in four (fastjepa.models.pos_embed)
        for key, dim, h, heads_key in (("embed_dim", width, heads, "num_heads"),
                                       ("pred_embed_dim", self.pred_embed_dim, pred_heads, "pred_num_heads")):
            if dim % 4:
                raise ValueError(f"model.{key}: {dim} is not a multiple of 4 (sin-cos position embeddings)")
            if dim % h:
                raise ValueError(f"model.{heads_key}: {h} heads do not divide model.{key} {dim}")
        return self


class MaskConfig(_Section):
    num_targets: int = Field(4, ge=1, description="target blocks per image")
    target_scale: tuple[float, float] = Field((0.15, 0.2),
        description="[min, max] area fraction of a target block, 0 < min <= max <= 1")
    target_aspect: tuple[float, float] = Field((0.75, 1.5),
        description="[min, max] aspect ratio of a target block, in [0.001, 1000]")
    context_scale: tuple[float, float] = Field((0.85, 1.0),
        description="[min, max] area fraction of the context block (minus the targets), 0 < min <= max <= 1")
    context_aspect: tuple[float, float] = Field((1.0, 1.0),
        description="[min, max] aspect ratio of the context block, in [0.001, 1000]")
    min_keep: int = Field(10, ge=1,
        description="fewest tokens in any mask; settings that cannot meet it are an error at start-up")
    allow_overlap: bool = Field(False, description="let the context overlap the targets")
    truncate: bool = Field(False,
        description="cut every mask to the batch minimum, like the official collator (parity runs)")

    @field_validator("target_scale", "context_scale")
    @classmethod
    def _scale(cls, v, info):
        return _check_range(v, 0.0, 1.0, low_open=True)

    @field_validator("target_aspect", "context_aspect")
    @classmethod
    def _aspect(cls, v, info):
        return _check_range(v, 1e-3, 1e3)


class DataConfig(_Section):
    dataset: Literal["folder", "fashion-mnist", "synthetic"] = Field(
        "folder",
            description="folder: class sub-folders of JPEG/PNG images; fashion-mnist: the *-ubyte.gz files; "
                         "synthetic: noise")
    root: str | None = Field(None, description="the image folder (folder) or the *-ubyte.gz folder (fashion-mnist)")
    loader: Literal["auto", "torch", "dali"] = Field(
        "auto", description="torch: DataLoader workers; dali: NVIDIA DALI decodes and crops; auto: DALI when "
                            "installed and the data is a folder")
    num_workers: int = Field(2, ge=0,
        description="decoding worker processes per rank (torch) or threads (dali); 0: in the main process")
    crop_scale: tuple[float, float] = Field((0.3, 1.0),
        description="[min, max] area fraction of the random resized crop, 0.001 <= min <= max <= 1")
    synthetic_size: int = Field(4096, ge=1, description="images in the synthetic data set")

    @field_validator("crop_scale")
    @classmethod
    def _crop(cls, v):
        return _check_range(v, 1e-3, 1.0)


class OptimConfig(_Section):
    lr: float = Field(1e-3, gt=0,
        description="peak learning rate, reached after the warmup; set for train.reference_global_batch")
    start_lr: float = Field(2e-4, ge=0, description="learning rate at step 0 (linear warmup to optim.lr)")
    final_lr: float = Field(1e-6, ge=0, description="learning rate at the end of the cosine decay")
    warmup_steps: int = Field(25_000, ge=0, description="optimizer steps of linear warmup")
    weight_decay: float = Field(0.04, ge=0,
        description="AdamW weight decay at step 0 (none on biases and 1-D parameters)")
    final_weight_decay: float = Field(0.4, ge=0, description="weight decay at the end (cosine schedule)")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="AdamW betas, each in [0, 1)")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    clip_grad: float | None = Field(None, ge=0, description="clip the gradient norm to this (null or 0: no clipping)")
    ema_momentum: tuple[float, float] = Field((0.996, 1.0),
        description="[start, end] target-encoder EMA momentum, linear over the schedule, 0 <= start <= end <= 1")

    @field_validator("ema_momentum")
    @classmethod
    def _ema(cls, v):
        return _check_range(v, 0.0, 1.0)


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
    max_steps: int = Field(187_500, ge=1, description="optimizer steps to run")
    # larger than max_steps: the first steps of a longer run's schedule (the official ipe_scale, 1.0 in its
    # configs; 1.25 is only init_opt's default argument), e.g. a short run stopping early on a longer schedule
    schedule_steps: int | None = Field(None, ge=1,
        description="steps the lr, weight-decay and EMA schedules span (null: train.max_steps)")
    batch_size: int = Field(128, ge=1, description="images per rank per micro-step")
    grad_accum_steps: int = Field(1, ge=1,
        description="micro-steps per optimizer step (global batch = ranks x batch_size x this)")
    # the official recipe: 16 GPUs x 128 images (facebookresearch/ijepa configs/in1k_vith14_ep300.yaml)
    reference_global_batch: int | None = Field(2048, ge=1,
        description="the global batch optim.lr was set for: start-up warns when the run's differs (null: no check)")
    log_every: int = Field(10, ge=1, description="steps between metrics lines")
    checkpoint_every: int = Field(1000, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept")
    seed: int = Field(0, ge=0, description="seed of the weights, data order, crops and masks")
    precision: Literal["fp32", "bf16"] = Field("bf16", description="bf16: autocast with fp32 master weights; fp32")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when visible")
    loss: Literal["smooth_l1", "l2"] = Field("smooth_l1", description="smooth_l1 (beta 1, the official loss) or l2")
    # the official src/train.py normalises the targets with F.layer_norm(h, (h.size(-1),)): torch's default eps
    # 1e-5 (the encoders' own LayerNorms use 1e-6)
    target_norm_eps: float = Field(1e-5, gt=0, description="eps of the layer norm (no affine) of the loss's targets")
    max_nonfinite_steps: int = Field(10, ge=1,
        description="this many skipped (non-finite) steps in a row stop the run with a checkpoint")
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
    online_probe_every: int = Field(1, ge=1, description="train the online probe every this many optimizer steps")
    online_probe_lr: float = Field(1e-2, gt=0, description="the online probe's AdamW learning rate (no weight decay)")
    progress: Literal["auto", "on", "off"] = Field("auto",
        description="a progress bar (auto: on a terminal) instead of one line per logged step")
    compile: bool = Field(False, description="torch.compile each transformer block (dynamic token counts)")


SizeOrAuto = Annotated[int, Field(ge=1)] | Literal["auto"]


class DeepSpeedConfig(_Section):
    enabled: Literal["auto", "on", "off"] = Field("auto", description="auto: on when started by the deepspeed launcher")
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="ZeRO stage")
    bf16: Literal["auto", "on", "off"] = Field(
        "auto", description="DeepSpeed's bf16 mode (bf16 weights, fp32 master weights in the optimizer); auto: "
                            "on for train.precision=bf16 on CUDA")
    overlap_comm: bool = Field(True, description="overlap the gradient reduction with the backward pass")
    # "auto" follows the model width D as DeepSpeed's Hugging Face integration does
    reduce_bucket_size: SizeOrAuto = Field("auto",
        description="elements per gradient-reduction bucket (auto: D^2 for width D)")
    allgather_bucket_size: SizeOrAuto = Field("auto", description="elements per all-gather bucket (auto: D^2)")
    stage3_prefetch_bucket_size: SizeOrAuto = Field("auto",
        description="ZeRO-3 parameters prefetched, in elements (auto: 0.9 D^2)")
    stage3_param_persistence_threshold: SizeOrAuto = Field("auto",
        description="ZeRO-3 keeps parameters below this many elements whole (auto: 10 D)")
    load_universal: bool = Field(False,
        description="resume from a universal checkpoint (python -m fastjepa.train.zero to-universal), e.g. on another "
                     "world size")


class Config(_Section):
    model: ModelConfig = ModelConfig()
    mask: MaskConfig = MaskConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


SECTIONS: dict[str, type[_Section]] = {name: field.annotation for name, field in Config.model_fields.items()}


# ---------------------------------------------------------------------------------------------------
# loading: files, overrides, errors that name the key
# ---------------------------------------------------------------------------------------------------
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


def _error_line(err: ValidationError) -> str:
    """The first problem of a validation error as ``config key 'optim.lr': <why> (got <value>)``.

    pydantic's location holds field names, tuple positions (ints) and, for a union, the tag of each
    branch that failed (``int``, ``literal['auto']``): the key is the field names, a position is shown
    as ``[i]``, and the messages of the branches are joined with "or"."""
    problems = err.errors()
    def key_of(problem) -> str:
        key, schema = "", Config
        for part in problem["loc"]:
            if isinstance(part, int):
                key += f"[{part}]"
            elif schema is not None and part in schema.model_fields:
                key += ("." if key else "") + part
                sub = schema.model_fields[part].annotation
                schema = sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None
        return key

    key = key_of(problems[0])
    same = [p for p in problems if key_of(p) == key]
    why = " or ".join(dict.fromkeys(p["msg"].removeprefix("Value error, ") for p in same))
    got = same[0].get("input")
    shown = f" (got {json.dumps(got, default=str)})"
    named = re.match(rf"({re.escape(key)}\.\w+): (.*)", why)
    if named:  # a model-level check (several keys) names the key it blames
        key, why = named.groups()
    if isinstance(got, dict) or got is PydanticUndefined:
        shown = ""
    return f"config key '{key}': {why}{shown}"


def build_config(raw: dict) -> Config:
    raw = _strip_comments(raw)
    _check_keys(raw, Config)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_error_line(err)) from None


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
        except (UnicodeDecodeError, OSError) as err:
            raise ConfigError(f"config file '{path}' cannot be read: {err}") from None
    return build_config(apply_overrides(raw, list(overrides)))


# ---------------------------------------------------------------------------------------------------
# the batch a run sees (the trainer logs these at start-up)
# ---------------------------------------------------------------------------------------------------
def global_batch(cfg: Config, world_size: int) -> int:
    """Images per optimizer step over all ranks."""
    return world_size * cfg.train.batch_size * cfg.train.grad_accum_steps


def batch_summary(cfg: Config, world_size: int, micro_steps_per_epoch: int) -> str:
    """The start-up line: ranks, per-rank batch, accumulation, global batch and optimizer steps per epoch.
    ``micro_steps_per_epoch``: the data stream's ``steps_per_epoch`` (micro-steps of one rank's shard)."""
    t = cfg.train
    steps = micro_steps_per_epoch / t.grad_accum_steps
    shown = f"{steps:.0f}" if steps == int(steps) else f"{steps:.2f}"
    return (f"fastjepa: batch: world size {world_size}, per-rank batch {t.batch_size}, accumulation "
            f"{t.grad_accum_steps}, global batch {global_batch(cfg, world_size)}, {shown} steps per epoch")


def global_batch_warning(cfg: Config, world_size: int) -> str | None:
    """A warning when the run's global batch is not ``train.reference_global_batch`` (the batch the
    learning rate was set for), naming the ``train.grad_accum_steps`` that restores it; None when equal."""
    t = cfg.train
    want, got = t.reference_global_batch, global_batch(cfg, world_size)
    if want is None or want == got:
        return None
    per_step = world_size * t.batch_size  # images per micro-step over all ranks
    head = (f"fastjepa: warning: global batch {got} ({world_size} ranks x {t.batch_size} x {t.grad_accum_steps} "
            f"accumulation) differs from the {want} optim.lr was set for (train.reference_global_batch)")
    if want % per_step == 0:
        return f"{head}; train.grad_accum_steps={want // per_step} restores it"
    near = max(1, round(want / per_step))
    return (f"{head}; no train.grad_accum_steps gives {want} with {world_size} ranks x {t.batch_size}: "
            f"train.grad_accum_steps={near} gives {near * per_step}, or change train.batch_size, or set optim.lr "
            f"for this batch and train.reference_global_batch={got}")


# ---------------------------------------------------------------------------------------------------
# the reference: every key with its type, range, default and description (help text and README)
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyDoc:
    section: str
    name: str
    type: str  # e.g. "int >= 1 or null", "{auto,sdpa,triton}", "[float, float]"
    default: str  # JSON, strings bare
    description: str

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"


def _bounds(metadata) -> str:
    """``> 0``, ``>= 1``, ``in [0, 1)`` from pydantic's annotated-types constraints."""
    low = high = None
    for m in metadata:
        if isinstance(m, annotated_types.Gt):
            low = f"> {m.gt}"
        elif isinstance(m, annotated_types.Ge):
            low = f">= {m.ge}"
        elif isinstance(m, annotated_types.Lt):
            high = ("<", m.lt)
        elif isinstance(m, annotated_types.Le):
            high = ("<=", m.le)
    if low and high:
        lo = low.split()
        return f"in {'(' if lo[0] == '>' else '['}{lo[1]}, {high[1]}{')' if high[0] == '<' else ']'}"
    return low or (f"{high[0]} {high[1]}" if high else "")


def _type_text(annotation, metadata=()) -> str:
    """A readable type: ``int >= 1 or null``, ``{auto,on,off}``, ``[float, float]``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_text(args[0], [*metadata, *args[1:]])
    if origin in (Union, types.UnionType):
        parts = [_type_text(a, metadata) for a in args if a is not type(None)]
        return " or ".join(parts + (["null"] if type(None) in args else []))
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin is tuple:
        return "[" + ", ".join(_type_text(a) for a in args) + "]"
    name = getattr(annotation, "__name__", str(annotation))
    bounds = _bounds([m for item in metadata for m in getattr(item, "metadata", [item])])
    return f"{name} {bounds}".strip()


def _default_text(value) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def config_reference() -> list[KeyDoc]:
    """Every config key, section by section, in declaration order."""
    docs = []
    for section, schema in SECTIONS.items():
        for name, field in schema.model_fields.items():
            docs.append(KeyDoc(section, name, _type_text(field.annotation, field.metadata),
                               _default_text(field.default), field.description or ""))
    return docs


def help_text(section: str, width: int = 96) -> str:
    """The keys of one section for ``fastjepa train --help``: ``key: type (default: x)``, then the
    description indented below it (argparse indents a group's text by two more)."""
    import textwrap

    lines = []
    for doc in config_reference():
        if doc.section == section:
            lines.append(f"{doc.key}: {doc.type} (default: {doc.default})")
            lines += textwrap.wrap(doc.description, width, initial_indent=" " * 4, subsequent_indent=" " * 4)
    return "\n".join(lines)


def markdown_table() -> str:
    """The README's configuration reference: one row per key."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    rows += [f"| `{doc.key}` | {cell(doc.type)} | `{cell(doc.default)}` | {cell(doc.description)} |"
             for doc in config_reference()]
    return "\n".join(rows)
