"""Packed (varlen) execution of the encoder and predictor against per-image and naive float64 references.

The naive references below use only plain torch ops on float64 copies of the weights: patch embedding as
a matmul over unfolded patches, LayerNorm from its formula, softmax attention per sequence, exact GELU.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastjepa.config import MaskConfig, ModelConfig
from fastjepa.masks import MaskSampler
from fastjepa.models import PRESETS, Predictor, VisionTransformer, build_encoder, build_predictor
from fastjepa.models.pos_embed import sincos_2d
from fastjepa_kernels import jepa_target_loss

torch.set_num_threads(1)

IMG, PATCH, CH = 32, 4, 3  # 8 x 8 grid
GRID = (IMG // PATCH, IMG // PATCH)
N = GRID[0] * GRID[1]
MASKS = MaskConfig(num_targets=3, min_keep=2)


def small_encoder(seed=0, depth=2, dim=48, heads=3):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=IMG, patch_size=PATCH, in_chans=CH, embed_dim=dim, depth=depth,
                             num_heads=heads, mlp_ratio=4.0).eval()


def small_predictor(seed=1, dim=48, pdim=32, depth=2, heads=4):
    torch.manual_seed(seed)
    return Predictor(GRID, embed_dim=dim, pred_dim=pdim, depth=depth, num_heads=heads).eval()


def randomize_(module, scale=0.3, seed=5):
    """Move every parameter away from its init (zero biases, unit LN) so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 and p.std() > 0 else 0.1))
    return module


def batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, CH, IMG, IMG, generator=g)
    masks = MaskSampler(MASKS, GRID)(b, seed=seed, step=seed)
    return images, masks


# ---------------------------------------------------------------------------------------------------
# naive float64 reference
# ---------------------------------------------------------------------------------------------------
def np_sincos_2d(dim, height, width):
    """MAE ``get_2d_sincos_pos_embed`` re-derived in float64 numpy (generalised to H x W)."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(height, dtype=np.float64)
    grid_w = np.arange(width, dtype=np.float64)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first, as in MAE
    emb_h = one_d(dim // 2, grid[0])  # MAE's "emb_h" is in fact the column coordinate
    emb_w = one_d(dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def d(t):
    return t.detach().to(torch.float64)


def naive_ln(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * d(ln.weight) + d(ln.bias)


def naive_linear(x, lin):
    return x @ d(lin.weight).T + d(lin.bias)


def naive_attention_seq(x, attn):
    """One sequence [L, D] -> [L, D], float64, explicit softmax."""
    L, D = x.shape
    h, hd = attn.num_heads, attn.head_dim
    qkv = naive_linear(x, attn.qkv).reshape(L, 3, h, hd)
    q, k, v = qkv[:, 0].transpose(0, 1), qkv[:, 1].transpose(0, 1), qkv[:, 2].transpose(0, 1)  # [h, L, hd]
    scores = q @ k.transpose(1, 2) / math.sqrt(hd)
    w = torch.exp(scores - scores.max(-1, keepdim=True).values)
    w = w / w.sum(-1, keepdim=True)
    out = (w @ v).transpose(0, 1).reshape(L, D)
    return naive_linear(out, attn.proj)


def naive_block_seq(x, blk):
    x = x + naive_attention_seq(naive_ln(x, blk.norm1), blk.attn)
    hdn = naive_linear(naive_ln(x, blk.norm2), blk.mlp.fc1)
    hdn = 0.5 * hdn * (1.0 + torch.erf(hdn / math.sqrt(2.0)))
    return x + naive_linear(hdn, blk.mlp.fc2)


def naive_patch_tokens(img, enc):
    """[C, H, W] -> [N, D] float64: unfold into p x p patches (row-major) and apply the conv as a matmul."""
    c, hgt, wid = img.shape
    p = enc.patch_size
    patches = d(img).reshape(c, hgt // p, p, wid // p, p).permute(1, 3, 0, 2, 4).reshape(-1, c * p * p)
    w = d(enc.patch_embed.weight).reshape(enc.embed_dim, -1)
    return patches @ w.T + d(enc.patch_embed.bias)


def naive_encoder(img, local_idx, enc):
    """One image, one token subset (local ids) -> [len, D] float64."""
    pos = torch.from_numpy(np_sincos_2d(enc.embed_dim, *enc.grid))
    x = (naive_patch_tokens(img, enc) + pos)[torch.as_tensor(local_idx, dtype=torch.long)]
    for blk in enc.blocks:
        x = naive_block_seq(x, blk)
    return naive_ln(x, enc.norm)


def naive_predictor(ctx_feats, ctx_pos, tgt_pos, pred):
    """One (image, block) sequence built by hand -> predictions [len(tgt_pos), D] float64."""
    pos = torch.from_numpy(np_sincos_2d(pred.mask_token.shape[-1], *GRID))
    x = naive_linear(d(ctx_feats), pred.predictor_embed) + pos[torch.as_tensor(ctx_pos, dtype=torch.long)]
    m = d(pred.mask_token).expand(len(tgt_pos), -1) + pos[torch.as_tensor(tgt_pos, dtype=torch.long)]
    x = torch.cat([x, m], dim=0)
    for blk in pred.blocks:
        x = naive_block_seq(x, blk)
    x = x[len(ctx_pos):]
    return naive_linear(naive_ln(x, pred.norm), pred.predictor_proj)


def segments(cu):
    cu = cu.tolist()
    return [slice(cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def local(index, b):
    return (index.long() - b * N).numpy()


# ---------------------------------------------------------------------------------------------------
# position embeddings
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim, h, w", [(64, 8, 8), (1280, 16, 16), (384, 16, 16), (96, 14, 14), (32, 5, 9), (48, 7, 3)])
def test_sincos_matches_mae_formula(dim, h, w):
    ours = sincos_2d(dim, h, w)
    ref = torch.from_numpy(np_sincos_2d(dim, h, w))
    assert ours.dtype == torch.float32 and ours.shape == (h * w, dim)
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=0)


def test_sincos_column_first_half_row_second_half():
    e = sincos_2d(16, 3, 4).double()
    # patch (row 0, col 1) vs (row 1, col 1): same first half (columns), different second half (rows)
    assert torch.equal(e[1, :8], e[5, :8]) and not torch.equal(e[1, 8:], e[5, 8:])
    # channel 0 is sin(col * 1)
    assert abs(float(e[4 * 2 + 3, 0]) - math.sin(3.0)) < 1e-6
    with pytest.raises(ValueError):
        sincos_2d(18, 2, 2)


def test_encoder_uses_sincos_buffer():
    enc = small_encoder()
    torch.testing.assert_close(enc.pos_embed.double(), torch.from_numpy(np_sincos_2d(48, *GRID)), atol=1e-6, rtol=0)
    assert "pos_embed" not in enc.state_dict()  # fixed, not a parameter, not saved


# ---------------------------------------------------------------------------------------------------
# encoder: packed == per image == naive
# ---------------------------------------------------------------------------------------------------
def test_encoder_packed_matches_naive_fp64_and_per_image():
    enc = randomize_(small_encoder())
    images, masks = batch(4, seed=3)
    assert len(set(masks.ctx_lens)) > 1, "want unequal lengths so the padded path runs"
    with torch.no_grad():
        packed = enc(images, masks.ctx_index, masks.ctx_cu_seqlens, masks.ctx_max_seqlen)
    assert packed.shape == (masks.ctx_index.numel(), 48)
    for b, seg in enumerate(segments(masks.ctx_cu_seqlens)):
        idx = local(masks.ctx_index[seg], b)
        ref = naive_encoder(images[b], idx, enc)
        torch.testing.assert_close(packed[seg].double(), ref, atol=5e-6, rtol=1e-5)
        with torch.no_grad():  # the same image alone through the module (no-padding fast path)
            alone = enc(images[b : b + 1], torch.as_tensor(idx, dtype=torch.int32),
                        torch.tensor([0, len(idx)], dtype=torch.int32), len(idx))
        torch.testing.assert_close(packed[seg], alone, atol=1e-5, rtol=1e-5)


def test_encoder_dense_equals_index_all():
    enc = randomize_(small_encoder())
    images, _ = batch(3, seed=1)
    with torch.no_grad():
        dense = enc(images)
        idx = torch.arange(3 * N, dtype=torch.int32)
        cu = torch.arange(0, 4 * N, N, dtype=torch.int32)
        packed = enc(images, idx, cu, N)
    assert dense.shape == (3, N, 48)
    torch.testing.assert_close(packed.view(3, N, 48), dense, atol=1e-6, rtol=1e-6)
    ref = naive_encoder(images[2], np.arange(N), enc)
    torch.testing.assert_close(dense[2].double(), ref, atol=5e-6, rtol=1e-5)


def test_encoder_bf16_autocast_packed_vs_per_image_and_fp32():
    enc = randomize_(small_encoder())
    images, masks = batch(4, seed=4)
    with torch.no_grad():
        fp32 = enc(images, masks.ctx_index, masks.ctx_cu_seqlens, masks.ctx_max_seqlen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            packed = enc(images, masks.ctx_index, masks.ctx_cu_seqlens, masks.ctx_max_seqlen)
            alone = []
            for b, seg in enumerate(segments(masks.ctx_cu_seqlens)):
                idx = torch.as_tensor(local(masks.ctx_index[seg], b), dtype=torch.int32)
                alone.append(enc(images[b : b + 1], idx, torch.tensor([0, len(idx)], dtype=torch.int32), len(idx)))
            alone = torch.cat(alone)
    assert packed.dtype == torch.bfloat16
    scale = fp32.abs().max()
    # bf16 packed vs bf16 per image: same maths, only the attention layout differs
    assert (packed.float() - alone.float()).abs().max() <= 0.01 * scale
    # bf16 vs fp32: a relative error of a few bf16 ulps (2^-8 = 0.4 %) after 2 blocks
    rel = (packed.float() - fp32).norm() / fp32.norm()
    assert rel < 2e-2, float(rel)
    assert rel > 0, "autocast should actually have run in bf16"


# ---------------------------------------------------------------------------------------------------
# predictor: packed == naive per (image, block) loop
# ---------------------------------------------------------------------------------------------------
def test_predictor_packed_matches_naive_loop():
    enc, pred = randomize_(small_encoder()), randomize_(small_predictor(), seed=9)
    images, masks = batch(4, seed=6)
    with torch.no_grad():
        ctx = enc(images, masks.ctx_index, masks.ctx_cu_seqlens, masks.ctx_max_seqlen)
        out = pred(ctx, masks)
    assert out.shape == (masks.tgt_index.numel(), 48)
    ctx_segs, tgt_segs = segments(masks.ctx_cu_seqlens), segments(masks.tgt_cu_seqlens)
    m = MASKS.num_targets
    for j, tseg in enumerate(tgt_segs):
        b = j // m
        ref = naive_predictor(ctx[ctx_segs[b]], local(masks.ctx_index[ctx_segs[b]], b),
                              local(masks.tgt_index[tseg], b), pred)
        torch.testing.assert_close(out[tseg].double(), ref, atol=5e-6, rtol=1e-5)


def test_predictor_bf16_autocast_close_to_fp32():
    enc, pred = randomize_(small_encoder()), randomize_(small_predictor(), seed=9)
    images, masks = batch(4, seed=7)
    with torch.no_grad():
        ctx = enc(images, masks.ctx_index, masks.ctx_cu_seqlens, masks.ctx_max_seqlen)
        fp32 = pred(ctx, masks)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = pred(ctx, masks)
        ref = torch.cat([
            naive_predictor(ctx[segments(masks.ctx_cu_seqlens)[j // 3]],
                            local(masks.ctx_index[segments(masks.ctx_cu_seqlens)[j // 3]], j // 3),
                            local(masks.tgt_index[seg], j // 3), pred)
            for j, seg in enumerate(segments(masks.tgt_cu_seqlens))
        ])
    rel = (bf.float().double() - ref).norm() / ref.norm()
    assert 0 < rel < 2e-2, float(rel)
    assert (fp32.double() - ref).norm() / ref.norm() < 1e-5


def test_gradients_reach_every_parameter():
    enc, pred = randomize_(small_encoder()), randomize_(small_predictor(), seed=9)
    enc.train(), pred.train()
    target = small_encoder(seed=2)
    images, masks = batch(3, seed=8)
    with torch.no_grad():
        h = target(images)
    ctx = enc(images, masks.ctx_index, masks.ctx_cu_seqlens, masks.ctx_max_seqlen)
    loss = jepa_target_loss(pred(ctx, masks), h, masks.tgt_index)
    loss.backward()
    for name, p in list(enc.named_parameters()) + list(pred.named_parameters()):
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    assert all(p.grad is None for p in target.parameters())


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_activation_checkpointing_gives_the_same_gradients(mode):
    """Recomputing blocks in the backward pass changes memory, not maths: loss and every gradient equal
    the plain run's (float64 so that recomputation order cannot hide behind rounding)."""
    def run(checkpointing):
        enc, pred = randomize_(small_encoder()).double(), randomize_(small_predictor(), seed=9).double()
        enc.train(), pred.train()
        enc.checkpointing = pred.checkpointing = checkpointing
        images, masks = batch(3, seed=8)
        images = images.double()
        h = small_encoder(seed=2).double()(images).detach()
        ctx = enc(images, masks.ctx_index, masks.ctx_cu_seqlens, masks.ctx_max_seqlen)
        loss = jepa_target_loss(pred(ctx, masks), h, masks.tgt_index)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in list(enc.named_parameters()) + list(pred.named_parameters())}

    ref_loss, ref = run("off")
    loss, got = run(mode)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-14, msg=name)


def test_activation_checkpointing_recomputes_each_block_once():
    """The checkpointed run enters every block's forward twice (once more in backward); the plain run once.
    (A pre-hook: non-reentrant recomputation stops early, before a forward hook would fire.)"""
    calls = {}
    enc = small_encoder(depth=3).train()
    enc.checkpointing = "non_reentrant"
    for i, blk in enumerate(enc.blocks):
        blk.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
    images, masks = batch(2, seed=1)
    enc(images, masks.ctx_index, masks.ctx_cu_seqlens, masks.ctx_max_seqlen).square().sum().backward()
    assert calls == {0: 2, 1: 2, 2: 2}
    calls.clear()
    with torch.no_grad():  # no backward, nothing to recompute: a frozen or target encoder runs plain
        enc(images)
    assert calls == {0: 1, 1: 1, 2: 1}


# ---------------------------------------------------------------------------------------------------
# initialisation (official: trunc-normal 0.02, zero bias, unit LN, residual projections / sqrt(2 (i + 1)))
# ---------------------------------------------------------------------------------------------------
def test_official_init_statistics():
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=4, in_chans=3, embed_dim=192, depth=4, num_heads=3)
    pred = Predictor((8, 8), embed_dim=192, pred_dim=96, depth=3, num_heads=3)
    for model in (enc, pred):
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                assert (p == 0).all(), name
            elif "norm" in name:
                assert (p == 1).all(), name
        for i, blk in enumerate(model.blocks):
            for lin, std in ((blk.attn.qkv, 0.02), (blk.mlp.fc1, 0.02),
                             (blk.attn.proj, 0.02 / math.sqrt(2 * (i + 1))),
                             (blk.mlp.fc2, 0.02 / math.sqrt(2 * (i + 1)))):
                w = lin.weight.detach().double()
                assert abs(w.mean()) < 0.1 * std
                assert abs(w.std() / std - 1) < 0.05, (i, std, float(w.std()))
    assert abs(enc.patch_embed.weight.std() / 0.02 - 1) < 0.05
    assert abs(pred.predictor_embed.weight.std() / 0.02 - 1) < 0.05
    assert abs(pred.mask_token.std() / 0.02 - 1) < 0.3 and pred.mask_token.abs().max() < 0.12


# ---------------------------------------------------------------------------------------------------
# presets and parameter counts
# ---------------------------------------------------------------------------------------------------
def vit_params(width, depth, ratio, patch=14, chans=3):
    """Parameters of the I-JEPA ViT without CLS token: patch conv + depth blocks + final LN.
    Block: 2 LN (2D each) + qkv (3D^2 + 3D) + proj (D^2 + D) + fc1 (D*hid + hid) + fc2 (hid*D + D)."""
    hid = int(width * ratio)
    block = 4 * width + 3 * width * width + 3 * width + width * width + width + 2 * width * hid + hid + width
    return chans * patch * patch * width + width + depth * block + 2 * width


def predictor_params(embed, width, depth, ratio=4.0):
    hid = int(width * ratio)
    block = 4 * width + 4 * width * width + 4 * width + 2 * width * hid + hid + width
    return embed * width + width + width + depth * block + 2 * width + width * embed + embed


def test_presets_match_official_table():
    # facebookresearch/ijepa src/models/vision_transformer.py: vit_tiny ... vit_giant
    assert PRESETS == {
        "tiny": (192, 12, 3, 4.0), "small": (384, 12, 6, 4.0), "base": (768, 12, 12, 4.0),
        "large": (1024, 24, 16, 4.0), "huge": (1280, 32, 16, 4.0), "giant": (1408, 40, 16, 48 / 11),
    }


@pytest.mark.parametrize("arch", list(PRESETS))
def test_preset_param_counts(arch):
    width, depth, heads, ratio = PRESETS[arch]
    with torch.device("meta"):
        enc = build_encoder(ModelConfig(arch=arch))
        pred = build_predictor(ModelConfig(arch=arch), enc)
    assert enc.embed_dim == width and len(enc.blocks) == depth and enc.num_heads == heads
    assert enc.blocks[0].mlp.fc1.out_features == round(width * ratio)  # giant: 1408 * 48/11 = 6144
    assert sum(p.numel() for p in enc.parameters()) == vit_params(width, depth, ratio)
    assert sum(p.numel() for p in pred.parameters()) == predictor_params(width, 384, 12)
    assert pred.blocks[0].attn.num_heads == heads  # official: predictor heads = encoder heads


def test_vit_h14_sizes():
    # 12 D^2 per block dominates: 32 * 12 * 1280^2 = 629.1M; + 13D/block, patch conv 3*14*14*1280, norms
    expected = 32 * (12 * 1280 ** 2 + 13 * 1280) + (3 * 14 * 14 * 1280 + 1280) + 2 * 1280
    assert expected == vit_params(1280, 32, 4.0) == 630_434_560
    with torch.device("meta"):
        enc = build_encoder(ModelConfig(arch="huge"))
        pred = build_predictor(ModelConfig(arch="huge"), enc)
    assert sum(p.numel() for p in enc.parameters()) == expected
    assert enc.grid == (16, 16) and enc.blocks[0].attn.head_dim == 80
    assert pred.blocks[0].attn.head_dim == 24 and len(pred.blocks) == 12
