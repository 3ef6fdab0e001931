"""DeepSpeed ZeRO for I-JEPA: the engine configs, and the ZeRO-3 target encoder's shards.

Under ZeRO-3 the target encoder is partitioned exactly like the context encoder (a second DeepSpeed
engine with no optimizer, fp32): each parameter is split into ``world`` equal slices of
``ceil(numel / world)`` elements (the last one zero-padded), and rank ``r`` holds slice ``r`` in
``param.ds_tensor``. The context encoder's fp32 master slice of the same parameter (in the optimizer's
flat fp32 partition) covers the same elements, so the EMA is one fused, shard-local kernel over the
rank's slices, with no collective. DeepSpeed's ``GatheredParameters`` is never used for the EMA (a
modification made inside it to a gathered copy is discarded on exit).

Checkpoints: every rank writes its target slices to ``<tag>/`` as
``fastjepa_target_rank{r:05d}_of_{world:05d}.safetensors`` (with each parameter's shape in the
metadata), before DeepSpeed writes ``latest``; loading reassembles the slices of any earlier world size,
so a run can resume on another number of ranks. ``consolidate_target`` rebuilds the whole fp32 target
from a tag folder offline.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..io.files import export_safetensors

SHARD_PATTERN = re.compile(r"fastjepa_target_rank(\d{5})_of_(\d{5})\.safetensors")


def shard_name(rank: int, world: int) -> str:
    return f"fastjepa_target_rank{rank:05d}_of_{world:05d}.safetensors"


# ---------------------------------------------------------------------------------------------------
# engine configs
# ---------------------------------------------------------------------------------------------------
def use_bf16(cfg, device_type: str) -> bool:
    """DeepSpeed's bf16 mode: ``deepspeed.bf16`` on, or auto with bf16 precision on CUDA."""
    mode = cfg.deepspeed.bf16
    return mode == "on" or (mode == "auto" and cfg.train.precision == "bf16" and device_type == "cuda")


def _size(value, auto: float) -> int:
    return int(auto) if value == "auto" else int(value)


def zero_section(cfg, width: int) -> dict:
    """``zero_optimization`` for the online model; sizes from the width where set to ``auto``."""
    ds = cfg.deepspeed
    section = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": _size(ds.reduce_bucket_size, width * width),
        "allgather_bucket_size": _size(ds.allgather_bucket_size, width * width),
    }
    if ds.zero_stage == 3:
        section.update(
            stage3_prefetch_bucket_size=_size(ds.stage3_prefetch_bucket_size, 0.9 * width * width),
            stage3_param_persistence_threshold=_size(ds.stage3_param_persistence_threshold, 10 * width),
        )
    return section


def engine_config(cfg, width: int, device_type: str) -> dict:
    """The DeepSpeed config of the online model (context encoder + predictor) from ours."""
    t = cfg.train
    config = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": cfg.optim.clip_grad or 0.0,  # explicit: DeepSpeed >= 0.19.3 defaults to 1.0
        "zero_optimization": zero_section(cfg, width),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if use_bf16(cfg, device_type):
        config["bf16"] = {"enabled": True}
    return config


def target_engine_config(cfg, width: int) -> dict:
    """ZeRO-3 for the target encoder: fp32 slices, no optimizer. Nothing stays whole on a rank
    (persistence threshold 0): a persistent parameter would keep a full copy that the shard-local EMA
    never updates."""
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": _size(cfg.deepspeed.stage3_prefetch_bucket_size, 0.9 * width * width),
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


# ---------------------------------------------------------------------------------------------------
# EMA views
# ---------------------------------------------------------------------------------------------------
def ema_shards(target: torch.nn.Module, encoder: torch.nn.Module):
    """(target slices, online fp32 master slices): this rank's matching 1-D views, parameter by
    parameter. Both stay valid for the run (the optimizer updates its flat fp32 buffer in place)."""
    from deepspeed.utils import safe_get_local_fp32_param

    targets, online = [], []
    for (name, t), (_, o) in zip(target.named_parameters(), encoder.named_parameters(), strict=True):
        master = safe_get_local_fp32_param(o)
        if master is None or master.numel() != t.ds_tensor.numel():
            raise RuntimeError(f"ZeRO-3 target/online partitions differ for '{name}': "
                               f"{t.ds_tensor.numel()} vs {None if master is None else master.numel()} elements")
        targets.append(t.ds_tensor.view(-1))
        online.append(master.view(-1))
    return targets, online


# ---------------------------------------------------------------------------------------------------
# checkpoint files
# ---------------------------------------------------------------------------------------------------
def save_target_shard(tag_dir: Path, target: torch.nn.Module, rank: int, world: int) -> Path:
    """Write this rank's slices atomically (``fastjepa.io.files.export_safetensors``)."""
    tensors = {name: p.ds_tensor.detach().reshape(-1).float() for name, p in target.named_parameters()}
    shapes = {name: list(p.ds_shape) for name, p in target.named_parameters()}
    return export_safetensors(Path(tag_dir) / shard_name(rank, world), tensors,
                              metadata={"shapes": json.dumps(shapes), "world": str(world), "rank": str(rank)})


def _shard_files(tag_dir: Path) -> list[Path]:
    """The shard files of one complete save, ordered by rank; an error naming what is missing."""
    found = {}
    for path in tag_dir.iterdir():
        m = SHARD_PATTERN.fullmatch(path.name)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = path
    if not found:
        raise FileNotFoundError(f"no ZeRO-3 target shards (fastjepa_target_rank*_of_*.safetensors) in '{tag_dir}'")
    if len(found) > 1:
        raise ValueError(f"'{tag_dir}' holds target shards of several world sizes: {sorted(found)}")
    (world, files), = found.items()
    missing = sorted(set(range(world)) - set(files))
    if missing:
        raise FileNotFoundError(f"'{tag_dir}' lacks the target shards of ranks {missing} (of {world})")
    return [files[r] for r in range(world)]


def _read_flat(files: list[Path]):
    """name -> (shape, reader of the whole flat fp32 parameter), reading one parameter at a time."""
    with safe_open(str(files[0]), "pt") as f:
        shapes = json.loads(f.metadata()["shapes"])

    def whole(name: str) -> torch.Tensor:
        parts = []
        for path in files:
            with safe_open(str(path), "pt") as f:
                parts.append(f.get_tensor(name))
        return torch.cat(parts)[: math.prod(shapes[name])]

    return shapes, whole


def consolidate_target(tag_dir: str | Path) -> dict[str, torch.Tensor]:
    """The whole fp32 target encoder (``name -> tensor``) from the shard files of a tag folder."""
    shapes, whole = _read_flat(_shard_files(Path(tag_dir)))
    return {name: whole(name).view(shape) for name, shape in shapes.items()}


def load_target_shard(tag_dir: Path, target: torch.nn.Module, rank: int, world: int) -> None:
    """Fill this rank's slices from a save made on any number of ranks."""
    files = _shard_files(tag_dir)
    shapes, whole = _read_flat(files)
    params = dict(target.named_parameters())
    if set(shapes) != set(params):
        raise ValueError(f"target shards in '{tag_dir}' do not match the model: missing "
                         f"{sorted(set(params) - set(shapes))[:5]}, unexpected {sorted(set(shapes) - set(params))[:5]}")
    same_layout = len(files) == world
    for name, p in params.items():
        if list(p.ds_shape) != shapes[name]:
            raise ValueError(f"target shard '{name}' has shape {shapes[name]}, the model {list(p.ds_shape)}")
        local = p.ds_tensor.view(-1)
        if same_layout:
            with safe_open(str(files[rank]), "pt") as f:
                src = f.get_tensor(name)
        else:  # re-slice the whole parameter for this world size (zero padding at the end)
            flat = whole(name)
            start = rank * local.numel()
            src = torch.zeros(local.numel())
            piece = flat[start:start + local.numel()]
            src[: piece.numel()] = piece
        with torch.no_grad():
            local.copy_(src.to(local.dtype))


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------
def to_universal(tag_dir: Path, output: Path | None = None) -> Path:
    """DeepSpeed's universal checkpoint of a tag (``<tag>_universal`` beside it, and ``latest_universal``
    pointing at it), with the target shard files copied along. Load it with
    ``deepspeed.load_universal=true --resume`` on any number of ranks."""
    import shutil
    import subprocess
    import sys

    tag_dir = Path(tag_dir)
    output = Path(output) if output else tag_dir.with_name(tag_dir.name + "_universal")
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"checkpoint tag folder '{tag_dir}' does not exist")
    files = _shard_files(tag_dir) if any(SHARD_PATTERN.fullmatch(p.name) for p in tag_dir.iterdir()) else []
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
                    "--output_folder", str(output)], check=True)
    for path in files:
        shutil.copy2(path, output / path.name)
    return output


def main(argv=None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m fastjepa.train.zero", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export-target", help="assemble the fp32 target encoder of a ZeRO-3 checkpoint tag")
    p.add_argument("tag_dir", type=Path)
    p.add_argument("output", type=Path, help="a .safetensors file")
    p = sub.add_parser("to-universal", help="convert a checkpoint tag to DeepSpeed's universal format")
    p.add_argument("tag_dir", type=Path)
    p.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "export-target":
            export_safetensors(args.output, consolidate_target(args.tag_dir))
            print(f"wrote {args.output}")
        else:
            print(f"wrote {to_universal(args.tag_dir, args.output)}")
    except (FileNotFoundError, ValueError) as err:
        print(f"fastjepa.zero: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
