"""``load_encoder(path)``: a fastjepa encoder from whatever a run or a conversion left on disk.

    import fastjepa
    encoder = fastjepa.load_encoder("runs/demo")       # eval mode, on the CPU
    features = encoder(images).mean(dim=1)             # [B, C, H, W] float32 -> [B, D]

``path`` is one of: a training output directory (its ``target_encoder.safetensors``, else the newest
``checkpoints/step_XXXXXXXX.pt``); a ``.safetensors`` encoder (the run's resolved config JSON rides in its
metadata under ``config``, or sits beside it as ``config.json``); a fastjepa checkpoint ``.pt``; or an
official I-JEPA checkpoint (converted in memory, see ``fastjepa.io.official``). Files are read with
safetensors or ``torch.load(weights_only=True)``: nothing but tensors and plain containers is unpickled.
A file whose keys or shapes do not fit the model is a ``CheckpointError`` that lists them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn

from ..config import Config, ConfigError, build_config
from .files import TARGET_FILE, CheckpointError, newest_checkpoint_file, read_weights
from .official import is_official, official_to_fastjepa
from .train_state import TrainState
from .weights import encoder_from_state, listing


# ---- finding an encoder's config and weights ----------------------------------------------------
def _config_from_json(text: str, where: str) -> Config:
    try:
        return build_config(json.loads(text))
    except (json.JSONDecodeError, ConfigError) as err:
        raise CheckpointError(f"the config in {where} is not a valid fastjepa config: {err}") from None


def _config_beside(path: Path, metadata: dict) -> Config:
    if "config" in metadata:
        return _config_from_json(metadata["config"], f"the metadata of '{path}'")
    beside = path.parent / "config.json"
    if beside.is_file():
        return _config_from_json(beside.read_text(), f"'{beside}'")
    raise CheckpointError(f"'{path}' has no 'config' metadata and no config.json beside it: pass config= "
                          "(a fastjepa config JSON file or Config) to say which architecture it holds")


def _from_checkpoint(path: Path, contents: dict, weights: str) -> tuple[Config, dict]:
    """A fastjepa training checkpoint (:class:`TrainState`): the target or the context encoder."""
    state = TrainState.from_dict(contents, f"'{path}'")
    cfg = _config_from_json(json.dumps(state.config), f"'{path}'")
    if weights == "target":
        if state.target is None:
            raise CheckpointError(f"'{path}' has no 'target' entry (a ZeRO-3 run keeps it in shard files: "
                                  "fastjepa export TAG_DIR OUT.safetensors)")
        return cfg, state.target
    if state.model is None:
        raise CheckpointError(f"'{path}' holds no context-encoder weights (a DeepSpeed client state?)")
    prefix = "encoder."
    return cfg, {k[len(prefix):]: v for k, v in state.model.items() if k.startswith(prefix)}


def read_encoder(path: str | Path, weights: str = "target", config=None,
                 num_heads: int | None = None) -> tuple[Config, dict]:
    """``(config, encoder state dict in fastjepa names)`` from any path ``load_encoder`` accepts.

    weights: ``target`` or ``context``, for files that hold both. config: a config JSON path or
    ``Config`` for a bare safetensors file. num_heads: for official checkpoints whose width and depth
    match no preset (the head count leaves no trace in the tensors)."""
    if weights not in ("target", "context"):
        raise ValueError(f"weights must be 'target' or 'context', got {weights!r}")
    path = Path(path)
    if isinstance(config, (str, Path)):
        config = _config_from_json(Path(config).read_text(), f"'{config}'")
    if path.is_dir():
        if weights == "target" and (path / TARGET_FILE).is_file():
            path = path / TARGET_FILE
        else:
            newest = newest_checkpoint_file(path / "checkpoints")
            if newest is None:
                raise CheckpointError(f"'{path}' holds neither {TARGET_FILE} nor checkpoints/step_*.pt: "
                                      "not a training output directory, or no checkpoint saved yet")
            path = newest
    contents, metadata = read_weights(path)
    if path.suffix == ".safetensors":
        return (config if config is not None else _config_beside(path, metadata)), contents
    if "config" in contents and ("target" in contents or "model" in contents):
        cfg, state = _from_checkpoint(path, contents, weights)
        return (config if config is not None else cfg), state
    if is_official(contents):
        section = "target_encoder" if weights == "target" else "encoder"
        base = config.to_dict() if config is not None else None
        cfg, states = official_to_fastjepa(contents, num_heads, base, (section,), what=f"'{path}'")
        return cfg, states["target" if weights == "target" else "encoder"]
    raise CheckpointError(f"'{path}' is neither a fastjepa checkpoint (keys step, model, target, config) nor an "
                          f"official I-JEPA one (keys encoder, predictor, target_encoder); it has: {listing(contents)}")


def load_encoder(path: str | Path, weights: str = "target", config=None, num_heads: int | None = None) -> nn.Module:
    """An eval-mode fastjepa ``VisionTransformer`` on the CPU: ``images [B, C, H, W] -> tokens [B, N, D]``
    (final LayerNorm applied; average over N for the I-JEPA feature). Arguments as ``read_encoder``."""
    cfg, state = read_encoder(path, weights, config, num_heads)
    return encoder_from_state(cfg, state, f"encoder weights in '{path}'")
