"""``fastjepa convert --from {official,fastjepa} --to {fastjepa,timm} IN OUT``: I-JEPA weights between layouts.

- official -> fastjepa: a run directory that ``fastjepa train --resume`` continues (checkpoints/step_XXXXXXXX.pt
  with the official AdamW moments, target_encoder.safetensors, config.json) or, when OUT ends in
  ``.safetensors``, a single encoder. The layouts: ``fastjepa.io.official``.
- official or fastjepa -> timm: ``fastjepa.io.timm``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from ..config import Config, ConfigError, resolve_config_path
from ..models import build_models
from ..optim import build_optimizer
from .encoder import read_encoder
from .files import TARGET_FILE, CheckpointError, checkpoint_file, checkpoint_files, export_safetensors, read_weights
from .official import (
    SECTIONS,
    is_official,
    official_adam_moments,
    official_encoder_name,
    official_predictor_name,
    official_to_fastjepa,
    say,
    strip_ddp,
)
from .timm import save_timm
from .train_state import TrainState
from .weights import encoder_from_state, inference_config, load_weights


def optimizer_state(model: nn.Module, cfg: Config, moments: dict | None = None) -> dict:
    """The state dict of the AdamW the trainer builds for ``model``, with ``moments`` (our parameter
    name -> {step, exp_avg, exp_avg_sq}) filled in where given."""
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
    """A training output directory ``fastjepa train --resume`` continues from ``step``:
    checkpoints/step_XXXXXXXX.pt (a :class:`TrainState`), target_encoder.safetensors, config.json."""
    out_dir = Path(out_dir)
    if checkpoint_files(out_dir / "checkpoints") or (out_dir / TARGET_FILE).exists():
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
    state = TrainState(step=step, config=cfg.to_dict(), model=model.state_dict(), target=target.state_dict(),
                       optimizer=optimizer_state(model, cfg, moments), skipped_steps=torch.zeros(()),
                       nonfinite_run=torch.zeros(()), torch_rng=generator.get_state())
    written = [state.save(checkpoint_file(out_dir / "checkpoints", step))]
    written.append(export_safetensors(out_dir / TARGET_FILE, target.state_dict(),
                                      metadata={"step": str(step), "config": json.dumps(cfg.to_dict())}))
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return written + [out_dir / "config.json"]


# ---- command line ---------------------------------------------------------------------------------
def _read_official(path: Path) -> dict:
    contents, _ = read_weights(path)
    if not is_official(contents):
        raise CheckpointError(f"'{path}' is not an official I-JEPA checkpoint (keys encoder, predictor, "
                              f"target_encoder); it has: {', '.join(map(str, contents))}")
    return contents


def _base_config(path: str | None) -> dict | None:
    if path is None:
        return None
    path = resolve_config_path(path)  # a file, or a packaged preset's name (vith14)
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
                say(f"the optimizer starts fresh (AdamW moments zero): {why}")
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
