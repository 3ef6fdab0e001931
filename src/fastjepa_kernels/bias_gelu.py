"""Fused bias + exact GELU: ``y = gelu(x + bias)``, the MLP's ``fc1`` epilogue.

Shapes: ``x [..., F]`` (rows flattened to ``[T, F]``) fp32/bf16/fp16, ``bias [F]`` (fp32 or x's dtype);
``y`` in x's dtype. Maths in fp32, with ``z = x + bias``::

    gelu(z)  = z * Phi(z) = 0.5 z (1 + erf(z / sqrt 2))                 (the exact, erf GELU)
    gelu'(z) = Phi(z) + z phi(z),   phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
    dx = dy * gelu'(z),             dbias = sum_rows dx (in fp32, before dx is rounded)

so the bias is added in fp32 and ``z`` is never rounded (the unfused chain rounds ``fc1``'s biased
output to bf16 before the GELU). ``nn.GELU()``'s default (``approximate="none"``) is this function.

Backends: ``reference`` (``F.gelu(x.float() + bias.float())`` cast to x's dtype; autograd does the
backward), ``triton`` (custom ops ``fastjepa_kernels::bias_gelu_fwd`` / ``_bwd`` with fake impls for
``torch.compile``), ``auto`` (triton on CUDA tensors when Triton imports, the reference elsewhere).

Triton design: elementwise on ``BLOCK_T x BLOCK_F`` tiles (a 2-D grid; 16-byte vector loads of bf16).
The forward reads x once and writes y; only x (not z or y) is kept for the backward. The backward
recomputes ``z`` and runs on a grid of (``ROW_CHUNKS`` contiguous row ranges) x (column tiles): each
program writes ``dx`` for its rows and one fp32 partial column sum of ``dx`` into ``[chunks, F]``,
which torch sums in a fixed order. No atomics: dbias is bit-for-bit repeatable, and the chunk count is
a function of T only, so the bits do not depend on the GPU either.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import TRITON_DTYPES, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without Triton (reference backend only)
    triton = None
    tl = None

BACKENDS = ("reference", "triton", "auto")


# ---------------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------------
def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x + bias)`` (exact erf GELU) in fp32, cast to x's dtype; autocast off."""
    with torch.autocast(x.device.type, enabled=False):
        return F.gelu(x.float() + bias.float()).to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------
# 32 rows x 128 columns: 4096 elements, 32 per thread with 4 warps (16-byte loads of bf16); memory-bound,
# so the tile only has to keep enough bytes in flight. F % 128 != 0 masks lanes, not bandwidth.
BLOCK_T, BLOCK_F, NUM_WARPS = 32, 128, 4
# Backward row ranges: at most this many per column tile. ViT-H's MLP (F 5120, 40 column tiles) then
# runs 5120 programs; the fp32 partials are 128 x F (2.6 MB at F 5120), ~1 % of the backward's bytes
# at the context encoder's 14 k rows.
ROW_CHUNKS = 128
_empty = torch.empty  # output allocator; tests swap in a NaN-filled one to catch unwritten elements


# ---------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _bias_gelu_fwd_kernel(X, BIAS, Y, T, F, stride_x, stride_y,
                              BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
        """``Y = z Phi(z)`` with ``z = X + BIAS`` in fp32."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        rows64 = rows.to(tl.int64)
        col_ok = cols < F
        mask = (rows < T)[:, None] & col_ok[None, :]
        z = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))  # 1 / sqrt(2)
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _bias_gelu_bwd_kernel(X, BIAS, DY, DX, DB_PART, T, F, rows_per_chunk, stride_x, stride_dy, stride_dx,
                              BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
        """Rows ``[chunk * rows_per_chunk, ...)`` of one column tile: ``DX = DY gelu'(X + BIAS)``,
        ``DB_PART[chunk, cols] = sum DX`` (fp32, before rounding)."""
        chunk = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        col_ok = cols < F
        bias = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
        start = chunk * rows_per_chunk
        end = tl.minimum(start + rows_per_chunk, T)
        # (while, not range(start, end, ...): Triton's interpreter cannot take a runtime bound in range())
        while start < end:
            rows = start + tl.arange(0, BLOCK_T)
            rows64 = rows.to(tl.int64)
            mask = (rows < end)[:, None] & col_ok[None, :]
            z = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            z += bias[None, :]
            dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))  # Phi(z)
            pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327  # phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
            dx = dy * (cdf + z * pdf)
            tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            acc += dx  # masked lanes: dy = 0 there
            start += BLOCK_T
        tl.store(DB_PART + chunk.to(tl.int64) * F + cols, tl.sum(acc, axis=0), mask=col_ok)


# ---------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------
def _bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x ``[T, F]`` (unit column stride), bias ``[F]`` -> y ``[T, F]`` in x's dtype."""
    t, f = x.shape
    y = _empty(t, f, device=x.device, dtype=x.dtype)
    if t and f:
        _bias_gelu_fwd_kernel[(triton.cdiv(t, BLOCK_T), triton.cdiv(f, BLOCK_F))](
            x, bias, y, t, f, x.stride(0), y.stride(0), BLOCK_T=BLOCK_T, BLOCK_F=BLOCK_F, num_warps=NUM_WARPS)
    return y


def bwd_chunks(t: int) -> tuple[int, int]:
    """``(chunks, rows_per_chunk)``: at most ``ROW_CHUNKS`` ranges of whole tiles, from ``t`` alone."""
    tiles = triton.cdiv(t, BLOCK_T)
    rows_per_chunk = BLOCK_T * triton.cdiv(tiles, min(tiles, ROW_CHUNKS))
    return triton.cdiv(t, rows_per_chunk), rows_per_chunk


def _bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor):
    """Returns ``(dx [T, F] in x's dtype, dbias [F] in bias's dtype)``."""
    t, f = x.shape
    dx = _empty(t, f, device=x.device, dtype=x.dtype)
    if t == 0 or f == 0:
        return dx, torch.zeros(f, device=x.device, dtype=bias.dtype)
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    chunks, rows_per_chunk = bwd_chunks(t)
    partial = _empty(chunks, f, device=x.device, dtype=torch.float32)
    _bias_gelu_bwd_kernel[(chunks, triton.cdiv(f, BLOCK_F))](
        x, bias, dy, dx, partial, t, f, rows_per_chunk, x.stride(0), dy.stride(0), dx.stride(0),
        BLOCK_T=BLOCK_T, BLOCK_F=BLOCK_F, num_warps=NUM_WARPS)
    return dx, partial.sum(0).to(bias.dtype)


# ---------------------------------------------------------------------------------------------------
# custom ops and autograd
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastjepa_kernels::bias_gelu_fwd", mutates_args=())
def _bias_gelu_fwd_op(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Triton ``gelu(x + bias)`` of ``[T, F]`` rows, in x's dtype."""
    return _bias_gelu_fwd(x, bias)


@_bias_gelu_fwd_op.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastjepa_kernels::bias_gelu_bwd", mutates_args=())
def _bias_gelu_bwd_op(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx in x's dtype, dbias in bias's dtype)``."""
    return _bias_gelu_bwd(dy, x, bias)


@_bias_gelu_bwd_op.register_fake
def _(dy, x, bias):
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


def _bias_gelu_setup(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _bias_gelu_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    return _bias_gelu_bwd_op(dy, x, bias)


_bias_gelu_fwd_op.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup)


# ---------------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------------
def bias_gelu(x: torch.Tensor, bias: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``gelu(x + bias)`` with the exact (erf) GELU, in x's dtype; the sum is formed in fp32.

    x: ``[..., F]`` fp32/bf16/fp16; bias: ``[F]`` in fp32 or x's dtype. Gradients to both (dbias in
    bias's dtype, summed in fp32)."""
    f = x.shape[-1]
    if bias.shape != (f,):
        raise ValueError(f"bias {tuple(bias.shape)} does not match x {tuple(x.shape)}: want [{f}]")
    if bias.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"bias must be fp32 or x's dtype {x.dtype}, got {bias.dtype}")
    if not use_triton("bias-gelu", backend, (x, bias), TRITON_DTYPES):
        return bias_gelu_reference(x, bias)
    rows = x.reshape(-1, f)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    return _bias_gelu_fwd_op(rows, bias).view(x.shape)


# ---------------------------------------------------------------------------------------------------
# ahead-of-time variants
# ---------------------------------------------------------------------------------------------------
def aot_specs():
    """Every variant the launchers pick: one tile, forward and backward, per (x dtype, bias in fp32 or
    x's dtype). Names start with ``bias_gelu``."""
    if triton is None:
        return []
    from .aot import AotSpec

    specs = []
    consts = dict(BLOCK_T=BLOCK_T, BLOCK_F=BLOCK_F)
    cfg = f"BT{BLOCK_T},BF{BLOCK_F},w{NUM_WARPS}"
    for x in TRITON_DTYPES.values():
        for b in dict.fromkeys((x, "fp32")):
            sig = {"X": f"*{x}", "BIAS": f"*{b}", "Y": f"*{x}", "T": "i32", "F": "i32", "stride_x": "i32",
                   "stride_y": "i32", "BLOCK_T": "constexpr", "BLOCK_F": "constexpr"}
            specs.append(AotSpec(f"bias_gelu_fwd[{x},bias_{b},{cfg}]", _bias_gelu_fwd_kernel, sig, consts,
                                 num_warps=NUM_WARPS))
            sig = {"X": f"*{x}", "BIAS": f"*{b}", "DY": f"*{x}", "DX": f"*{x}", "DB_PART": "*fp32", "T": "i32",
                   "F": "i32", "rows_per_chunk": "i32", "stride_x": "i32", "stride_dy": "i32", "stride_dx": "i32",
                   "BLOCK_T": "constexpr", "BLOCK_F": "constexpr"}
            specs.append(AotSpec(f"bias_gelu_bwd[{x},bias_{b},{cfg}]", _bias_gelu_bwd_kernel, sig, consts,
                                 num_warps=NUM_WARPS))
    return specs
