"""fastjepa encoders as timm ``VisionTransformer`` weights.

timm's ``VisionTransformer(class_token=False, global_pool="avg", fc_norm=False)`` has the official encoder's
key names and a pos_embed [1, N, D] holding the same fixed sin-cos table, so an encoder converts with its
features unchanged: ``forward_head(forward_features(x), pre_logits=True)`` is ``encoder(x).mean(1)``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..models.pos_embed import sincos_2d
from .encoder import load_encoder
from .files import CheckpointError, export_safetensors
from .official import mlp_ratio_for, official_encoder_name


def timm_kwargs(encoder: nn.Module) -> dict:
    """Arguments of ``timm.models.vision_transformer.VisionTransformer`` that rebuild ``encoder``:
    no class token, mean over tokens, the final LayerNorm before the pooling (fc_norm=False; timm's
    default for avg pooling normalises after it), eps 1e-6 (timm's LayerNorm default, as ours)."""
    hidden = encoder.blocks[0].mlp.fc1.out_features
    return dict(img_size=encoder.grid[0] * encoder.patch_size, patch_size=encoder.patch_size,
                in_chans=encoder.in_chans, num_classes=0, global_pool="avg", embed_dim=encoder.embed_dim,
                depth=len(encoder.blocks), num_heads=encoder.num_heads,
                mlp_ratio=mlp_ratio_for(encoder.embed_dim, hidden), qkv_bias=True, class_token=False,
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
    kwargs, state = timm_kwargs(encoder), timm_state_dict(encoder)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        export_safetensors(out, state, metadata={"format": "pt", "timm_kwargs": json.dumps(kwargs)})
    else:
        torch.save(state, out)
    return kwargs
