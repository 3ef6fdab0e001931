"""Analytic GPU memory of one I-JEPA training step: model states per ZeRO stage plus activations.

Model states (bytes, Psi = online parameters = context encoder + predictor, Psi_enc = target encoder;
the ZeRO paper's accounting, Rajbhandari et al. SC 2020 section 3, K = 12 for Adam's fp32 master
weights and two moments):

- stage 0, the single-process trainer: fp32 weights 4 Psi, fp32 gradients 4 Psi, Adam moments 8 Psi,
  autocast's bf16 weight copies 2 Psi (kept for the backward) -> 18 Psi;
- ZeRO-1: bf16 weights 2 Psi + bf16 gradients 2 Psi + 12 Psi / n;  ZeRO-2: 2 Psi + (2 + 12) Psi / n;
  ZeRO-3: 16 Psi / n;
- the fp32 target encoder: 4 Psi_enc, or 4 Psi_enc / n when it is sharded with the encoder (ZeRO-3).

Activations kept for the backward, per token per transformer block of width D and MLP ratio r under
bf16 autocast (what each op saves): two LayerNorm inputs, qkv input 2D, packed qkv 6D, attention output
2D (the proj input is the same tensor), fc1 input 2D, fc1 output 2rD (GELU's input), GELU output 2rD
(fc2's input), fp32 LayerNorm statistics 16 and the attention LSE 4H bytes. CUDA's autocast runs
LayerNorm in fp32, so each LayerNorm keeps an fp32 copy of its input (4D; CPU's keeps the bf16 one, 2D):
``(20 + 4 r) D + 16 + 4 H`` bytes on CUDA (52 D for r = 4), ``(16 + 4 r) D + 16 + 4 H`` on CPU (measured:
tests/test_memory.py). With activation checkpointing a block keeps only its input (2D) and one block at a
time is rebuilt in the backward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GB = 1e9


def block_bytes_per_token(width: int, mlp_ratio: float, heads: int, device_type: str = "cuda") -> float:
    """Bytes one token keeps for the backward in one transformer block (bf16 autocast on ``device_type``)."""
    layer_norm_inputs = 8 if device_type == "cuda" else 4
    return (12 + layer_norm_inputs + 4 * mlp_ratio) * width + 16 + 4 * heads


def model_state_bytes(psi: float, psi_enc: float, stage: int, ranks: int = 1) -> float:
    """Weights, gradients, optimizer state and the fp32 target encoder on one rank."""
    n = max(1, ranks)
    online = {0: 18 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}[stage]
    return online + 4 * psi_enc / (n if stage == 3 else 1)


@dataclass
class Tower:
    """One stack of blocks: ``tokens`` packed rows per step, ``width``, ``depth``, ``mlp_ratio``, ``heads``."""
    tokens: float
    width: int
    depth: int
    mlp_ratio: float
    heads: int

    def kept(self, checkpointing: bool) -> float:
        """Bytes kept between forward and backward."""
        if checkpointing:
            return self.depth * 2 * self.width * self.tokens
        return self.depth * block_bytes_per_token(self.width, self.mlp_ratio, self.heads) * self.tokens

    def rebuilt(self) -> float:
        """Bytes of the one block rebuilt at a time in a checkpointed backward pass."""
        return block_bytes_per_token(self.width, self.mlp_ratio, self.heads) * self.tokens


def towers(model, masks_list) -> tuple[Tower, Tower]:
    """(context encoder, predictor) towers with the mean packed token counts of the given masks."""
    enc, pred = model.encoder, model.predictor
    ctx = float(np.mean([sum(m.ctx_lens) for m in masks_list]))
    prd = float(np.mean([sum(m.pred_lens) for m in masks_list]))
    e_blk, p_blk = enc.blocks[0], pred.blocks[0]
    return (Tower(ctx, enc.embed_dim, len(enc.blocks), e_blk.mlp.fc1.out_features / enc.embed_dim,
                  e_blk.attn.num_heads),
            Tower(prd, p_blk.mlp.fc1.in_features, len(pred.blocks),
                  p_blk.mlp.fc1.out_features / p_blk.mlp.fc1.in_features, p_blk.attn.num_heads))


def step_memory(model, masks_list, batch: int, stage: int, ranks: int = 1, checkpointing: bool = False) -> dict:
    """Estimated peak bytes of one training step on one rank, by part (``total`` is their sum).

    ``model`` may live on the meta device (only shapes are read); ``masks_list`` are sampled
    ``PackedMasks`` of per-rank batch ``batch``."""
    enc = model.encoder
    psi = sum(p.numel() for p in model.parameters())
    psi_enc = sum(p.numel() for p in enc.parameters())
    context, predictor = towers(model, masks_list)
    targets = float(np.mean([sum(m.tgt_lens) for m in masks_list]))
    kept = context.kept(checkpointing) + predictor.kept(checkpointing)
    rebuilt = max(context.rebuilt(), predictor.rebuilt()) if checkpointing else 0.0
    # target features [B, N, D] bf16 live through the backward; the predictions and their fp32 gradient
    # [T_tgt, D]; the patch embeddings of the context encoder [B, N, D]
    n = enc.num_patches
    side = 2 * batch * n * enc.embed_dim * 2 + targets * enc.embed_dim * (2 + 4)
    parts = {"model_states": model_state_bytes(psi, psi_enc, stage, ranks), "activations": kept + rebuilt,
             "features": side}
    parts["total"] = sum(parts.values())
    return parts
