"""The I-JEPA predictor: a narrow ViT over packed (context tokens + one block's mask tokens) sequences."""
from __future__ import annotations

import torch
import torch.nn as nn

from fastjepa_kernels import gather_tokens

from ..masks import PackedMasks
from .pos_embed import sincos_2d
from .vit import (
    LN_EPS,
    Block,
    LayerNorm,
    final_norm,
    fused_path,
    init_weights,
    ops_backend,
    resolve_backend,
    run_blocks,
)


class Predictor(nn.Module):
    """``context [T_ctx, D]`` (context-encoder output) + masks -> predictions ``[T_tgt, D]`` ordered
    like ``masks.tgt_index``."""

    def __init__(self, grid, embed_dim=1280, pred_dim=384, depth=12, num_heads=16, mlp_ratio=4.0,
                 attention_backend="sdpa", checkpointing="off", residual_dtype="fp32"):
        super().__init__()
        self.checkpointing = checkpointing  # see fastjepa.models.vit.run_blocks
        self.attention_backend = attention_backend
        self.predictor_embed = nn.Linear(embed_dim, pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, pred_dim))
        self.register_buffer("pos_embed", sincos_2d(pred_dim, *grid), persistent=False)
        self.blocks = nn.ModuleList(Block(pred_dim, num_heads, mlp_ratio, attention_backend, residual_dtype)
                                    for _ in range(depth))
        self.ops_backend = ops_backend(attention_backend)
        self.norm = LayerNorm(pred_dim, eps=LN_EPS)
        self.predictor_proj = nn.Linear(pred_dim, embed_dim)
        init_weights(self, self.blocks)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, context: torch.Tensor, masks: PackedMasks) -> torch.Tensor:
        x = self.predictor_embed(context)
        t_ctx = x.shape[0]
        # pred_src indexes cat(context rows, mask token): row T_ctx is the mask token. Gather the context
        # rows only and put the token in with a broadcast: as a gathered table row, every target row would
        # add its gradient into that one row (tens of thousands of same-address atomics, in any order).
        is_mask = (masks.pred_src == t_ctx)[:, None]
        # mask rows read some context row instead, spread over all of them (no hot row in the gather's
        # backward); the where discards it, and its gradient there is 0
        spread = torch.arange(masks.pred_src.shape[0], device=x.device, dtype=masks.pred_src.dtype) % max(t_ctx, 1)
        src = torch.where(is_mask[:, 0], spread, masks.pred_src)
        x = torch.where(is_mask, self.mask_token.to(x.dtype), gather_tokens(x, src, backend=self.ops_backend))
        x = x + self.pos_embed.to(x.dtype).index_select(0, masks.pred_pos)
        if fused_path(self.attention_backend, x):
            hidden, residual = run_blocks(self.blocks, x, masks.pred_cu_seqlens, masks.pred_max_seqlen,
                                          self.checkpointing, carry=True)
            # only the target rows need the head: pick them before the last add (fused into the norm)
            return self.predictor_proj(final_norm(self.norm, hidden.index_select(0, masks.pred_out),
                                                  residual.index_select(0, masks.pred_out)))
        x = run_blocks(self.blocks, x, masks.pred_cu_seqlens, masks.pred_max_seqlen, self.checkpointing)
        x = x.index_select(0, masks.pred_out)  # only the target rows need the head
        return self.predictor_proj(self.norm(x))


def build_predictor(cfg, encoder) -> Predictor:
    return Predictor(
        grid=encoder.grid, embed_dim=encoder.embed_dim, pred_dim=cfg.pred_embed_dim, depth=cfg.pred_depth,
        num_heads=cfg.pred_num_heads or encoder.num_heads, attention_backend=resolve_backend(cfg.attention_backend),
        checkpointing=cfg.activation_checkpointing, residual_dtype=cfg.residual_dtype,
    )
