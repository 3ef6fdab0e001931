"""The official I-JEPA checkpoint layout (facebookresearch/ijepa ``src/train.py``) read into fastjepa's.

An official checkpoint is a dict {encoder, predictor, target_encoder, opt, scaler, epoch, loss, batch_size,
world_size, lr} whose state dicts carry DDP's ``module.`` prefix. Encoder (``src/models/vision_transformer.py``):
patch_embed.proj.*, pos_embed [1, N, D] (the fixed sin-cos table, kept as a frozen parameter),
blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*, norm.*. Predictor: predictor_embed.*,
mask_token [1, 1, P], predictor_pos_embed [1, N, P], predictor_blocks.i.*, predictor_norm.*, predictor_proj.*.
fastjepa has the same blocks; patch_embed.* (a plain Conv2d); no position tables (non-persistent buffers
rebuilt from the config); the predictor's blocks.i.* and norm.*; mask_token [1, P].
"""
from __future__ import annotations

import copy
import math
import re
import sys

import torch
import torch.nn as nn

from ..config import Config, ConfigError, build_config
from ..models import PRESETS, build_encoder, build_predictor
from ..models.pos_embed import sincos_2d
from .files import CheckpointError
from .weights import check_keys, inference_config

DDP_PREFIX = "module."
# official section -> our name for it
SECTIONS = {"encoder": "encoder", "predictor": "predictor", "target_encoder": "target"}
SINCOS_ATOL = 1e-5  # both tables are float64 maths rounded to fp32: equal tables differ by an ulp at most


def say(message: str) -> None:
    print(f"fastjepa-convert: {message}", file=sys.stderr)


# ---- key names ----------------------------------------------------------------------------------
def official_encoder_name(name: str) -> str:
    """fastjepa encoder key -> official (and timm) key: the patch embedding is a ``PatchEmbed`` there."""
    return "patch_embed.proj." + name[len("patch_embed."):] if name.startswith("patch_embed.") else name


def official_predictor_name(name: str) -> str:
    """fastjepa predictor key -> official key: the blocks and the final norm carry a ``predictor_`` prefix."""
    return "predictor_" + name if name.startswith(("blocks.", "norm.")) else name


def strip_ddp(state: dict) -> dict:
    """Drop the ``module.`` prefix DistributedDataParallel puts on every key (official multi-GPU runs)."""
    return {k[len(DDP_PREFIX):] if k.startswith(DDP_PREFIX) else k: v for k, v in state.items()}


# ---- reading the official architecture off its tensors -------------------------------------------
def _need(state: dict, key: str, what: str) -> torch.Tensor:
    if key not in state or not isinstance(state[key], torch.Tensor):
        raise CheckpointError(f"{what}: missing key {key} (needed to read the architecture); "
                              f"it has: {', '.join(sorted(state)[:8])}{' ...' if len(state) > 8 else ''}")
    return state[key]


def _depth(state: dict, prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def mlp_ratio_for(width: int, hidden: int) -> float:
    """A ratio r with ``int(width * r) == hidden`` (how both ViTs size the MLP), nudged up past rounding."""
    ratio = hidden / width
    while int(width * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def official_architecture(encoder: dict, predictor: dict | None, what: str) -> dict:
    """``model.*`` config fields read off official tensors: everything but the head count."""
    patch = _need(encoder, "patch_embed.proj.weight", what)  # [D, C, p, p]
    if patch.ndim != 4 or patch.shape[2] != patch.shape[3]:
        raise CheckpointError(f"{what}: patch_embed.proj.weight has shape {list(patch.shape)}, expected [D, C, p, p]")
    width, chans, size = patch.shape[0], patch.shape[1], patch.shape[2]
    tokens = _need(encoder, "pos_embed", what).shape[-2]
    side = math.isqrt(tokens)
    if side * side != tokens:  # the official code builds its table for int(sqrt(N)) x int(sqrt(N))
        raise CheckpointError(f"{what}: pos_embed has {tokens} positions, not a square grid")
    hidden = _need(encoder, "blocks.0.mlp.fc1.weight", what).shape[0]
    fields = dict(embed_dim=width, depth=_depth(encoder, "blocks."), mlp_ratio=mlp_ratio_for(width, hidden),
                  patch_size=size, img_size=side * size, in_chans=chans)
    if predictor is not None:
        fields["pred_embed_dim"] = _need(predictor, "predictor_embed.weight", what).shape[0]
        fields["pred_depth"] = _depth(predictor, "predictor_blocks.")
    return fields


def matching_preset(width: int, depth: int, mlp_ratio: float) -> str | None:
    """The official ``vit_*`` constructor with this width, depth and MLP size, if any (heads follow)."""
    for name, (w, d, _heads, ratio) in PRESETS.items():
        if (w, d) == (width, depth) and int(w * ratio) == int(width * mlp_ratio):
            return name
    return None


def official_config(fields: dict, base: dict | None = None, num_heads: int | None = None,
                    what: str = "checkpoint") -> Config:
    """The run config: ``base`` (a raw config dict, e.g. a --config file) with its model section set to
    ``fields``. The head count comes from ``num_heads``, else an explicit ``model.num_heads`` in ``base``,
    else the preset with this width and depth (the official constructors fix heads per preset)."""
    raw = copy.deepcopy(base or {})
    model = raw.setdefault("model", {})
    for key, value in fields.items():
        if model.get(key) is not None and model[key] != value:
            say(f"model.{key}={model[key]} in the config, {value} in the checkpoint: using {value}")
        model[key] = value
    preset = matching_preset(fields["embed_dim"], fields["depth"], fields["mlp_ratio"])
    heads = num_heads or model.get("num_heads") or (PRESETS[preset][2] if preset else None)
    if heads is None:
        raise CheckpointError(
            f"{what}: the head count leaves no trace in the tensors and width {fields['embed_dim']} x depth "
            f"{fields['depth']} matches no preset ({', '.join(PRESETS)}): pass --num-heads (num_heads=) or set "
            "model.num_heads in --config")
    if preset:
        model["arch"] = preset
        model["mlp_ratio"] = PRESETS[preset][3]
    else:  # only a label (every width is explicit): the preset of this width, if one has it
        model["arch"] = next((n for n, (w, *_) in PRESETS.items() if w == fields["embed_dim"]),
                             model.get("arch", "huge"))
    model["num_heads"] = heads
    # official src/helper.py init_model: the predictor runs with the encoder's head count
    if model.get("pred_num_heads") not in (None, heads):
        say(f"model.pred_num_heads={model['pred_num_heads']} in the config; official predictors use the "
             f"encoder's {heads} heads: using {heads}")
    model["pred_num_heads"] = heads
    for key in ("embed_dim", "pred_embed_dim"):
        if key in model and model[key] % heads:
            raise CheckpointError(f"{what}: {key} {model[key]} is not divisible by {heads} heads (--num-heads)")
    try:
        return build_config(raw)
    except ConfigError as err:
        raise CheckpointError(f"{what}: {err}") from None


def check_sincos(table: torch.Tensor, grid: tuple[int, int], what: str) -> None:
    """The official ``[1, N, D]`` table must be our fixed 2-D sin-cos table: we rebuild it, never load it."""
    width = table.shape[-1]
    ours = sincos_2d(width, *grid).double()
    diff = (table.reshape(-1, width).double() - ours).abs().max().item()
    if not diff <= SINCOS_ATOL:  # `not <=` also catches NaN
        raise CheckpointError(
            f"{what} is not the fixed 2-D sin-cos table of a {grid[0]}x{grid[1]} grid at width {width} (largest "
            f"difference {diff:.3g}): fastjepa rebuilds that table and would not reproduce these weights' features")


def _official_template(module: nn.Module, rename, pos_key: str, num_patches: int) -> tuple[dict, dict]:
    """``(official name -> shape, official name -> fastjepa name)`` for one of our modules."""
    shapes, names = {}, {}
    for ours, tensor in module.state_dict().items():
        official = rename(ours)
        shapes[official], names[official] = tuple(tensor.shape), ours
    width = module.pos_embed.shape[-1]
    shapes[pos_key] = (1, num_patches, width)
    if "mask_token" in shapes:
        shapes["mask_token"] = (1, 1, width)  # [1, 1, P] there, [1, P] here
    return shapes, names


def _map_official(state: dict, module: nn.Module, rename, pos_key: str, grid, what: str) -> dict:
    """Check an official state dict's keys and shapes against ``module``, verify and drop its position
    table, return the tensors under our names and shapes."""
    shapes, names = _official_template(module, rename, pos_key, grid[0] * grid[1])
    check_keys(shapes, state, what)
    check_sincos(state[pos_key], grid, f"{what}: {pos_key}")
    expected = module.state_dict()
    return {names[k]: v.reshape(expected[names[k]].shape) for k, v in state.items() if k != pos_key}


def official_to_fastjepa(contents: dict, num_heads: int | None = None, base: dict | None = None,
                         sections=("target_encoder",), what: str = "checkpoint") -> tuple[Config, dict]:
    """An official checkpoint dict -> ``(config, {ours: state dict})`` for the requested ``sections``
    (official names; ours: encoder, predictor, target), tensors shared with ``contents``."""
    missing = [s for s in sections if s not in contents]
    if missing:
        raise CheckpointError(f"{what}: no {', '.join(missing)} entry (official checkpoints hold "
                              f"{', '.join(SECTIONS)}); it has: {', '.join(map(str, contents))}")
    for s in sections:
        if not isinstance(contents[s], dict):
            raise CheckpointError(f"{what}: its {s} entry is a {type(contents[s]).__name__}, not a state dict")
    states = {s: strip_ddp(contents[s]) for s in sections}
    encoder_like = states.get("target_encoder") or states.get("encoder")
    label = "target_encoder" if "target_encoder" in states else "encoder"
    fields = official_architecture(encoder_like, states.get("predictor"), f"{what} [{label}]")
    cfg = official_config(fields, base, num_heads, what)
    with torch.device("meta"):  # shapes and names only: no weights, no init
        encoder = build_encoder(inference_config(cfg).model)
        predictor = build_predictor(inference_config(cfg).model, encoder) if "predictor" in states else None
    out = {}
    for section, state in states.items():
        label = f"{what} [{section}]"
        if section == "predictor":
            out["predictor"] = _map_official(state, predictor, official_predictor_name, "predictor_pos_embed",
                                             encoder.grid, label)
        else:
            out[SECTIONS[section]] = _map_official(state, encoder, official_encoder_name, "pos_embed",
                                                   encoder.grid, label)
    return cfg, out


# ---- the official optimizer's moments -------------------------------------------------------------
def official_adam_moments(opt: dict, encoder: dict, predictor: dict) -> tuple[dict | None, str]:
    """The official AdamW state by official parameter name (``encoder.<key>``, ``predictor.<key>``), or
    ``(None, why not)``. ``encoder``/``predictor``: the stripped official state dicts, in saved order
    (= named_parameters order: the official modules have no buffers)."""
    if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list) or "state" not in opt:
        return None, "the checkpoint has no optimizer state"

    def decays(name, tensor):  # official src/helper.py init_opt, groups 1-2 vs 3-4
        return "bias" not in name and tensor.ndim != 1

    sections = (("encoder", encoder), ("predictor", predictor))
    groups = [[f"{s}.{n}" for n, t in state.items() if decays(n, t)] for s, state in sections]
    groups += [[f"{s}.{n}" for n, t in state.items() if not decays(n, t)] for s, state in sections]
    sizes = [len(g.get("params", ())) for g in opt["param_groups"]]
    if sizes != [len(g) for g in groups]:
        return None, (f"its parameter groups hold {sizes} parameters where the official init_opt layout of "
                      f"these weights has {[len(g) for g in groups]}")
    moments = {}
    for group, names in zip(opt["param_groups"], groups):
        for index, name in zip(group["params"], names):
            entry = opt["state"].get(index)
            if entry is None:  # never stepped: the frozen position tables
                continue
            section, key = name.split(".", 1)
            numel = dict(sections)[section][key].numel()
            if not isinstance(entry, dict) or not {"step", "exp_avg", "exp_avg_sq"} <= entry.keys() or \
                    entry["exp_avg"].numel() != numel or entry["exp_avg_sq"].numel() != numel:
                return None, f"the state of {name} does not fit its parameter"
            moments[name] = entry
    return moments, ""


def is_official(contents: dict) -> bool:
    """The facebookresearch/ijepa training checkpoint layout (src/train.py save_checkpoint)."""
    return "target_encoder" in contents or ("encoder" in contents and "predictor" in contents)
