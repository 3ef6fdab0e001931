"""Non-causal attention over packed variable-length sequences.

Layout (the flash-attn varlen convention): ``q, k, v`` are ``[T, H, d]`` where ``T = sum(lengths)``;
``cu_seqlens`` is int32 ``[B + 1]`` with ``cu_seqlens[i]`` the first row of sequence ``i``;
``max_seqlen`` is a host int. Token ``t`` of sequence ``i`` attends to every token of sequence ``i``
and to nothing else.

Backends:
- ``sdpa``: the reference. Equal lengths (a full-image batch) go straight to
  ``scaled_dot_product_attention`` on ``[B, H, L, d]``; unequal lengths are padded to ``max_seqlen``
  with a key-padding mask, all index maths on the device, so the host never waits.
- ``triton``: the fused kernel, added by the kernels issue behind this same function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa",)  # "triton" joins with the fused kernel


def _padding_layout(cu_seqlens: torch.Tensor, max_seqlen: int, total: int):
    """Device-side maps between packed rows and a ``[B, max_seqlen]`` padded grid, all flat int64.

    Returns ``pad_src [B * L]`` (packed row feeding each padded slot, 0 for padding), ``valid [B, L]``
    (bool) and ``unpad [T]`` (padded slot of each packed row). No host sync.
    """
    cu = cu_seqlens.long()
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    cols = torch.arange(max_seqlen, device=cu.device)
    valid = cols[None, :] < lengths[:, None]
    pad_src = torch.where(valid, starts[:, None] + cols[None, :], 0).reshape(-1)
    rows = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:], rows, right=True)
    unpad = seq * max_seqlen + (rows - starts[seq])
    return pad_src, valid, unpad


def varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen: int, softmax_scale=None):
    """Plain-PyTorch varlen attention (SDPA on a padded batch). Shapes as in the module docstring.

    Gathers use ``index_select`` (its backward is ``index_add``, far cheaper on CPU than the
    ``index_put`` behind advanced indexing)."""
    total, heads, dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    if batch * max_seqlen == total:  # every sequence has max_seqlen tokens: no padding at all
        qb, kb, vb = (t.view(batch, max_seqlen, heads, dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb, scale=softmax_scale)
        return out.transpose(1, 2).reshape(total, heads, dim)
    pad_src, valid, unpad = _padding_layout(cu_seqlens, max_seqlen, total)
    qb, kb, vb = (t.index_select(0, pad_src).view(batch, max_seqlen, heads, dim).transpose(1, 2) for t in (q, k, v))
    key_mask = valid[:, None, None, :]  # padded keys never receive weight
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=key_mask, scale=softmax_scale)
    return out.transpose(1, 2).reshape(batch * max_seqlen, heads, dim).index_select(0, unpad)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Attention within each packed sequence. q, k, v ``[T, H, d]`` -> out ``[T, H, d]`` (q's dtype)."""
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be [T, H, d]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor of length batch + 1")
    if backend == "sdpa":
        return varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
