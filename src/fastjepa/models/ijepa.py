"""The three I-JEPA networks of a run: the online model (context encoder + predictor) and the target
encoder, an exact fp32 copy of the context encoder that only the EMA updates."""
from __future__ import annotations

import copy

import torch.nn as nn

from ..masks import PackedMasks
from .predictor import build_predictor
from .vit import Block, build_encoder


class IJEPA(nn.Module):
    """Context encoder + predictor: the modules that get gradients.

    ``forward(images [B, C, H, W], masks)`` -> predictions ``[T_tgt, D]``, ordered like ``masks.tgt_index``."""

    def __init__(self, encoder: nn.Module, predictor: nn.Module):
        super().__init__()
        self.encoder, self.predictor = encoder, predictor

    def forward(self, images, masks: PackedMasks):
        context = self.encoder(images, masks.ctx_index, masks.ctx_cu_seqlens, masks.ctx_max_seqlen)
        return self.predictor(context, masks)


def build_models(cfg) -> tuple[IJEPA, nn.Module]:
    """``(online model, target encoder)`` from a run ``Config``, the target a frozen copy of the encoder."""
    encoder = build_encoder(cfg.model)
    model = IJEPA(encoder, build_predictor(cfg.model, encoder))
    target = copy.deepcopy(encoder).requires_grad_(False)
    return model, target


def compile_blocks(*models: nn.Module) -> None:
    """``torch.compile`` every transformer block in place (regional compilation: blocks of one width share a
    graph, so ViT-H compiles two, not 76). Token counts change every step: dynamic shapes."""
    for model in models:
        for module in model.modules():
            if isinstance(module, Block):
                module.compile(dynamic=True)
