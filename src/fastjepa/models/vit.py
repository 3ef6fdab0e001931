"""Vision Transformer blocks that run on packed token sets, and the I-JEPA context/target encoder.

Tokens are packed ``[T, D]`` with int32 ``cu_seqlens [S + 1]`` and a host ``max_seqlen``; a batch
of full images is the special case of ``B`` sequences of ``N`` tokens. Attention goes through
``fastjepa_kernels.varlen_attention``; everything else is row-wise, so packing changes nothing else.

Two paths through the blocks, chosen per call by :func:`fused_path` (the attention backend's rule):

- reference (``sdpa``; ``auto`` on CPU): the plain module chain ``x = x + attn(norm1(x))``,
  ``x = x + mlp(norm2(x))``; the residual stream has whatever dtype autocast gives it (bf16 under
  bf16 autocast: the patch embedding's output is bf16).
- fused (``triton``; ``auto`` on CUDA): flash-attention's fused-LN block. Each block takes and returns
  ``(hidden, residual)``, the stream being their sum, and every add is fused with the LayerNorm after
  it (``fastjepa_kernels.fused_add_layer_norm``): norm1 of block i + 1 takes the MLP output of block
  i, the final norm takes the last block's. ``fc1`` runs without its bias, which
  ``fastjepa_kernels.bias_gelu`` adds in fp32 with the GELU. The stream is kept in fp32
  (``residual_dtype="fp32"``, the official code's numerics: its ``x + pos_embed`` promotes to fp32)
  or in the tokens' dtype (``"bf16"``: bf16 under autocast, the reference path's dtype).

Parameters and state-dict keys are the same on both paths: the fused ops run inside the calls of
``norm1``, ``norm2``, ``norm`` and ``mlp.fc1`` (:class:`LayerNorm`, :class:`Linear`, subclasses of
torch's), so module hooks still see every parameter's use (DeepSpeed ZeRO-3 gathers them there).
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fastjepa_kernels
from fastjepa_kernels import bias_gelu, fused_add_layer_norm, gather_tokens, varlen_attention_qkvpacked
from fastjepa_kernels._backend import TRITON_AVAILABLE, TRITON_DTYPES

from ..config import ARCHS
from .pos_embed import sincos_2d

# name: (width, depth, heads, mlp_ratio) -- facebookresearch/ijepa src/models/vision_transformer.py
PRESETS = ARCHS
LN_EPS = 1e-6
RESIDUAL_DTYPES = ("fp32", "bf16")  # model.residual_dtype: the fused path's residual stream
# Whether attention_backend="auto" runs the blocks on the fused path for CUDA tensors (else the plain
# module chain, which train.compile can fuse with torch.compile). No GPU measurement of the two exists
# yet: True is to be confirmed by the device check (benchmarks/test_block.py).
FUSED_BLOCKS_UNDER_AUTO = True


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


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters, same state-dict keys) that can also take the residual add
    before it: ``norm(x)`` is the plain LayerNorm, ``norm(x, residual, fused=True, ...)`` is
    ``fastjepa_kernels.fused_add_layer_norm`` -> ``(normed, new_residual)``. Either way it runs as its
    own module call, so hooks on it fire (DeepSpeed ZeRO-3 gathers a module's parameters in one)."""

    def forward(self, x, residual=None, fused: bool = False, out_dtype=None, residual_dtype=None):
        if not fused:
            return super().forward(x)
        return fused_add_layer_norm(x, residual, self.weight, self.bias, self.eps, out_dtype=out_dtype,
                                    residual_dtype=residual_dtype, backend="triton")


class Linear(nn.Linear):
    """``nn.Linear`` whose ``forward(x, gelu=True)`` is ``gelu(x @ W^T + b)`` with the bias added in fp32
    by ``fastjepa_kernels.bias_gelu`` (the GEMM runs without it); plain ``forward(x)`` is nn.Linear's."""

    def forward(self, x, gelu: bool = False):
        if not gelu:
            return super().forward(x)
        return bias_gelu(F.linear(x, self.weight), self.bias, backend="triton")


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x, fused: bool = False):
        if fused:  # fc1's bias joins the exact GELU in one fp32 pass
            return self.fc2(self.fc1(x, gelu=True))
        return self.fc2(self.act(self.fc1(x)))


def fused_path(attention_backend: str, x: torch.Tensor) -> bool:
    """Whether blocks built for ``attention_backend`` run fused on ``x``: always with ``triton`` (CPU
    tensors under Triton's interpreter), never with ``sdpa``; with ``auto`` for CUDA tensors of a
    Triton dtype when Triton imports (and :data:`FUSED_BLOCKS_UNDER_AUTO`)."""
    ops = ops_backend(attention_backend)
    if ops != "auto":
        return ops == "triton"
    return FUSED_BLOCKS_UNDER_AUTO and TRITON_AVAILABLE and x.is_cuda and x.dtype in TRITON_DTYPES


def matmul_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the next Linear computes in: autocast's when it is on, else the weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


class Block(nn.Module):
    """Pre-norm transformer block. ``residual_dtype`` ("fp32" | "bf16") is the fused path's stream dtype."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, backend: str, residual_dtype: str = "fp32"):
        super().__init__()
        if residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(f"residual_dtype {residual_dtype!r} is unknown; choose one of {RESIDUAL_DTYPES}")
        self.backend, self.residual_dtype = backend, residual_dtype
        self.norm1 = LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, backend)
        self.norm2 = LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, cu_seqlens, max_seqlen, residual=None, carry: bool = False):
        """Plain (``carry=False``): the stream ``x [T, D]`` in, the stream out. Carrying (the fused path
        of :func:`run_blocks`): the stream is ``x + residual`` (``x`` alone for the first block, whose
        ``residual`` is None); returns ``(mlp output, stream before it)``, whose add is left to the
        next block's norm1 or the final norm."""
        if carry:
            return self.forward_fused(x, residual, cu_seqlens, max_seqlen)
        if not fused_path(self.backend, x):
            x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen)
            return x + self.mlp(self.norm2(x))
        hidden, residual = self.forward_fused(x, None, cu_seqlens, max_seqlen)
        return hidden + residual

    def forward_fused(self, hidden, residual, cu_seqlens, max_seqlen):
        """``(hidden, residual) -> (hidden, residual)`` with every add fused into the next LayerNorm."""
        stream = torch.float32 if self.residual_dtype == "fp32" else None  # None: the tokens' dtype
        out_dtype = matmul_dtype(hidden, self.attn.qkv.weight)
        normed, residual = self.norm1(hidden, residual, fused=True, out_dtype=out_dtype,
                                      residual_dtype=stream if residual is None else None)
        hidden = self.attn(normed, cu_seqlens, max_seqlen)
        normed, residual = self.norm2(hidden, residual, fused=True, out_dtype=out_dtype)
        return self.mlp(normed, fused=True), residual


def final_norm(norm: LayerNorm, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The encoder's or predictor's last LayerNorm fused with the last block's add (the fused path's
    end). Output in the stream's and the weight's promoted dtype: fp32 under autocast, as CUDA's
    autocast gives ``F.layer_norm``."""
    stream = residual.dtype if residual is not None else hidden.dtype
    normed, _ = norm(hidden, residual, fused=True, out_dtype=torch.promote_types(stream, norm.weight.dtype))
    return normed


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
               checkpointing: str = "off", carry: bool = False):
    """``x [T, D]`` through every block -> the stream ``[T, D]``; with ``carry`` (the fused path) the
    blocks pass ``(hidden, residual)`` along and this returns that pair, whose add the caller fuses
    with its final norm (:func:`final_norm`).

    ``checkpointing`` ("off", "reentrant", "non_reentrant") keeps only each block's input for the
    backward pass and recomputes the block there: activation memory falls from ~``T * D * 30`` bytes
    per block (bf16) to ``2 * T * D`` (carrying: hidden and residual, ``6 * T * D`` with an fp32
    stream), for one more forward per block. Reentrant is what DeepSpeed ZeRO-3 needs (its parameter
    hooks fire again in the recomputation)."""
    recompute = checkpointing != "off" and torch.is_grad_enabled() and x.requires_grad
    reentrant = checkpointing == "reentrant"
    if not carry:
        for blk in blocks:
            x = checkpoint(blk, x, cu_seqlens, max_seqlen, use_reentrant=reentrant) if recompute else \
                blk(x, cu_seqlens, max_seqlen)
        return x
    hidden, residual = x, None
    for blk in blocks:
        if recompute:
            hidden, residual = checkpoint(blk, hidden, cu_seqlens, max_seqlen, residual, True,
                                          use_reentrant=reentrant)
        else:
            hidden, residual = blk(hidden, cu_seqlens, max_seqlen, residual, True)
    return hidden, residual


def uniform_cu_seqlens(batch: int, length: int, device) -> torch.Tensor:
    """int32 ``[batch + 1]`` = 0, length, 2 length, ... (built on the device, no host copy)."""
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)


class VisionTransformer(nn.Module):
    """ViT encoder without CLS token. ``images [B, C, H, W]`` -> ``[B, N, D]``, or with
    ``index [T]`` (flat ``b * N + n``), ``cu_seqlens`` and ``max_seqlen`` -> packed ``[T, D]``."""

    def __init__(self, img_size=224, patch_size=14, in_chans=3, embed_dim=1280, depth=32, num_heads=16,
                 mlp_ratio=4.0, attention_backend="sdpa", checkpointing="off", residual_dtype="fp32"):
        super().__init__()
        self.checkpointing = checkpointing  # see run_blocks
        self.attention_backend = attention_backend
        self.patch_size, self.in_chans, self.embed_dim, self.num_heads = patch_size, in_chans, embed_dim, num_heads
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_2d(embed_dim, *self.grid), persistent=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, attention_backend, residual_dtype)
                                    for _ in range(depth))
        self.ops_backend = ops_backend(attention_backend)
        self.norm = LayerNorm(embed_dim, eps=LN_EPS)
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
        if fused_path(self.attention_backend, tokens):
            hidden, residual = run_blocks(self.blocks, tokens, cu_seqlens, max_seqlen, self.checkpointing, carry=True)
            tokens = final_norm(self.norm, hidden, residual)
        else:
            tokens = self.norm(run_blocks(self.blocks, tokens, cu_seqlens, max_seqlen, self.checkpointing))
        return tokens.view(batch, n, dim) if index is None else tokens

    def forward_intermediates(self, images: torch.Tensor, indices: int = 1) -> list[torch.Tensor]:
        """The outputs of the last ``indices`` blocks, each through the final norm: a list of ``[B, N, D]``,
        oldest first (timm's name for this seam; the last entry is ``forward(images)``)."""
        depth = len(self.blocks)
        if not 1 <= indices <= depth:
            raise ValueError(f"indices must be in 1..{depth} (the encoder's depth), got {indices}")
        x = self.patchify(images)
        batch, n, dim = x.shape
        x = (x + self.pos_embed.to(x.dtype)).reshape(batch * n, dim)
        cu_seqlens = uniform_cu_seqlens(batch, n, x.device)
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x, cu_seqlens, n)  # the plain stream (a fused block adds its residual back itself)
            if i >= depth - indices:
                out.append(self.norm(x).view(batch, n, dim))
        return out


def build_encoder(cfg) -> VisionTransformer:
    """An encoder from a ``ModelConfig`` (preset widths unless the config overrides them)."""
    width, depth, heads, ratio = cfg.shape()
    return VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=ratio, attention_backend=resolve_backend(cfg.attention_backend),
        checkpointing=cfg.activation_checkpointing, residual_dtype=cfg.residual_dtype,
    )


def resolve_backend(name: str) -> str:
    """``model.attention_backend`` -> a ``fastjepa_kernels`` backend. ``auto`` stays ``auto``: each call
    takes the Triton kernel for CUDA tensors and SDPA elsewhere (CPU runs, unsupported head dims)."""
    if name not in fastjepa_kernels.ATTENTION_BACKENDS:
        raise ValueError(f"model.attention_backend={name!r} is unknown (choose one of "
                         f"{', '.join(fastjepa_kernels.ATTENTION_BACKENDS)})")
    if name == "triton" and not fastjepa_kernels.TRITON_AVAILABLE:
        raise ValueError("model.attention_backend='triton' needs the triton package (pip install triton); "
                         "use 'auto' or 'sdpa'")
    if name == "auto" and torch.cuda.is_available() and not fastjepa_kernels.TRITON_AVAILABLE:
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
