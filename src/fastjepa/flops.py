"""Analytic FLOPs of one I-JEPA step from the step's actual token counts (FLOPs = 2 x MACs).

Per token per transformer layer (width D, sequence length L): qkv 3D^2 + proj D^2 + MLP 2 r D^2 MACs,
plus QK^T and PV 2 L D MACs -> ``2 (4 + 2 r) D^2 + 4 L D`` FLOPs (``24 D^2 + 4 L D`` for r = 4:
the count of Kaplan et al. 2020, "Scaling Laws for Neural Language Models", table 1, without the causal halving).
Backward costs twice the forward.
"""
from __future__ import annotations

# dense bf16 peak (TFLOP/s) by device-name fragment: H100/H200 SXM datasheets (989 dense bf16), A100 312
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def layer_flops(lengths, width: int, mlp_ratio: float) -> float:
    """Forward FLOPs of one block over sequences of the given lengths."""
    per_token = 2 * (4 + 2 * mlp_ratio) * width * width
    return sum(n * per_token + 4 * n * n * width for n in lengths)


def step_flops(model, masks, batch: int) -> float:
    """Forward+backward FLOPs of one micro-step: target encoder (forward only, all N tokens), context
    encoder and predictor (forward + backward on the packed token sets)."""
    enc, pred = model.encoder, model.predictor
    d, depth = enc.embed_dim, len(enc.blocks)
    ratio = enc.blocks[0].mlp.fc1.out_features / d
    n = enc.num_patches
    patch_macs = enc.in_chans * enc.patch_size ** 2 * d
    target = depth * layer_flops([n] * batch, d, ratio) + 2 * patch_macs * n * batch
    context = depth * layer_flops(masks.ctx_lens, d, ratio) + 2 * patch_macs * n * batch
    p = pred.predictor_embed.out_features
    p_ratio = pred.blocks[0].mlp.fc1.out_features / p if len(pred.blocks) else 4.0
    t_ctx, t_tgt = sum(masks.ctx_lens), sum(masks.tgt_lens)
    predictor = (len(pred.blocks) * layer_flops(masks.pred_lens, p, p_ratio)
                 + 2 * t_ctx * d * p + 2 * t_tgt * p * d)
    return target + 3 * (context + predictor)


def peak_tflops(device_name: str) -> float | None:
    for fragment, peak in PEAK_BF16_TFLOPS.items():
        if fragment in device_name:
            return peak
    return None
