"""Drop-in packed variable-length attention for timm ViTs.

- ``VarlenAttention``: the same parameters and state-dict names as timm's
  ``timm.layers.Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate``,
  ``proj``, ``proj_drop``), so a timm checkpoint loads strictly. ``forward(x [B, N, C])`` is timm's
  full attention; ``forward(x [T, C], cu_seqlens=, max_seqlen=)`` attends within each packed sequence
  through ``varlen_attention``.
- ``patch_vit(model)``: swaps every ``Block.attn`` of a timm ``VisionTransformer`` for a
  ``VarlenAttention`` sharing the same parameter tensors (an optimizer built before patching stays
  valid) and binds ``model.pack_tokens`` / ``model.forward_packed``.
- ``pack_tokens(model, images, keep)``: patch embed + timm's own ``_pos_embed`` (class / register
  tokens, ``no_embed_class``), then keep every prefix token and the chosen patches of each image.
- ``forward_packed(model, tokens, cu_seqlens, max_seqlen)``: the blocks (timm ``Block`` residual
  structure) and the final ``norm`` on packed tokens.

Packed layout as in ``attention.py``: ``tokens [T, C]``, ``cu_seqlens`` int32 ``[B + 1]``,
``max_seqlen`` a host int. Imports only torch; timm is never imported here (duck-typed).
"""
from __future__ import annotations

import inspect
import types
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import attention as _attention
from .attention import varlen_attention

# The fused packed-qkv entry (one [T, 3, H, d] read, no unbind copies) arrives with the Triton kernel;
# until then q, k, v go through varlen_attention as strided views.
_varlen_qkvpacked = getattr(_attention, "varlen_attention_qkvpacked", None)
# "auto" is the new default of the attention entry; an older attention.py only knows "sdpa".
_ATTN_KNOWS_AUTO = "auto" in getattr(_attention, "BACKENDS", ()) or (
    inspect.signature(varlen_attention).parameters["backend"].default == "auto"
)


def _attention_backend(backend: str) -> str:
    return "sdpa" if backend == "auto" and not _ATTN_KNOWS_AUTO else backend


class VarlenAttention(nn.Module):
    """timm-compatible multi-head self-attention that also runs on packed variable-length tokens.

    Constructor arguments follow ``timm.layers.Attention``; ``norm_layer`` defaults to
    ``nn.LayerNorm`` when ``qk_norm`` or ``scale_norm`` needs one. ``backend`` is passed to
    ``varlen_attention`` ("auto": Triton on CUDA, SDPA elsewhere); the padded path always uses SDPA,
    as timm's fused path does.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[type] = None,
        backend: str = "auto",
        *,
        attn_head_dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        scale_norm: bool = False,
        gated: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
            head_dim = dim // num_heads
        if norm_layer is None:
            norm_layer = nn.LayerNorm
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim**-0.5
        self.backend = backend

        # Attribute names and creation order match timm so state dicts map one to one.
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(cls, attn: nn.Module, backend: str = "auto") -> VarlenAttention:
        """Wrap a ``timm.layers.Attention``: the new module holds the SAME submodules (parameters are
        shared, not copied), so weights, optimizer state and ``state_dict`` keys carry over."""
        for name in ("qkv", "proj", "num_heads"):
            if not hasattr(attn, name):
                raise TypeError(f"{type(attn).__name__} has no {name!r}; expected a timm Attention")
        head_dim = getattr(attn, "head_dim", attn.qkv.out_features // (3 * attn.num_heads))
        # Built on the meta device: its own parameters are replaced right away, never allocated.
        new = cls(
            attn.qkv.in_features,
            attn.num_heads,
            qkv_bias=attn.qkv.bias is not None,
            proj_bias=attn.proj.bias is not None,
            backend=backend,
            attn_head_dim=head_dim,
            dim_out=attn.proj.out_features,
            device="meta",
        )
        new.scale = getattr(attn, "scale", new.scale)
        new.qkv, new.proj = attn.qkv, attn.proj
        for name in ("q_norm", "k_norm", "attn_drop", "norm", "proj_drop"):
            if getattr(attn, name, None) is not None:  # older timm has no scale ``norm``
                setattr(new, name, getattr(attn, name))
        new.gate = getattr(attn, "gate", None)
        new.train(attn.training)
        return new

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        *,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
    ) -> torch.Tensor:
        """``x [B, N, C]`` -> ``[B, N, C_out]`` (timm semantics, ``attn_mask`` / ``is_causal`` passed to
        SDPA), or ``x [T, C]`` with ``cu_seqlens`` (int32 ``[B + 1]``) and ``max_seqlen`` (host int;
        computed with a host sync when omitted) -> ``[T, C_out]``."""
        if cu_seqlens is None:
            return self._forward_padded(x, attn_mask, is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("the packed path takes no attn_mask / is_causal: sequences are delimited by cu_seqlens")
        return self._forward_packed(x, cu_seqlens, max_seqlen)

    def _forward_padded(self, x, attn_mask, is_causal):
        batch, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.scale,
        )
        out = out.transpose(1, 2).reshape(batch, n, self.attn_dim)
        return self._out(out, gate)

    def _forward_packed(self, x, cu_seqlens, max_seqlen):
        if x.dim() != 2:
            raise ValueError(f"packed input must be [T, C]; got {tuple(x.shape)}")
        if self.training and self.attn_drop.p > 0:
            raise NotImplementedError("attention dropout is not supported on packed tokens (attn_drop must be 0)")
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # host sync
        total = x.shape[0]
        backend = _attention_backend(self.backend)
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).view(total, 3, self.num_heads, self.head_dim)
        no_qk_norm = isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)
        if no_qk_norm and _varlen_qkvpacked is not None:
            out = _varlen_qkvpacked(qkv, cu_seqlens, max_seqlen, softmax_scale=self.scale, backend=backend)
        else:
            q, k, v = qkv.unbind(1)
            q, k = self.q_norm(q), self.k_norm(k)  # norms act on head_dim, as in timm's [B, H, N, d]
            out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=self.scale, backend=backend)
        return self._out(out.reshape(total, self.attn_dim), gate)

    def _out(self, x, gate):
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"


# ----------------------------------------------------------------------------------------------------
# timm VisionTransformer patching
# ----------------------------------------------------------------------------------------------------

def _check_block(block: nn.Module) -> None:
    # ResPostBlock, ParallelScalingBlock, ... share attribute names but not the residual structure.
    if type(block).__name__ != "Block" or not all(hasattr(block, n) for n in ("norm1", "attn", "norm2", "mlp")):
        raise TypeError(f"forward_packed supports timm's pre-norm Block only, got {type(block).__name__}")
    if type(block.attn).__name__ not in ("Attention", "VarlenAttention"):
        raise TypeError(f"cannot convert {type(block.attn).__name__} (rope / custom attention) to VarlenAttention")


def patch_vit(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Give a timm ``VisionTransformer`` packed-token support, in place; returns ``model``.

    Each ``blocks[i].attn`` becomes ``VarlenAttention.from_timm`` (shared parameters, unchanged
    ``state_dict``; the padded ``model(x)`` computes the same function). Binds
    ``model.pack_tokens(images, keep)`` and ``model.forward_packed(tokens, cu_seqlens, max_seqlen)``.
    """
    for block in model.blocks:
        _check_block(block)
    for block in model.blocks:
        if isinstance(block.attn, VarlenAttention):
            block.attn.backend = backend
        else:
            block.attn = VarlenAttention.from_timm(block.attn, backend=backend)
    model.pack_tokens = types.MethodType(pack_tokens, model)
    model.forward_packed = types.MethodType(forward_packed, model)
    return model


def _cu_seqlens(lengths: Sequence[int], device) -> tuple[torch.Tensor, int]:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device), max(int(n) for n in lengths)


def pack_tokens(
    model: nn.Module,
    images: torch.Tensor,
    keep: Union[torch.Tensor, Sequence[torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Embed ``images [B, C_in, H, W]`` and pack the kept tokens of each image.

    ``keep``: a bool mask ``[B, N]`` over the ``N`` patches (True = keep; one host sync for the
    lengths) or a list of ``B`` int64 index tensors (any order, kept as given; no sync). Every
    sequence starts with the model's prefix tokens (class and register tokens), then its kept
    patches, so each image's sequence equals its own unpadded token set. Positions come from timm's
    ``_pos_embed`` (so ``no_embed_class``, ``pos_drop`` and dynamic sizes behave as in timm), then
    ``norm_pre``; timm's ``patch_drop`` is not applied (``keep`` replaces it).

    Returns ``tokens [T, D]``, ``cu_seqlens`` int32 ``[B + 1]``, ``max_seqlen`` (host int).
    """
    x = model._pos_embed(model.patch_embed(images))  # [B, P + N, D], prefix tokens first
    batch, seq, dim = x.shape
    prefix = getattr(model, "num_prefix_tokens", 0)
    flat = x.reshape(batch * seq, dim)
    if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool:
        if keep.shape != (batch, seq - prefix):
            raise ValueError(f"keep mask must be [B, N] = {(batch, seq - prefix)}; got {tuple(keep.shape)}")
        full = torch.cat([keep.new_ones(batch, prefix), keep.to(x.device)], dim=1)
        rows = full.reshape(-1).nonzero().squeeze(1)  # row-major: per image, prefix then patches
        cu_seqlens = F.pad(full.sum(1).cumsum(0), (1, 0)).to(torch.int32)
        max_seqlen = int(full.sum(1).max())  # host sync
    else:
        if len(keep) != batch:
            raise ValueError(f"need one index tensor per image: {len(keep)} for batch {batch}")
        pre = torch.arange(prefix, device=x.device)
        rows = torch.cat([torch.cat([pre, prefix + idx.to(x.device).long()]) + b * seq for b, idx in enumerate(keep)])
        cu_seqlens, max_seqlen = _cu_seqlens([prefix + idx.numel() for idx in keep], x.device)
    tokens = model.norm_pre(flat.index_select(0, rows))
    return tokens, cu_seqlens, max_seqlen


def _packed_drop_path(x: torch.Tensor, drop_path: nn.Module, seq_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """Stochastic depth per packed sequence (timm's ``DropPath`` would drop single tokens of [T, C])."""
    p = float(getattr(drop_path, "drop_prob", 0.0) or 0.0)
    if isinstance(drop_path, nn.Identity) or p == 0.0 or not drop_path.training:
        return x
    keep_prob = 1.0 - p
    mask = x.new_empty(batch).bernoulli_(keep_prob)
    if keep_prob > 0.0 and getattr(drop_path, "scale_by_keep", True):
        mask.div_(keep_prob)
    return x * mask.index_select(0, seq_ids)[:, None]


def _block_packed(block, x, cu_seqlens, max_seqlen, seq_ids, batch):
    identity = nn.Identity()
    ls1, ls2 = getattr(block, "ls1", identity), getattr(block, "ls2", identity)
    dp1, dp2 = getattr(block, "drop_path1", identity), getattr(block, "drop_path2", identity)
    x = x + _packed_drop_path(ls1(block.attn(block.norm1(x), cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)), dp1, seq_ids, batch)
    return x + _packed_drop_path(ls2(block.mlp(block.norm2(x))), dp2, seq_ids, batch)


def forward_packed(
    model: nn.Module,
    tokens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
) -> torch.Tensor:
    """Run a patched ViT's blocks and final ``norm`` on packed tokens ``[T, D]`` -> ``[T, D]``.

    Honors ``model.set_grad_checkpointing()`` (one checkpoint per block)."""
    batch = cu_seqlens.shape[0] - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_ids = torch.repeat_interleave(torch.arange(batch, device=tokens.device), lengths, output_size=tokens.shape[0])
    checkpointing = getattr(model, "grad_checkpointing", False) and torch.is_grad_enabled()
    x = tokens
    for block in model.blocks:
        if not isinstance(block.attn, VarlenAttention):
            raise TypeError("call patch_vit(model) before forward_packed")
        if checkpointing:
            x = torch.utils.checkpoint.checkpoint(
                _block_packed, block, x, cu_seqlens, max_seqlen, seq_ids, batch, use_reentrant=False
            )
        else:
            x = _block_packed(block, x, cu_seqlens, max_seqlen, seq_ids, batch)
    return model.norm(x)
