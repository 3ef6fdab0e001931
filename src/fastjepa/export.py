"""``fastjepa export SOURCE OUT [--format safetensors|timm]``: one encoder out of a run, to evaluate or share.

SOURCE is a training output directory, a DeepSpeed ZeRO-3 tag folder (``checkpoints/deepspeed/step_XXXXXXXX``:
its target shards are consolidated, as ``python -m fastjepa.train.zero export-target`` does), a
``step_*.pt`` checkpoint, a ``.safetensors`` encoder or an official I-JEPA ``.pth.tar``. A ZeRO-3 run
directory without ``target_encoder.safetensors`` (a run still going, or stopped early) exports the tag
DeepSpeed's ``latest`` names.

- ``--format safetensors`` (default): the encoder's state dict with the run's config in the metadata, so
  ``fastjepa.load_encoder(OUT)``, ``fastjepa probe`` and ``fastjepa knn`` read it alone.
- ``--format timm``: timm ``VisionTransformer`` weights (``fastjepa.io.timm``; the same as
  ``fastjepa convert --from fastjepa --to timm``).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from .config import Config, load_config
from .io.encoder import read_encoder
from .io.files import TARGET_FILE, CheckpointError, export_safetensors
from .io.timm import save_timm
from .io.weights import check_keys, encoder_from_state, inference_config
from .models import build_encoder
from .train.zero import SHARD_PATTERN, consolidate_target

TAG_STEP = re.compile(r"step_(\d+)")


def is_zero3_tag(path: Path) -> bool:
    """A DeepSpeed tag folder holding fastjepa's ZeRO-3 target shards."""
    return path.is_dir() and any(SHARD_PATTERN.fullmatch(p.name) for p in path.iterdir())


def latest_zero3_tag(run_dir: Path) -> Path | None:
    """The tag DeepSpeed's ``checkpoints/deepspeed/latest`` names in a ZeRO-3 run, or None."""
    latest = run_dir / "checkpoints" / "deepspeed" / "latest"
    if not latest.is_file():
        return None
    tag = latest.parent / latest.read_text().strip()
    return tag if is_zero3_tag(tag) else None


def _tag_config(tag: Path, config: str | None) -> Config:
    """The config of a tag's run: ``--config``, else the ``config.json`` of the run directory above it."""
    candidates = [Path(config)] if config else [p / "config.json" for p in list(tag.parents)[:3]]
    for path in candidates:
        if path.is_file():
            return load_config(path)
    if config:
        raise FileNotFoundError(f"config file '{config}' does not exist")
    raise CheckpointError(f"no config.json in the run folders above '{tag}': pass --config (the run's config "
                          "JSON) to say which architecture the shards hold")


def read_source(source: str | Path, weights: str = "target", config: str | None = None) -> tuple[Config, dict, dict]:
    """``(config, encoder state dict, metadata)`` from any SOURCE the command takes."""
    source = Path(source)
    tag = source if is_zero3_tag(source) else None
    if tag is None and source.is_dir() and not (source / TARGET_FILE).is_file():
        tag = latest_zero3_tag(source)
    if tag is None:
        cfg, state = read_encoder(source, weights, config)
        return cfg, state, {}
    if weights != "target":
        raise CheckpointError(f"'{tag}' is a ZeRO-3 tag: its context encoder lies in DeepSpeed's partitioned "
                              "optimizer files; convert the tag with `python -m fastjepa.train.zero to-universal` "
                              "first, or export --weights target")
    step = TAG_STEP.fullmatch(tag.name)
    return _tag_config(tag, config), consolidate_target(tag), {"step": step.group(1).lstrip("0") or "0"} if step else {}


def export(source, out, fmt: str = "safetensors", weights: str = "target", config: str | None = None) -> dict:
    """Write SOURCE's encoder to OUT; returns a summary for the command's JSON line."""
    out = Path(out)
    cfg, state, metadata = read_source(source, weights, config)
    what = f"the {weights} encoder of '{source}'"
    if fmt == "timm":
        kwargs = save_timm(encoder_from_state(cfg, state, what), out)
        return {"input": str(source), "output": str(out), "format": fmt, "timm_kwargs": kwargs}
    if out.suffix != ".safetensors":
        raise CheckpointError(f"--format safetensors writes a .safetensors OUT, got '{out}'")
    with torch.device("meta"):  # the keys and shapes of the architecture, without building its weights
        expected = build_encoder(inference_config(cfg).model).state_dict()
    check_keys(expected, state, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_safetensors(out, {k: v.contiguous() for k, v in state.items()},
                       metadata={**metadata, "config": json.dumps(cfg.to_dict()), "encoder": weights})
    return {"input": str(source), "output": str(out), "format": fmt, "tensors": len(state),
            "parameters": sum(v.numel() for v in state.values())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastjepa export", description=__doc__.splitlines()[0],
                                     epilog="SOURCE: a run directory, a ZeRO-3 tag folder, a step_*.pt, a "
                                            ".safetensors encoder or an official .pth.tar")
    parser.add_argument("source", help="where the encoder is")
    parser.add_argument("output", help="the file to write (.safetensors; for --format timm also .pth/.pt)")
    parser.add_argument("--format", choices=("safetensors", "timm"), default="safetensors",
                        help="safetensors: fastjepa's encoder, loadable by fastjepa.load_encoder; timm: weights for "
                             "a timm VisionTransformer")
    parser.add_argument("--weights", choices=("target", "context"), default="target",
                        help="the EMA target encoder (the one to evaluate) or the context encoder")
    parser.add_argument("--config", default=None,
                        help="the run's config JSON, for a bare .safetensors or a tag folder outside its run")
    args = parser.parse_args(argv)
    print(json.dumps(export(args.source, args.output, args.format, args.weights, args.config)))
    return 0
