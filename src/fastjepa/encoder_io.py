"""``load_encoder(path)``: a fastjepa encoder from whatever a run or a conversion left on disk.

    import fastjepa
    encoder = fastjepa.load_encoder("runs/demo")       # eval mode, on the CPU
    features = encoder(images).mean(dim=1)             # [B, C, H, W] float32 -> [B, D]

``path`` is one of: a training output directory (its ``target_encoder.safetensors``, else the newest
``checkpoints/step_XXXXXXXX.pt``); a ``.safetensors`` encoder (the run's resolved config JSON rides in its
metadata under ``config``, or sits beside it as ``config.json``); a fastjepa checkpoint ``.pt``; or an
official I-JEPA checkpoint (converted in memory, see ``fastjepa.convert``). Files are read with
safetensors or ``torch.load(weights_only=True)``: nothing but tensors and plain containers is unpickled.
A file whose keys or shapes do not fit the model is a ``CheckpointError`` that lists them.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
import torch.nn as nn

from .config import Config, ConfigError, build_config

TARGET_FILE = "target_encoder.safetensors"


class CheckpointError(ValueError):
    """A weights file that is missing, unreadable, or does not fit the model; the message names the file
    and, for a misfit, the keys."""


# ---- reading files --------------------------------------------------------------------------------
def read_file(path: str | Path) -> tuple[dict, dict]:
    """``(contents, metadata)``: a safetensors file's tensors and string metadata, or the dict a
    ``torch.save`` file holds (metadata empty)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"'{path}' does not exist")
    if path.is_dir():
        raise CheckpointError(f"'{path}' is a directory, not a weights file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"'{path}' is not a readable safetensors file: {err}") from None
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a page long; its "Unsupported global: GLOBAL x.Y ..." sentence names the culprit
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        reason = f"it refuses {found.group(1)}" if found else str(err).strip().splitlines()[-1]
        raise CheckpointError(
            f"'{path}' holds Python objects besides tensors and plain containers, which "
            f"torch.load(weights_only=True) will not unpickle ({reason}). If you trust the file, re-save its "
            "state dicts alone from a Python session: ckpt = torch.load(path, weights_only=False); "
            "torch.save({k: ckpt[k] for k in ('encoder', 'predictor', 'target_encoder')}, 'clean.pth')"
        ) from None
    except Exception as err:  # noqa: BLE001 - a truncated zip, a foreign file: name the file
        raise CheckpointError(f"'{path}' cannot be read as a PyTorch checkpoint (truncated, or not a torch.save "
                              f"file): {err}") from None
    if not isinstance(contents, dict):
        raise CheckpointError(f"'{path}' holds a {type(contents).__name__}, not a dict of state dicts")
    return contents, {}


def _listing(names, limit: int = 8) -> str:
    names = sorted(map(str, names))
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_keys(expected: dict, state: dict, what: str) -> None:
    """Raise ``CheckpointError`` unless ``state`` has exactly the keys of ``expected`` (name -> tensor or
    shape) with the same shapes; the message lists missing keys, unexpected keys and shape mismatches."""
    want = {k: tuple(v.shape if isinstance(v, torch.Tensor) else v) for k, v in expected.items()}
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if not problems:  # shapes only mean something once the names line up
        def shape(v):
            return list(v.shape) if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"

        wrong = [f"{k} {shape(state[k])} (expected {list(want[k])})" for k in want
                 if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != want[k]]
        if wrong:
            problems.append(f"shape mismatches: {_listing(wrong, 4)}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def load_weights(module: nn.Module, state: dict, what: str) -> None:
    """``module.load_state_dict(state)`` after ``check_keys``: a misfit is one readable error."""
    check_keys(module.state_dict(), state, what)
    module.load_state_dict(state)


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


def is_official(contents: dict) -> bool:
    """The facebookresearch/ijepa training checkpoint layout (src/train.py save_checkpoint)."""
    return "target_encoder" in contents or ("encoder" in contents and "predictor" in contents)


def _from_checkpoint(path: Path, contents: dict, weights: str) -> tuple[Config, dict]:
    """A fastjepa trainer checkpoint (fastjepa.trainer.Trainer.state_dict): the target or context encoder."""
    cfg = _config_from_json(json.dumps(contents["config"]), f"'{path}'")
    if weights == "target":
        if "target" not in contents:
            raise CheckpointError(f"'{path}' has no 'target' entry (a ZeRO-3 run keeps it in shard files: "
                                  "python -m fastjepa.zero export-target TAG_DIR OUT.safetensors)")
        return cfg, contents["target"]
    prefix = "encoder."
    return cfg, {k[len(prefix):]: v for k, v in contents["model"].items() if k.startswith(prefix)}


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
        from .checkpoint import latest_checkpoint

        if weights == "target" and (path / TARGET_FILE).is_file():
            path = path / TARGET_FILE
        else:
            newest = latest_checkpoint(path / "checkpoints")
            if newest is None:
                raise CheckpointError(f"'{path}' holds neither {TARGET_FILE} nor checkpoints/step_*.pt: "
                                      "not a training output directory, or no checkpoint saved yet")
            path = newest
    contents, metadata = read_file(path)
    if path.suffix == ".safetensors":
        return (config if config is not None else _config_beside(path, metadata)), contents
    if "config" in contents and ("target" in contents or "model" in contents):
        cfg, state = _from_checkpoint(path, contents, weights)
        return (config if config is not None else cfg), state
    if is_official(contents):
        from .convert import official_to_fastjepa

        section = "target_encoder" if weights == "target" else "encoder"
        base = config.to_dict() if config is not None else None
        cfg, states = official_to_fastjepa(contents, num_heads, base, (section,), what=f"'{path}'")
        return cfg, states["target" if weights == "target" else "encoder"]
    raise CheckpointError(f"'{path}' is neither a fastjepa checkpoint (keys step, model, target, config) nor an "
                          f"official I-JEPA one (keys encoder, predictor, target_encoder); it has: {_listing(contents)}")


def inference_config(cfg: Config) -> Config:
    """The config with run-time choices fit for any machine: attention ``auto`` (Triton on CUDA when
    installed, SDPA elsewhere; a run trained with ``triton`` still loads where Triton is missing) and no
    activation checkpointing."""
    cfg = cfg.model_copy(deep=True)
    cfg.model.attention_backend = "auto"
    cfg.model.activation_checkpointing = "off"
    return cfg


def encoder_from_state(cfg: Config, state: dict, what: str) -> nn.Module:
    """Build ``cfg``'s encoder and load ``state`` (strict, with a readable error)."""
    from .models import build_encoder

    encoder = build_encoder(inference_config(cfg).model)
    load_weights(encoder, state, what)
    return encoder.eval()


def load_encoder(path: str | Path, weights: str = "target", config=None, num_heads: int | None = None) -> nn.Module:
    """An eval-mode fastjepa ``VisionTransformer`` on the CPU: ``images [B, C, H, W] -> tokens [B, N, D]``
    (final LayerNorm applied; average over N for the I-JEPA feature). Arguments as ``read_encoder``."""
    cfg, state = read_encoder(path, weights, config, num_heads)
    return encoder_from_state(cfg, state, f"encoder weights in '{path}'")
