"""Convert I-JEPA weights between layouts:
``python -m fastjepa.convert --from {official,fastjepa} --to {fastjepa,timm} IN OUT`` (``fastjepa-convert``).

Layouts, by key name (``i`` a block index):

official  facebookresearch/ijepa ``src/train.py`` checkpoints: a dict {encoder, predictor, target_encoder, opt,
          scaler, epoch, loss, batch_size, world_size, lr} whose state dicts carry DDP's ``module.`` prefix.
          Encoder (``src/models/vision_transformer.py``): patch_embed.proj.*, pos_embed [1, N, D] (the fixed
          sin-cos table, kept as a frozen parameter), blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*,
          norm.*. Predictor: predictor_embed.*, mask_token [1, 1, P], predictor_pos_embed [1, N, P],
          predictor_blocks.i.*, predictor_norm.*, predictor_proj.*.
fastjepa  the same blocks; patch_embed.* (a plain Conv2d); no position tables (non-persistent buffers rebuilt
          from the config); the predictor's blocks.i.* and norm.*; mask_token [1, P].
timm      ``timm.models.vision_transformer.VisionTransformer(class_token=False, global_pool="avg", fc_norm=False)``:
          the official encoder's names, pos_embed [1, N, D] holding the same fixed sin-cos table.

official -> fastjepa writes a run directory that ``fastjepa-train --resume`` continues (checkpoints/step_XXXXXXXX.pt,
target_encoder.safetensors, config.json) or, when OUT ends in ``.safetensors``, a single encoder.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn

from .config import Config, ConfigError, build_config
from .encoder_io import (
    TARGET_FILE,
    CheckpointError,
    check_keys,
    encoder_from_state,
    inference_config,
    is_official,
    load_encoder,
    load_weights,
    read_encoder,
    read_file,
)
from .models import PRESETS, build_encoder, build_predictor
from .models.pos_embed import sincos_2d

DDP_PREFIX = "module."
# official section -> our name for it
SECTIONS = {"encoder": "encoder", "predictor": "predictor", "target_encoder": "target"}
SINCOS_ATOL = 1e-5  # both tables are float64 maths rounded to fp32: equal tables differ by an ulp at most


def _say(message: str) -> None:
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


def _mlp_ratio(width: int, hidden: int) -> float:
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
    fields = dict(embed_dim=width, depth=_depth(encoder, "blocks."), mlp_ratio=_mlp_ratio(width, hidden),
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
            _say(f"model.{key}={model[key]} in the config, {value} in the checkpoint: using {value}")
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
        _say(f"model.pred_num_heads={model['pred_num_heads']} in the config; official predictors use the "
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


def optimizer_state(model: nn.Module, cfg: Config, moments: dict | None = None) -> dict:
    """The state dict of the AdamW the trainer builds for ``model``, with ``moments`` (our parameter
    name -> {step, exp_avg, exp_avg_sq}) filled in where given."""
    from .optim import build_optimizer

    optimizer = build_optimizer(model, cfg.optim)
    if moments:
        names = {id(p): n for n, p in model.named_parameters()}
        state, index = {}, 0
        for group in optimizer.param_groups:  # state_dict numbers parameters in group order, from 0
            for p in group["params"]:
                entry = moments.get(names[id(p)])
                if entry is not None:
                    state[index] = {"step": torch.tensor(float(entry["step"])),
                                    "exp_avg": entry["exp_avg"].reshape(p.shape).float(),
                                    "exp_avg_sq": entry["exp_avg_sq"].reshape(p.shape).float()}
                index += 1
        # load and read back: load_state_dict casts the steps the way fused AdamW keeps them
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return optimizer.state_dict()


# ---- writing a fastjepa run ---------------------------------------------------------------------
def write_run(out_dir: Path, cfg: Config, states: dict, step: int = 0, moments: dict | None = None) -> list[Path]:
    """A training output directory ``Trainer(cfg, out_dir, resume=True)`` continues from ``step``:
    checkpoints/step_XXXXXXXX.pt (trainer.state_dict layout), target_encoder.safetensors, config.json."""
    from .checkpoint import checkpoint_path, export_safetensors, list_checkpoints, save_checkpoint
    from .trainer import build_models

    out_dir = Path(out_dir)
    if list_checkpoints(out_dir / "checkpoints") or (out_dir / TARGET_FILE).exists():
        raise CheckpointError(f"'{out_dir}' already holds a run (checkpoints or {TARGET_FILE}); pick a new OUT")
    model, target = build_models(inference_config(cfg))
    load_weights(model.encoder, states["encoder"], "encoder")
    load_weights(model.predictor, states["predictor"], "predictor")
    load_weights(target, states["target"], "target encoder")
    if moments:  # official names -> ours (the position tables have no moments: never stepped)
        rename = {f"encoder.{official_encoder_name(k)}": f"encoder.{k}" for k in model.encoder.state_dict()}
        rename.update({f"predictor.{official_predictor_name(k)}": f"predictor.{k}" for k in model.predictor.state_dict()})
        moments = {rename[n]: e for n, e in moments.items() if n in rename}
    generator = torch.Generator().manual_seed(cfg.train.seed)
    state = {  # the keys Trainer._resume reads (single process, no DeepSpeed)
        "step": step,
        "model": model.state_dict(),
        "target": target.state_dict(),
        "optimizer": optimizer_state(model, cfg, moments),
        "skipped_images": 0,
        "skipped_steps": torch.zeros(()),
        "nonfinite_run": torch.zeros(()),
        "torch_rng": generator.get_state(),
        "data": None,
        "config": cfg.to_dict(),
    }
    save_checkpoint(out_dir / "checkpoints", step, state, keep=cfg.train.keep_checkpoints)
    export_safetensors(out_dir / TARGET_FILE, target.state_dict(),
                       metadata={"step": str(step), "config": json.dumps(cfg.to_dict())})
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return [checkpoint_path(out_dir / "checkpoints", step), out_dir / TARGET_FILE, out_dir / "config.json"]


# ---- timm ------------------------------------------------------------------------------------------
def timm_kwargs(encoder: nn.Module) -> dict:
    """Arguments of ``timm.models.vision_transformer.VisionTransformer`` that rebuild ``encoder``:
    no class token, mean over tokens, the final LayerNorm before the pooling (fc_norm=False; timm's
    default for avg pooling normalises after it), eps 1e-6 (timm's LayerNorm default, as ours)."""
    hidden = encoder.blocks[0].mlp.fc1.out_features
    return dict(img_size=encoder.grid[0] * encoder.patch_size, patch_size=encoder.patch_size,
                in_chans=encoder.in_chans, num_classes=0, global_pool="avg", embed_dim=encoder.embed_dim,
                depth=len(encoder.blocks), num_heads=encoder.num_heads,
                mlp_ratio=_mlp_ratio(encoder.embed_dim, hidden), qkv_bias=True, class_token=False,
                no_embed_class=True, fc_norm=False)


def timm_state_dict(encoder: nn.Module) -> dict:
    """``encoder``'s weights under timm's names, with the fixed sin-cos table as ``pos_embed [1, N, D]``."""
    state = {"pos_embed": sincos_2d(encoder.embed_dim, *encoder.grid)[None]}
    state.update({official_encoder_name(k): v.detach().cpu() for k, v in encoder.state_dict().items()})
    return state


def timm_model(source, num_classes: int = 0, **overrides) -> nn.Module:
    """A timm ``VisionTransformer`` holding ``source``'s weights (an encoder module, or any path
    ``load_encoder`` takes), in eval mode. ``forward_head(forward_features(x), pre_logits=True)`` is our
    feature ``encoder(x).mean(1)``. The position table stays fixed (``requires_grad`` off, as in I-JEPA);
    with ``num_classes`` > 0 the new head keeps timm's init. ``overrides``: more timm arguments, e.g.
    ``drop_path_rate`` for fine-tuning."""
    from timm.models.vision_transformer import VisionTransformer

    encoder = source if isinstance(source, nn.Module) else load_encoder(source)
    model = VisionTransformer(**{**timm_kwargs(encoder), "num_classes": num_classes, **overrides})
    missing, unexpected = model.load_state_dict(timm_state_dict(encoder), strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise CheckpointError(f"timm VisionTransformer({overrides}) does not fit the encoder: missing keys "
                              f"{missing}, unexpected keys {unexpected}")
    model.pos_embed.requires_grad_(False)
    return model.eval()


def save_timm(encoder: nn.Module, out: Path) -> dict:
    """Write the timm state dict (``.safetensors`` with the timm arguments in its metadata, else
    ``torch.save``); returns the timm arguments."""
    from .checkpoint import export_safetensors

    kwargs, state = timm_kwargs(encoder), timm_state_dict(encoder)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        export_safetensors(out, state, metadata={"format": "pt", "timm_kwargs": json.dumps(kwargs)})
    else:
        torch.save(state, out)
    return kwargs


# ---- command line ---------------------------------------------------------------------------------
def _read_official(path: Path) -> dict:
    contents, _ = read_file(path)
    if not is_official(contents):
        raise CheckpointError(f"'{path}' is not an official I-JEPA checkpoint (keys encoder, predictor, "
                              f"target_encoder); it has: {', '.join(map(str, contents))}")
    return contents


def _base_config(path: str | None) -> dict | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file '{path}' is not valid JSON: {err}") from None


def convert(args) -> dict:
    src, out = Path(args.input), Path(args.output)
    section = "target_encoder" if args.weights == "target" else "encoder"
    summary = {"from": args.src, "to": args.dst, "input": str(src), "output": str(out)}
    if args.src == "official":
        contents = _read_official(src)
        full_run = args.dst == "fastjepa" and out.suffix != ".safetensors"
        sections = tuple(SECTIONS) if full_run else (section,)
        cfg, states = official_to_fastjepa(contents, args.num_heads, _base_config(args.config), sections, f"'{src}'")
        summary["model"] = cfg.model.model_dump(mode="json")
        if full_run:
            moments, why = None, "--fresh-optimizer"
            if not args.fresh_optimizer:
                moments, why = official_adam_moments(contents.get("opt"), strip_ddp(contents["encoder"]),
                                                     strip_ddp(contents["predictor"]))
            if moments is None:
                _say(f"the optimizer starts fresh (AdamW moments zero): {why}")
            summary["optimizer"] = "official AdamW moments" if moments else "fresh AdamW"
            summary["step"] = args.step
            summary["written"] = [str(p) for p in write_run(out, cfg, states, args.step, moments)]
            return summary
        encoder = encoder_from_state(cfg, states[SECTIONS[section]], f"'{src}' [{section}]")
    else:
        cfg, state = read_encoder(src, args.weights, args.config)
        encoder = encoder_from_state(cfg, state, f"encoder weights in '{src}'")
        summary["model"] = cfg.model.model_dump(mode="json")
    if args.dst == "timm":
        summary["timm_kwargs"] = save_timm(encoder, out)
    else:  # one encoder as safetensors, loadable by load_encoder
        from .checkpoint import export_safetensors

        if out.suffix != ".safetensors":
            raise CheckpointError(f"--to fastjepa writes one encoder to a .safetensors OUT, got '{out}'")
        export_safetensors(out, encoder.state_dict(), metadata={
            "step": str(args.step), "config": json.dumps(cfg.to_dict()), "encoder": args.weights})
    summary["written"] = [str(out)]
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastjepa-convert", description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="src", choices=("official", "fastjepa"), required=True)
    parser.add_argument("--to", dest="dst", choices=("fastjepa", "timm"), required=True)
    parser.add_argument("input", help="official: a .pth.tar; fastjepa: a run directory, .safetensors or step_*.pt")
    parser.add_argument("output", help="a directory (official -> fastjepa: a resumable run) or a weights file "
                                       "(.safetensors; .pth/.pt for timm)")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="official: attention heads, when width and depth match no preset")
    parser.add_argument("--config", default=None,
                        help="official: the fastjepa config of the run to write (data, optim, train; the model "
                             "section is read off the tensors); fastjepa: the config of a bare .safetensors")
    parser.add_argument("--step", type=int, default=0,
                        help="official -> fastjepa: the step the schedules resume at (official epoch x iterations "
                             "per epoch; 0 restarts warm-up)")
    parser.add_argument("--weights", choices=("target", "context"), default="target",
                        help="which encoder a single-encoder output holds")
    parser.add_argument("--fresh-optimizer", action="store_true",
                        help="official -> fastjepa: do not carry over the official AdamW moments")
    args = parser.parse_args(argv)
    if args.src == "fastjepa" and args.dst == "fastjepa":
        print("fastjepa-convert: error: --from fastjepa --to fastjepa has nothing to convert", file=sys.stderr)
        return 2
    try:
        summary = convert(args)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as err:
        print(f"fastjepa-convert: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
