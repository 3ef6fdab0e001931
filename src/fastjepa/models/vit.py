"""Vision Transformer blocks that run on packed token sets, and the I-JEPA context/target encoder.

Tokens are packed ``[T, D]`` with int32 ``cu_seqlens [S + 1]`` and a host ``max_seqlen``; a batch
of full images is the special case of ``B`` sequences of ``N`` tokens. Attention goes through
``fastjepa_kernels.varlen_attention``; everything else is row-wise, so packing changes nothing else.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from fastjepa_kernels import gather_tokens, varlen_attention_qkvpacked

from .pos_embed import sincos_2d

# name: (width, depth, heads, mlp_ratio) -- facebookresearch/ijepa src/models/vision_transformer.py
PRESETS = {
    "tiny": (192, 12, 3, 4.0),
    "small": (384, 12, 6, 4.0),
    "base": (768, 12, 12, 4.0),
    "large": (1024, 24, 16, 4.0),
    "huge": (1280, 32, 16, 4.0),
    "giant": (1408, 40, 16, 48 / 11),
}
LN_EPS = 1e-6


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        tokens = x.shape[0]
        # packed qkv: the Triton backward writes one [T, 3, H, d] gradient instead of stacking dq, dk, dv
        qkv = self.qkv(x).view(tokens, 3, self.num_heads, self.head_dim)
        out = varlen_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, backend=self.backend)
        return self.proj(out.reshape(tokens, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, backend)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, cu_seqlens, max_seqlen):
        x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen)
        return x + self.mlp(self.norm2(x))


def init_weights(module: nn.Module, blocks: nn.ModuleList) -> None:
    """Official init: trunc-normal(0.02) weights, zero biases, then the residual output projections
    of block i divided by sqrt(2 (i + 1))."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for i, blk in enumerate(blocks):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
               checkpointing: str = "off") -> torch.Tensor:
    """``x [T, D]`` through every block. ``checkpointing`` ("off", "reentrant", "non_reentrant") keeps only
    each block's input for the backward pass and recomputes the block there: activation memory falls
    from ~``T * D * 30`` bytes per block (bf16) to ``2 * T * D``, for one more forward per block.
    Reentrant is what DeepSpeed ZeRO-3 needs (its parameter hooks fire again in the recomputation)."""
    if checkpointing == "off" or not (torch.is_grad_enabled() and x.requires_grad):
        for blk in blocks:
            x = blk(x, cu_seqlens, max_seqlen)
        return x
    reentrant = checkpointing == "reentrant"
    for blk in blocks:
        x = checkpoint(blk, x, cu_seqlens, max_seqlen, use_reentrant=reentrant)
    return x


def uniform_cu_seqlens(batch: int, length: int, device) -> torch.Tensor:
    """int32 ``[batch + 1]`` = 0, length, 2 length, ... (built on the device, no host copy)."""
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)


class VisionTransformer(nn.Module):
    """ViT encoder without CLS token. ``images [B, C, H, W]`` -> ``[B, N, D]``, or with
    ``index [T]`` (flat ``b * N + n``), ``cu_seqlens`` and ``max_seqlen`` -> packed ``[T, D]``."""

    def __init__(self, img_size=224, patch_size=14, in_chans=3, embed_dim=1280, depth=32, num_heads=16,
                 mlp_ratio=4.0, attention_backend="sdpa", checkpointing="off"):
        super().__init__()
        self.checkpointing = checkpointing  # see run_blocks
        self.patch_size, self.in_chans, self.embed_dim, self.num_heads = patch_size, in_chans, embed_dim, num_heads
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_2d(embed_dim, *self.grid), persistent=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, attention_backend) for _ in range(depth))
        self.ops_backend = ops_backend(attention_backend)
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        init_weights(self, self.blocks)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> patch features ``[B, N, D]``, contiguous (before position embeddings).

        A channels-last input makes the conv write ``[B, h, w, D]`` memory, so ``[B, N, D]`` is contiguous
        with no copy and the token gather's row loads are unit-stride (vectorised); ``contiguous()``
        copies only where the conv does not keep the layout (e.g. one input channel)."""
        x = self.patch_embed(images.contiguous(memory_format=torch.channels_last))
        return x.flatten(2).transpose(1, 2).contiguous()

    def forward(self, images, index=None, cu_seqlens=None, max_seqlen=None):
        x = self.patchify(images)
        batch, n, dim = x.shape
        if index is None:
            tokens = (x + self.pos_embed.to(x.dtype)).reshape(batch * n, dim)
            cu_seqlens, max_seqlen = uniform_cu_seqlens(batch, n, x.device), n
        else:
            # a mask picks each patch at most once: the kernel's backward needs no atomics
            tokens = gather_tokens(x, index, self.pos_embed.to(x.dtype), backend=self.ops_backend, unique=True)
        tokens = self.norm(run_blocks(self.blocks, tokens, cu_seqlens, max_seqlen, self.checkpointing))
        return tokens.view(batch, n, dim) if index is None else tokens


def build_encoder(cfg) -> VisionTransformer:
    """An encoder from a ``ModelConfig`` (preset widths unless the config overrides them)."""
    width, depth, heads, ratio = PRESETS[cfg.arch]
    return VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim or width, depth=cfg.depth or depth, num_heads=cfg.num_heads or heads,
        mlp_ratio=cfg.mlp_ratio or ratio, attention_backend=resolve_backend(cfg.attention_backend),
        checkpointing=cfg.activation_checkpointing,
    )


def resolve_backend(name: str) -> str:
    """``model.attention_backend`` -> a ``fastjepa_kernels`` backend. ``auto`` stays ``auto``: each call
    takes the Triton kernel for CUDA tensors and SDPA elsewhere (CPU runs, unsupported head dims)."""
    from fastjepa_kernels import ATTENTION_BACKENDS, TRITON_AVAILABLE

    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention_backend={name!r} is unknown (choose one of {', '.join(ATTENTION_BACKENDS)})")
    if name == "triton" and not TRITON_AVAILABLE:
        raise ValueError("model.attention_backend='triton' needs the triton package (pip install triton); "
                         "use 'auto' or 'sdpa'")
    if name == "auto" and torch.cuda.is_available() and not TRITON_AVAILABLE:
        _say_once("fastjepa: triton not installed; attention runs on PyTorch SDPA (pip install triton for the fused kernels)")
    return name


def ops_backend(attention_backend: str) -> str:
    """The backend of the other fused ops (gather, target loss, EMA) that goes with an attention backend:
    ``triton`` with ``triton``, the PyTorch ``reference`` with ``sdpa``, ``auto`` with ``auto``."""
    return "reference" if attention_backend == "sdpa" else attention_backend


_SAID: set = set()


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        print(message, file=sys.stderr)
