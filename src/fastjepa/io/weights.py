"""Fitting state dicts to models: a misfit is one readable error that lists the missing keys, the
unexpected keys and the shape mismatches; an encoder built for inference on any machine."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import Config
from ..models import build_encoder
from .files import CheckpointError


def listing(names, limit: int = 8) -> str:
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
        problems.append(f"missing keys: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listing(unexpected)}")
    if not problems:  # shapes only mean something once the names line up
        def shape(v):
            return list(v.shape) if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"

        wrong = [f"{k} {shape(state[k])} (expected {list(want[k])})" for k in want
                 if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != want[k]]
        if wrong:
            problems.append(f"shape mismatches: {listing(wrong, 4)}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def load_weights(module: nn.Module, state: dict, what: str) -> None:
    """``module.load_state_dict(state)`` after ``check_keys``: a misfit is one readable error."""
    check_keys(module.state_dict(), state, what)
    module.load_state_dict(state)


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
    encoder = build_encoder(inference_config(cfg).model)
    load_weights(encoder, state, what)
    return encoder.eval()
