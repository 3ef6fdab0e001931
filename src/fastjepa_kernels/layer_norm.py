"""Fused residual add + LayerNorm: ``new_residual = x + residual``, ``normed = LN(new_residual)``.

Shapes: ``x [..., D]`` (rows flattened to ``[T, D]``), ``residual`` like ``x`` or None, ``weight`` and
``bias`` ``[D]``. Maths, per row, in fp32 whatever the storage dtypes::

    s      = round_r(x + residual)            # round_r: to new_residual's dtype (the stream's)
    mean   = sum(s) / D,  var = sum((s - mean)^2) / D,  rstd = 1 / sqrt(var + eps)
    normed = round_o((s - mean) * rstd * weight + bias)

so the LayerNorm sees exactly the stream tensor that is stored (a bf16 stream is normalised after its
rounding, like ``F.layer_norm`` of the bf16 sum). Backward, with ``xhat = (s - mean) * rstd``,
``g = dnormed * weight`` and ``dnew`` the gradient reaching ``new_residual`` directly (the next
block's residual branch)::

    dtotal = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dnew,    dx = dresidual = dtotal
    dweight = sum_rows dnormed * xhat,                                dbias = sum_rows dnormed

This is the pre-norm transformer's ``x = x + f(LN(x))`` written the way flash-attention's fused-LN
blocks carry it: the add that ends block ``i`` and the LayerNorm that starts block ``i + 1`` are one pass.

Backends: ``reference`` (the add, ``F.layer_norm`` in fp32 and a cast, in PyTorch; autograd does the
backward), ``triton`` (custom ops ``fastjepa_kernels::add_layer_norm_fwd`` / ``_bwd`` with fake impls
for ``torch.compile``), ``auto`` (triton on CUDA tensors when Triton imports, the reference elsewhere).

Triton design:
- forward: one program per ``BLOCK_T`` rows, each whole row in registers (``BLOCK_D`` = the next power
  of two >= D, masked, so any D up to ``MAX_BLOCK_D``; ViT-g's 1408 is one 2048-wide block). It reads
  ``x`` and ``residual`` once, writes ``new_residual`` (skipped when it would equal ``x``), ``normed``
  and fp32 ``mean`` / ``rstd`` per row. Two-pass statistics over the registers (mean, then the centred
  sum of squares), so no cancellation.
- backward: a fixed number of programs (``MAX_BWD_PROGRAMS``, a function of T only), each walking a
  contiguous range of rows ``BLOCK_T`` at a time: it writes ``dx`` (and ``dresidual`` in the stream's
  dtype when that differs from ``x``'s, in the same pass) and keeps fp32 column sums of
  ``dnormed * xhat`` and ``dnormed`` in registers, stored once per program to ``[programs, D]``
  partials that torch sums in a fixed order. No atomics: the gradients are bit-for-bit repeatable.
- ``weight``/``bias`` are read as fp32 (converted once in the launcher when the model holds them in
  bf16, e.g. DeepSpeed's bf16 mode: D elements); their gradients come back in their own dtype.
"""
from __future__ import annotations

from typing import Optional

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
def fused_add_layer_norm_reference(x, residual, weight, bias, eps, out_dtype=None, residual_dtype=None):
    """``(LN(s) in out_dtype, s)`` with ``s = x + residual`` in the stream's dtype (``residual``'s, or
    ``residual_dtype`` / ``x``'s when it is None); LayerNorm in fp32, autocast off."""
    stream_dtype = residual.dtype if residual is not None else (residual_dtype or x.dtype)
    new_residual = x if residual is None else x + residual
    new_residual = new_residual.to(stream_dtype)
    with torch.autocast(x.device.type, enabled=False):
        normed = F.layer_norm(new_residual.float(), (x.shape[-1],), None if weight is None else weight.float(),
                              None if bias is None else bias.float(), eps)
    return normed.to(out_dtype or x.dtype), new_residual


# ---------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------
MAX_BLOCK_D = 8192  # whole rows in registers: 16 fp32 values per thread per tensor with 16 warps
# Backward programs (each a contiguous range of rows). A constant, not the SM count, so the dweight /
# dbias summation order, and therefore the bits, depend on T only, not on the GPU. 512 programs fill
# 132 SMs ~4 deep; their fp32 partials ([512, D] twice, 5 MB at D 1280) are ~3 % of the backward's
# traffic at the ViT-H context encoder's 14 k rows.
MAX_BWD_PROGRAMS = 512
# model widths (fastjepa.models.vit.PRESETS and the predictor's 384) whose tiles are compiled ahead of time
AOT_WIDTHS = (192, 384, 768, 1024, 1280, 1408)
_empty = torch.empty  # output allocator; tests swap in a NaN-filled one to catch unwritten elements


def tile(dim: int) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_D, num_warps)`` for rows of ``dim``: ~4096 elements per tile (16 per thread,
    so 16-byte vector loads of bf16), one row per tile from 4096 columns on."""
    block_d = max(16, triton.next_power_of_2(dim))
    num_warps = 4 if block_d <= 1024 else 8 if block_d <= 4096 else 16
    return max(1, min(16, 4096 // block_d)), block_d, num_warps


# ---------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _add_ln_fwd_kernel(X, RES, W, B, OUT, NEW_RES, MEAN, RSTD, T, D, stride_x, stride_res, stride_out,
                           stride_new, eps, has_residual, store_residual,
                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """``NEW_RES = X (+ RES)``, ``OUT = LN(NEW_RES) * W + B``, ``MEAN`` / ``RSTD`` per row (fp32).

        ``has_residual`` / ``store_residual`` are runtime flags (0/1): the pointers they switch off get
        a dummy of the same dtype, so one compiled variant serves every call with these dtypes."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_D)
        rows64 = rows.to(tl.int64)
        row_ok = rows < T
        col_ok = cols < D
        mask = row_ok[:, None] & col_ok[None, :]
        s = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if has_residual:
            s += tl.load(RES + rows64[:, None] * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if store_residual:
            stored = s.to(NEW_RES.dtype.element_ty)
            tl.store(NEW_RES + rows64[:, None] * stride_new + cols[None, :], stored, mask=mask)
            s = stored.to(tl.float32)  # normalise the stream as stored (a bf16 stream after its rounding)
        mean = tl.sum(s, axis=1) / D
        centred = tl.where(mask, s - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(centred * centred, axis=1) / D + eps)  # biased variance, as F.layer_norm
        w = tl.load(W + cols, mask=col_ok, other=0.0)
        b = tl.load(B + cols, mask=col_ok, other=0.0)
        y = centred * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(OUT + rows64[:, None] * stride_out + cols[None, :], y.to(OUT.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit
    def _add_ln_bwd_kernel(S, W, MEAN, RSTD, DY, DNEW, DX, DRES, DW_PART, DB_PART, T, D, rows_per_program,
                           stride_s, stride_dy, stride_dnew, stride_dx, stride_dres,
                           has_dnew, store_dres, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows ``[pid * rows_per_program, ...)``: ``DX = rstd (g - mean(g) - xhat mean(g xhat)) + DNEW``
        with ``g = DY * W`` (``DRES`` the same values in the stream's dtype); per-program column sums
        ``DW_PART[pid] = sum DY * xhat``, ``DB_PART[pid] = sum DY``."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        w = tl.load(W + cols, mask=col_ok, other=0.0)
        dw = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        db = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        start = pid * rows_per_program
        end = tl.minimum(start + rows_per_program, T)
        # (while, not range(start, end, ...): Triton's interpreter cannot take a runtime bound in range())
        while start < end:
            rows = start + tl.arange(0, BLOCK_T)
            rows64 = rows.to(tl.int64)
            row_ok = rows < end
            mask = row_ok[:, None] & col_ok[None, :]
            s = tl.load(S + rows64[:, None] * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
            dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            g = dy * w[None, :]
            c_xhat = tl.sum(g * xhat, axis=1) / D
            c_mean = tl.sum(g, axis=1) / D
            dx = (g - xhat * c_xhat[:, None] - c_mean[:, None]) * rstd[:, None]
            if has_dnew:
                dx += tl.load(DNEW + rows64[:, None] * stride_dnew + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if store_dres:
                tl.store(DRES + rows64[:, None] * stride_dres + cols[None, :], dx.to(DRES.dtype.element_ty), mask=mask)
            dw += dy * xhat
            db += dy
            start += BLOCK_T
        tl.store(DW_PART + pid * D + cols, tl.sum(dw, axis=0), mask=col_ok)
        tl.store(DB_PART + pid * D + cols, tl.sum(db, axis=0), mask=col_ok)


# ---------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------
def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D ``[T, D]`` tensor with unit column stride (rows may be strided)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _stores_residual(x_dtype: torch.dtype, has_residual: bool, residual_dtype: torch.dtype) -> bool:
    """Whether ``new_residual`` is a new tensor (else it is ``x`` itself: no residual, same dtype)."""
    return has_residual or residual_dtype != x_dtype


def _add_ln_fwd(x, residual, weight, bias, eps, out_dtype, residual_dtype):
    """x, residual: ``[T, D]``. Returns ``(normed, new_residual or [0], mean [T], rstd [T])``."""
    t, dim = x.shape
    store = _stores_residual(x.dtype, residual is not None, residual_dtype)
    out = _empty(t, dim, device=x.device, dtype=out_dtype)
    new_res = _empty((t, dim) if store else (0,), device=x.device, dtype=residual_dtype)
    mean = _empty(t, device=x.device, dtype=torch.float32)
    rstd = _empty(t, device=x.device, dtype=torch.float32)
    if t == 0:
        return out, new_res, mean, rstd
    x = _rows(x)
    residual = _rows(residual) if residual is not None else None
    block_t, block_d, num_warps = tile(dim)
    _add_ln_fwd_kernel[(triton.cdiv(t, block_t),)](
        # dummies of the right dtype where a flag is off (never read or written): new_res for a missing
        # residual (both in the stream's dtype), x for an unstored new_residual (then x's dtype)
        x, residual if residual is not None else (new_res if store else x), weight.float(), bias.float(), out,
        new_res if store else x, mean, rstd, t, dim, x.stride(0), residual.stride(0) if residual is not None else 0,
        out.stride(0), new_res.stride(0) if store else 0, eps, int(residual is not None), int(store),
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)
    return out, new_res, mean, rstd


def bwd_programs(t: int, block_t: int) -> tuple[int, int]:
    """``(programs, rows_per_program)`` of the backward: at most ``MAX_BWD_PROGRAMS`` contiguous
    ranges of whole tiles; a function of ``t`` alone (the reduction order, so the bits)."""
    tiles = triton.cdiv(t, block_t)
    rows_per_program = block_t * triton.cdiv(tiles, min(tiles, MAX_BWD_PROGRAMS))
    return triton.cdiv(t, rows_per_program), rows_per_program


def _add_ln_bwd(dy, dnew, s, weight, mean, rstd, x_dtype, residual_dtype, store_dres):
    """Returns ``(dx [T, D] x_dtype, dresidual [T, D] residual_dtype or [0], dweight, dbias)``."""
    t, dim = s.shape
    dx = _empty(t, dim, device=s.device, dtype=x_dtype)
    dres = _empty((t, dim) if store_dres else (0,), device=s.device, dtype=residual_dtype)
    if t == 0:
        zero = torch.zeros(dim, device=s.device, dtype=weight.dtype)
        return dx, dres, zero, zero.clone()
    block_t, block_d, num_warps = tile(dim)
    programs, rows_per_program = bwd_programs(t, block_t)
    dw_part = _empty(programs, dim, device=s.device, dtype=torch.float32)
    db_part = _empty(programs, dim, device=s.device, dtype=torch.float32)
    dy, s = _rows(dy), _rows(s)
    dnew = _rows(dnew) if dnew is not None else None
    _add_ln_bwd_kernel[(programs,)](
        # s (the stream's dtype, like dnew and dresidual) stands in for whichever of them is absent
        s, weight.float(), mean, rstd, dy, dnew if dnew is not None else s, dx, dres if store_dres else s,
        dw_part, db_part, t, dim, rows_per_program, s.stride(0), dy.stride(0),
        dnew.stride(0) if dnew is not None else 0, dx.stride(0), dres.stride(0) if store_dres else 0,
        int(dnew is not None), int(store_dres), BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)
    return dx, dres, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


# ---------------------------------------------------------------------------------------------------
# custom ops and autograd
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastjepa_kernels::add_layer_norm_fwd", mutates_args=())
def _add_ln_fwd_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                   eps: float, out_dtype: torch.dtype, residual_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton add + LayerNorm of ``[T, D]`` rows: ``(normed, new_residual or [0] when it is x, mean, rstd)``."""
    return _add_ln_fwd(x, residual, weight, bias, eps, out_dtype, residual_dtype)


@_add_ln_fwd_op.register_fake
def _(x, residual, weight, bias, eps, out_dtype, residual_dtype):
    t, dim = x.shape
    store = _stores_residual(x.dtype, residual is not None, residual_dtype)
    return (x.new_empty(t, dim, dtype=out_dtype), x.new_empty((t, dim) if store else (0,), dtype=residual_dtype),
            x.new_empty(t, dtype=torch.float32), x.new_empty(t, dtype=torch.float32))


@torch.library.custom_op("fastjepa_kernels::add_layer_norm_bwd", mutates_args=())
def _add_ln_bwd_op(dy: torch.Tensor, dnew: Optional[torch.Tensor], s: torch.Tensor, weight: torch.Tensor,
                   mean: torch.Tensor, rstd: torch.Tensor, x_dtype: torch.dtype, residual_dtype: torch.dtype,
                   store_dres: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dresidual or [0], dweight, dbias)``; ``s`` is the stream the forward normalised."""
    return _add_ln_bwd(dy, dnew, s, weight, mean, rstd, x_dtype, residual_dtype, store_dres)


@_add_ln_bwd_op.register_fake
def _(dy, dnew, s, weight, mean, rstd, x_dtype, residual_dtype, store_dres):
    t, dim = s.shape
    return (s.new_empty(t, dim, dtype=x_dtype), s.new_empty((t, dim) if store_dres else (0,), dtype=residual_dtype),
            weight.new_empty(dim), weight.new_empty(dim))


def _add_ln_setup(ctx, inputs, output):
    x, residual, weight, _, _, out_dtype, residual_dtype = inputs
    _, new_res, mean, rstd = output
    stored = _stores_residual(x.dtype, residual is not None, residual_dtype)
    ctx.save_for_backward(new_res if stored else x, weight, mean, rstd)
    ctx.x_dtype, ctx.residual_dtype, ctx.out_dtype = x.dtype, residual_dtype, out_dtype
    ctx.has_residual = residual is not None
    ctx.set_materialize_grads(False)  # no gradient for new_residual (its last use): no zeros to read


def _add_ln_backward(ctx, dnormed, dnew, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    if dnormed is None:
        dnormed = torch.zeros(s.shape, device=s.device, dtype=ctx.out_dtype)
    if dnew is not None and dnew.numel() == 0:  # new_residual was x itself: autograd routes its gradient
        dnew = None
    # dresidual has the same values as dx; it needs its own tensor only in another dtype
    store_dres = ctx.has_residual and ctx.residual_dtype != ctx.x_dtype
    dx, dres, dweight, dbias = _add_ln_bwd_op(dnormed, dnew, s, weight, mean, rstd, ctx.x_dtype,
                                              ctx.residual_dtype, store_dres)
    dresidual = (dres if store_dres else dx) if ctx.has_residual else None
    return dx, dresidual, dweight, dbias, None, None, None


_add_ln_fwd_op.register_autograd(_add_ln_backward, setup_context=_add_ln_setup)


# ---------------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------------
def fused_add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                         bias: torch.Tensor | None, eps: float, out_dtype: torch.dtype | None = None,
                         residual_dtype: torch.dtype | None = None, backend: str = "auto"):
    """``(normed, new_residual)``: ``new_residual = x + residual`` and ``normed = LayerNorm(new_residual)``.

    x: ``[..., D]`` fp32/bf16/fp16. residual: like x in fp32 or x's dtype, or None (then
    ``new_residual`` is x in ``residual_dtype``, default x's dtype: x itself). weight, bias: ``[D]``
    (the triton path needs both). Statistics in fp32; ``normed`` in ``out_dtype`` (default x's dtype).
    Both outputs may receive gradients; x and residual get their sum through the LayerNorm.
    """
    dim = x.shape[-1]
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    if residual is not None and residual.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"residual must be fp32 or x's dtype {x.dtype}, got {residual.dtype}")
    if residual is not None and residual_dtype not in (None, residual.dtype):
        raise TypeError(f"residual_dtype {residual_dtype} differs from the given residual's {residual.dtype}")
    if weight is None or weight.shape != (dim,) or (bias is not None and bias.shape != (dim,)):
        raise ValueError(f"weight and bias must be [{dim}], got {None if weight is None else tuple(weight.shape)} "
                         f"and {None if bias is None else tuple(bias.shape)}")
    out_dtype = out_dtype or x.dtype
    residual_dtype = residual.dtype if residual is not None else (residual_dtype or x.dtype)
    tensors = [t for t in (x, residual, weight, bias) if t is not None]
    dtypes_ok = out_dtype in TRITON_DTYPES and residual_dtype in TRITON_DTYPES
    supported = bias is not None and triton is not None and 0 < dim <= MAX_BLOCK_D
    if not use_triton("layer-norm", backend, tensors, TRITON_DTYPES, supported=supported and dtypes_ok):
        return fused_add_layer_norm_reference(x, residual, weight, bias, eps, out_dtype, residual_dtype)
    if not dtypes_ok:
        raise TypeError(f"layer-norm backend 'triton' supports {[str(d) for d in TRITON_DTYPES]} outputs, "
                        f"got out_dtype {out_dtype} and residual_dtype {residual_dtype}")
    if not supported:
        raise ValueError(f"layer-norm backend 'triton' needs a bias and 0 < D <= {MAX_BLOCK_D}, got D={dim}, "
                         f"bias {'given' if bias is not None else 'None'}")
    rows = x.reshape(-1, dim)
    normed, new_res, _, _ = _add_ln_fwd_op(rows, residual.reshape(-1, dim) if residual is not None else None,
                                           weight, bias, float(eps), out_dtype, residual_dtype)
    if not _stores_residual(x.dtype, residual is not None, residual_dtype):
        new_residual = x  # nothing added, nothing cast: the stream is x itself
    else:
        new_residual = new_res.view(x.shape)
    return normed.view(x.shape[:-1] + (dim,)), new_residual


# ---------------------------------------------------------------------------------------------------
# ahead-of-time variants
# ---------------------------------------------------------------------------------------------------
def dtype_combinations():
    """``(x, stream, normed)`` dtypes the models use: the stream in x's dtype or fp32, ``normed`` in x's
    dtype or fp32 (the encoder's final norm under autocast). Others compile just in time."""
    combos = []
    for x in TRITON_DTYPES:
        for stream in dict.fromkeys((x, torch.float32)):
            for out in dict.fromkeys((x, torch.float32)):
                combos.append((x, stream, out))
    return combos


def aot_specs():
    """Every tile the launchers pick for :data:`AOT_WIDTHS`, forward and backward, per dtype
    combination (the residual / gradient flags are runtime arguments). Names start with ``layer_norm``."""
    if triton is None:
        return []
    from .aot import AotSpec

    specs = []
    for block_t, block_d, num_warps in sorted({tile(w) for w in AOT_WIDTHS}, key=lambda c: c[1]):
        consts = dict(BLOCK_T=block_t, BLOCK_D=block_d)
        cfg = f"BT{block_t},BD{block_d},w{num_warps}"
        for x_dt, res_dt, out_dt in dtype_combinations():
            x, res, out = (TRITON_DTYPES[d] for d in (x_dt, res_dt, out_dt))
            sig = {"X": f"*{x}", "RES": f"*{res}", "W": "*fp32", "B": "*fp32", "OUT": f"*{out}",
                   "NEW_RES": f"*{res}", "MEAN": "*fp32", "RSTD": "*fp32", "T": "i32", "D": "i32",
                   "stride_x": "i32", "stride_res": "i32", "stride_out": "i32", "stride_new": "i32", "eps": "fp32",
                   "has_residual": "i32", "store_residual": "i32", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
            specs.append(AotSpec(f"layer_norm_fwd[{x}+{res},out_{out},{cfg}]", _add_ln_fwd_kernel, sig, consts,
                                 num_warps=num_warps))
            sig = {"S": f"*{res}", "W": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32", "DY": f"*{out}",
                   "DNEW": f"*{res}", "DX": f"*{x}", "DRES": f"*{res}", "DW_PART": "*fp32", "DB_PART": "*fp32",
                   "T": "i32", "D": "i32", "rows_per_program": "i32", "stride_s": "i32", "stride_dy": "i32",
                   "stride_dnew": "i32", "stride_dx": "i32", "stride_dres": "i32", "has_dnew": "i32",
                   "store_dres": "i32", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
            specs.append(AotSpec(f"layer_norm_bwd[{x},stream_{res},dy_{out},{cfg}]", _add_ln_bwd_kernel, sig,
                                 consts, num_warps=num_warps))
    return specs
