"""Packed token gather and its inverse.

``x`` is ``[B, N, D]`` (or already flat ``[B*N, D]``); ``index`` is int32/int64 ``[T]`` of flat rows
``b * N + n``. ``gather_tokens`` picks rows (plus ``pos[n]``), ``scatter_tokens`` puts rows back.

Backends: ``reference`` (``index_select`` / ``index_add``; autograd does the backward), ``triton``
(one fused pass; custom ops ``fastjepa_kernels::gather_tokens`` / ``scatter_tokens`` with fake impls
for ``torch.compile``), ``auto``: the reference, until a GPU measurement shows the kernel ahead (on an
H100, ``benchmarks/results/h100-sxm-2026-11-28-5c15091.json``, ``index_select`` won every case: 0.106
vs 0.145 ms forward at the encoder's shape).

Triton design:
- forward: one program per ``BLOCK_T`` rows x ``BLOCK_D`` columns; each row slice is one load, ``pos``
  is added in fp32 and the sum is rounded once to the output dtype, so an fp32 ``x`` can come out as
  bf16 in the same pass. ``x`` may be any strided ``[B, N, D]`` view, but only a unit column stride
  gives vectorised loads: feed a contiguous ``[B, N, D]`` (fastjepa's patchify does).
- backward with ``unique=True`` (every row picked at most once, e.g. a context mask): an inverse map
  (``[B * N]`` int32, -1 where not picked) and one pass over every row of ``x``'s gradient, written in
  ``x``'s dtype (the gradient rows or zeros): no fp32 buffer, no zero-fill, no atomics, deterministic.
  The caller promises uniqueness (masks guarantee it); it is checked on CPU tensors and under
  ``FASTJEPA_KERNELS_DEBUG=1``. ``pos``'s gradient is then the fixed-order sum over the batch.
- backward otherwise (and the scatter forward): the same tiling, adding each row into an fp32
  accumulator with ``atomic_add``. Indices may repeat (the predictor picks every context row once per
  target block; every token of an image shares its ``pos`` row), and atomics handle that at the cost of
  a summation order that varies between runs (fp32, so ~1 ulp of the accumulated value). The
  accumulator is fp32 for every input dtype (bf16 atomics would drop small addends once a hot row's sum
  grows), and is cast to the input dtype afterwards when that is not fp32. A row picked thousands of
  times (one mask token shared by every target row) serialises its atomics: add such a row outside the
  gather (fastjepa's predictor does).
- int64 indices are converted to int32 once (``B * N < 2**31`` is checked), so every kernel has one
  index type; offsets are computed in int64 inside the kernels.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._backend import TRITON_DTYPES, debugging, use_triton

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
def gather_tokens_reference(x: torch.Tensor, index: torch.Tensor, pos: torch.Tensor | None = None, out_dtype=None):
    """``index_select`` (+ ``pos[index % N]``): ``[T, D]``. Autograd gives the scatter-add backward."""
    flat = x.reshape(-1, x.shape[-1])
    out = flat.index_select(0, index)
    if pos is not None:
        out = out + pos.index_select(0, index % x.shape[1])
    return out if out_dtype is None else out.to(out_dtype)


def scatter_tokens_reference(tokens: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``index_add`` of ``tokens [T, D]`` into zeros ``[num_rows, D]`` (repeated rows accumulate)."""
    out = tokens.new_zeros(num_rows, tokens.shape[-1])
    return out.index_add(0, index, tokens)


# ---------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------
# One tile for every D: 32 rows x 128 columns (8 KB of bf16, 32 elements per thread with 4 warps, so
# 16-byte vector loads). Memory-bound, so masked lanes for D % 128 != 0 cost lanes, not bandwidth.
BLOCK_T, BLOCK_D, NUM_WARPS = 32, 128, 4
INVERSE_BLOCK = 1024  # indices per program of the inverse map
_empty = torch.empty  # output allocator; tests swap in a NaN-filled one to catch unwritten elements


# ---------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _gather_fwd_kernel(X, INDEX, POS, OUT, T, D, N, stride_xb, stride_xn, stride_xd, stride_pos, stride_out,
                           HAS_POS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """``OUT[t, d] = X[b, n, d] (+ POS[n, d])`` with ``b, n = divmod(INDEX[t], N)``, summed in fp32."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_ok = rows < T
        idx = tl.load(INDEX + rows, mask=row_ok, other=0).to(tl.int64)
        b = idx // N
        n = idx - b * N
        mask = row_ok[:, None] & (cols < D)[None, :]
        val = tl.load(X + b[:, None] * stride_xb + n[:, None] * stride_xn + cols[None, :] * stride_xd,
                      mask=mask, other=0.0).to(tl.float32)
        if HAS_POS:
            val += tl.load(POS + n[:, None] * stride_pos + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out_ptrs = OUT + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
        tl.store(out_ptrs, val.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _gather_bwd_kernel(GRAD, INDEX, ACC, POS_ACC, T, D, N, stride_grad, stride_acc, stride_pos_acc,
                           HAS_POS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """``ACC[INDEX[t]] += GRAD[t]`` and ``POS_ACC[INDEX[t] % N] += GRAD[t]`` (fp32 atomics).

        Also the forward of ``scatter_tokens`` (``HAS_POS=False``)."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_ok = rows < T
        idx = tl.load(INDEX + rows, mask=row_ok, other=0).to(tl.int64)
        mask = row_ok[:, None] & (cols < D)[None, :]
        g = tl.load(GRAD + rows.to(tl.int64)[:, None] * stride_grad + cols[None, :], mask=mask, other=0.0)
        g = g.to(tl.float32)
        # relaxed: only the final sums matter, no ordering with other memory operations is needed
        tl.atomic_add(ACC + idx[:, None] * stride_acc + cols[None, :], g, mask=mask, sem="relaxed")
        if HAS_POS:
            n = idx % N
            tl.atomic_add(POS_ACC + n[:, None] * stride_pos_acc + cols[None, :], g, mask=mask, sem="relaxed")

    @triton.jit
    def _inverse_index_kernel(INDEX, INVERSE, T, BLOCK: tl.constexpr):
        """``INVERSE[INDEX[t]] = t`` (indices unique; INVERSE prefilled with -1)."""
        t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = t < T
        idx = tl.load(INDEX + t, mask=ok, other=0).to(tl.int64)
        tl.store(INVERSE + idx, t, mask=ok)

    @triton.jit
    def _gather_bwd_unique_kernel(GRAD, INVERSE, GX, R, D, stride_grad, stride_gx,
                                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """``GX[r] = GRAD[INVERSE[r]]`` where ``INVERSE[r] >= 0``, else 0: every element written once."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_ok = rows < R
        src = tl.load(INVERSE + rows, mask=row_ok, other=-1)
        col_ok = (cols < D)[None, :]
        g = tl.load(GRAD + tl.maximum(src, 0).to(tl.int64)[:, None] * stride_grad + cols[None, :],
                    mask=(src >= 0)[:, None] & col_ok, other=0.0)
        tl.store(GX + rows.to(tl.int64)[:, None] * stride_gx + cols[None, :], g.to(GX.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok)


# ---------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------
def _check_index(index: torch.Tensor, num_rows: int) -> torch.Tensor:
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be a 1-D int32/int64 tensor, got {tuple(index.shape)} {index.dtype}")
    if num_rows >= 2**31:
        raise ValueError(f"{num_rows} rows do not fit int32 indices")
    return index.to(torch.int32).contiguous()  # no copy when already int32 and contiguous


def _check_range(index: torch.Tensor, num_rows: int) -> None:
    """Out-of-range rows would be read or written outside the buffers. On CPU (Triton's interpreter) the
    check is free, so it is made; on CUDA it would cost a host sync per call: the caller guarantees it
    (checked under ``FASTJEPA_KERNELS_DEBUG=1``)."""
    if (not index.is_cuda or debugging()) and index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_rows):
        raise IndexError(f"index values must lie in [0, {num_rows}); got [{int(index.min())}, {int(index.max())}]")


def _check_unique(index: torch.Tensor) -> None:
    """``unique=True`` is a promise (a repeated row would lose all but one of its gradients); checked where
    it costs no device sync in training: on CPU tensors and under ``FASTJEPA_KERNELS_DEBUG=1``."""
    if (not index.is_cuda or debugging()) and torch.unique(index).numel() != index.numel():
        raise ValueError("gather_tokens(unique=True) got repeated indices")


def _grid(rows: int, dim: int):
    return (triton.cdiv(rows, BLOCK_T), triton.cdiv(dim, BLOCK_D))


def _gather_fwd(x: torch.Tensor, index: torch.Tensor, pos: torch.Tensor | None, out_dtype: torch.dtype):
    """x: ``[B, N, D]`` any strides, or ``[R, D]``; index int32 ``[T]``; pos ``[N, D]`` or None."""
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    _, n_rows, dim = x3.shape
    t = index.shape[0]
    out = _empty(t, dim, device=x.device, dtype=out_dtype)
    if t == 0 or dim == 0:
        return out
    _check_range(index, x3.shape[0] * n_rows)
    if pos is not None:
        pos = pos if pos.stride(-1) == 1 else pos.contiguous()
    _gather_fwd_kernel[_grid(t, dim)](
        x3, index, pos if pos is not None else x3, out, t, dim, n_rows,
        x3.stride(0), x3.stride(1), x3.stride(2), pos.stride(0) if pos is not None else 0, out.stride(0),
        HAS_POS=pos is not None, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    return out


def _gather_bwd_unique(grad: torch.Tensor, index: torch.Tensor, num_rows: int, x_dtype: torch.dtype):
    """``[num_rows, D]`` in ``x_dtype``: row ``index[t]`` = ``grad[t]``, every other row 0 (indices unique)."""
    grad = grad if grad.stride(-1) == 1 else grad.contiguous()
    t, dim = grad.shape
    gx = _empty(num_rows, dim, device=grad.device, dtype=x_dtype)
    if num_rows == 0 or dim == 0:
        return gx
    inverse = torch.full((num_rows,), -1, device=grad.device, dtype=torch.int32)
    if t:
        _check_range(index, num_rows)
        _inverse_index_kernel[(triton.cdiv(t, INVERSE_BLOCK),)](index, inverse, t, BLOCK=INVERSE_BLOCK, num_warps=4)
    _gather_bwd_unique_kernel[_grid(num_rows, dim)](grad, inverse, gx, num_rows, dim, grad.stride(0), gx.stride(0),
                                                    BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    return gx


def _scatter_add(grad: torch.Tensor, index: torch.Tensor, num_rows: int, rows_per_image: int, with_pos: bool):
    """fp32 ``[num_rows, D]`` sums of ``grad`` rows at ``index`` (and ``[N, D]`` at ``index % N``)."""
    grad = grad if grad.stride(-1) == 1 else grad.contiguous()
    t, dim = grad.shape
    acc = torch.zeros(num_rows, dim, device=grad.device, dtype=torch.float32)
    pos_acc = torch.zeros(rows_per_image if with_pos else 0, dim, device=grad.device, dtype=torch.float32)
    if t and dim:
        _check_range(index, num_rows)
        _gather_bwd_kernel[_grid(t, dim)](
            grad, index, acc, pos_acc if with_pos else acc, t, dim, rows_per_image,
            grad.stride(0), acc.stride(0), pos_acc.stride(0) if with_pos else 0,
            HAS_POS=with_pos, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    return acc, pos_acc


# ---------------------------------------------------------------------------------------------------
# custom ops and autograd
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastjepa_kernels::gather_tokens", mutates_args=())
def _gather_op(x: torch.Tensor, index: torch.Tensor, pos: Optional[torch.Tensor], out_dtype: torch.dtype,
               unique: bool = False) -> torch.Tensor:
    """Triton gather; index int32 ``[T]``; returns ``[T, D]`` in ``out_dtype``. ``unique``: indices never
    repeat (the backward then writes without atomics)."""
    if unique:
        _check_unique(index)  # here, not in gather_tokens: eager code even under torch.compile
    return _gather_fwd(x, index, pos, out_dtype)


@_gather_op.register_fake
def _(x, index, pos, out_dtype, unique=False):
    return x.new_empty(index.shape[0], x.shape[-1], dtype=out_dtype)


@torch.library.custom_op("fastjepa_kernels::gather_tokens_bwd", mutates_args=())
def _gather_bwd_op(grad: torch.Tensor, index: torch.Tensor, num_rows: int, rows_per_image: int, with_pos: bool,
                   x_dtype: torch.dtype, pos_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter-add of ``grad [T, D]``: ``([num_rows, D] in x_dtype, [N or 0, D] in pos_dtype)``."""
    acc, pos_acc = _scatter_add(grad, index, num_rows, rows_per_image, with_pos)
    return acc.to(x_dtype), pos_acc.to(pos_dtype)


@_gather_bwd_op.register_fake
def _(grad, index, num_rows, rows_per_image, with_pos, x_dtype, pos_dtype):
    dim = grad.shape[-1]
    return (grad.new_empty(num_rows, dim, dtype=x_dtype),
            grad.new_empty(rows_per_image if with_pos else 0, dim, dtype=pos_dtype))


@torch.library.custom_op("fastjepa_kernels::gather_tokens_bwd_unique", mutates_args=())
def _gather_bwd_unique_op(grad: torch.Tensor, index: torch.Tensor, num_rows: int, x_dtype: torch.dtype) -> torch.Tensor:
    """Backward of a gather whose indices never repeat: ``[num_rows, D]`` in x_dtype, no atomics."""
    return _gather_bwd_unique(grad, index, num_rows, x_dtype)


@_gather_bwd_unique_op.register_fake
def _(grad, index, num_rows, x_dtype):
    return grad.new_empty(num_rows, grad.shape[-1], dtype=x_dtype)


def _gather_setup(ctx, inputs, output):
    x, index, pos, _, unique = inputs
    ctx.save_for_backward(index)
    ctx.x_shape, ctx.x_dtype, ctx.unique = x.shape, x.dtype, unique
    ctx.has_pos = pos is not None
    ctx.pos_dtype = pos.dtype if pos is not None else x.dtype


def _gather_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    rows_per_image = ctx.x_shape[1] if len(ctx.x_shape) == 3 else ctx.x_shape[0]
    num_rows = ctx.x_shape[0] * rows_per_image if len(ctx.x_shape) == 3 else ctx.x_shape[0]
    with_pos = ctx.has_pos and ctx.needs_input_grad[2]
    if ctx.unique:
        gx = _gather_bwd_unique_op(grad, index, num_rows, ctx.x_dtype).view(ctx.x_shape)
        # every image's rows in a fixed order: a deterministic fp32 sum over the batch
        gpos = gx.sum(0, dtype=torch.float32).to(ctx.pos_dtype) if with_pos else None
        return gx, None, gpos, None, None
    gx, gpos = _gather_bwd_op(grad, index, num_rows, rows_per_image, with_pos, ctx.x_dtype, ctx.pos_dtype)
    return gx.view(ctx.x_shape), None, (gpos if with_pos else None), None, None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("fastjepa_kernels::scatter_tokens", mutates_args=())
def _scatter_op(tokens: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Triton scatter-add of ``tokens [T, D]`` into zeros ``[num_rows, D]`` (tokens' dtype)."""
    acc, _ = _scatter_add(tokens, index, num_rows, 1, False)
    return acc.to(tokens.dtype)


@_scatter_op.register_fake
def _(tokens, index, num_rows):
    return tokens.new_empty(num_rows, tokens.shape[-1])


def _scatter_setup(ctx, inputs, output):
    tokens, index, _ = inputs
    ctx.save_for_backward(index)
    ctx.tokens_dtype = tokens.dtype


def _scatter_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return _gather_op(grad, index, None, ctx.tokens_dtype, False), None, None


_scatter_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)


# ---------------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------------
def _use_triton(backend: str, *tensors) -> bool:
    # auto keeps the reference: index_select beat the kernel in every H100 case measured so far
    return use_triton("gather", backend, tensors, TRITON_DTYPES, auto_takes_kernel=False)


def gather_tokens(x: torch.Tensor, index: torch.Tensor, pos: torch.Tensor | None = None, out_dtype=None,
                  backend: str = "auto", unique: bool = False):
    """Rows of ``x.reshape(-1, D)`` picked by ``index`` -> ``[T, D]``, plus ``pos[index % N]``.

    x: ``[B, N, D]`` (contiguous for vectorised loads) or ``[R, D]``, fp32/bf16/fp16 (triton). index:
    int32/int64 ``[T]`` of flat rows. pos: ``[N, D]`` position embedding (needs a 3-D ``x`` to know N);
    the triton path wants it in ``x``'s dtype. out_dtype: output dtype (default: that of ``x + pos``),
    converted in the same pass. unique: the caller promises no index repeats (a mask's rows); the triton
    backward then writes ``x``'s gradient directly, without atomics (the reference needs no hint).
    Backward: scatter-add into ``x`` (zeros where not picked) and ``pos``; repeated indices accumulate.
    """
    if pos is not None and x.dim() != 3:
        raise ValueError("gather_tokens with pos needs x as [B, N, D]")
    if x.dim() not in (2, 3):
        raise ValueError(f"gather_tokens wants x as [B, N, D] or [R, D], got {tuple(x.shape)}")
    if pos is not None and pos.shape != x.shape[1:]:
        raise ValueError(f"pos {tuple(pos.shape)} does not match x {tuple(x.shape)}")
    tensors = (x,) if pos is None else (x, pos)
    if out_dtype is not None:
        tensors += (torch.empty(0, dtype=out_dtype, device=x.device),)
    if not _use_triton(backend, *tensors):
        return gather_tokens_reference(x, index, pos, out_dtype)
    if pos is not None and pos.dtype != x.dtype:
        raise TypeError(f"gather backend 'triton' wants pos in x's dtype {x.dtype}, got {pos.dtype}")
    index = _check_index(index, x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0])
    return _gather_op(x, index, pos, out_dtype if out_dtype is not None else x.dtype, bool(unique))


def scatter_tokens(tokens: torch.Tensor, index: torch.Tensor, num_rows: int, backend: str = "auto") -> torch.Tensor:
    """Inverse of :func:`gather_tokens`: ``tokens [T, D]`` into zeros ``[num_rows, D]`` at ``index``.

    Repeated indices accumulate (fp32 sums in the triton path). Backward: a gather of the rows."""
    if tokens.dim() != 2:
        raise ValueError(f"scatter_tokens wants tokens as [T, D], got {tuple(tokens.shape)}")
    if not _use_triton(backend, tokens):
        return scatter_tokens_reference(tokens, index, num_rows)
    return _scatter_op(tokens, _check_index(index, num_rows), int(num_rows))


# ---------------------------------------------------------------------------------------------------
# ahead-of-time variants
# ---------------------------------------------------------------------------------------------------
def aot_specs():
    """Every variant the launchers pick: forward per (x dtype, out dtype, pos), backward/scatter per
    (grad dtype, pos), the unique-index backward per (grad dtype, x dtype) and its inverse map. Names
    start with ``gather``."""
    if triton is None:
        return []
    from .aot import AotSpec

    names = list(TRITON_DTYPES.values())
    tile = dict(BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)
    specs = []
    for x_ty in names:
        for out_ty in names:
            for has_pos in (False, True):
                # unit column stride (contiguous x: the JIT specialises a stride of 1) or any stride
                for unit_stride in (True, False):
                    sig = {"X": f"*{x_ty}", "INDEX": "*i32", "POS": f"*{x_ty}", "OUT": f"*{out_ty}", "T": "i32",
                           "D": "i32", "N": "i32", "stride_xb": "i32", "stride_xn": "i32",
                           "stride_xd": "constexpr" if unit_stride else "i32", "stride_pos": "i32", "stride_out": "i32",
                           "HAS_POS": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
                    constexprs = dict(HAS_POS=has_pos, **tile, **({"stride_xd": 1} if unit_stride else {}))
                    name = (f"gather_fwd[{x_ty}->{out_ty},pos{int(has_pos)},xd{'1' if unit_stride else 'N'},"
                            f"BT{BLOCK_T},BD{BLOCK_D},w{NUM_WARPS}]")
                    specs.append(AotSpec(name, _gather_fwd_kernel, sig, constexprs, num_warps=NUM_WARPS))
    for g_ty in names:
        for has_pos in (False, True):
            sig = {"GRAD": f"*{g_ty}", "INDEX": "*i32", "ACC": "*fp32", "POS_ACC": "*fp32", "T": "i32", "D": "i32",
                   "N": "i32", "stride_grad": "i32", "stride_acc": "i32", "stride_pos_acc": "i32",
                   "HAS_POS": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
            specs.append(AotSpec(f"gather_bwd[{g_ty},pos{int(has_pos)},BT{BLOCK_T},BD{BLOCK_D},w{NUM_WARPS}]",
                                 _gather_bwd_kernel, sig, dict(HAS_POS=has_pos, **tile), num_warps=NUM_WARPS))
    for g_ty in names:
        for x_ty in names:
            sig = {"GRAD": f"*{g_ty}", "INVERSE": "*i32", "GX": f"*{x_ty}", "R": "i32", "D": "i32",
                   "stride_grad": "i32", "stride_gx": "i32", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
            specs.append(AotSpec(f"gather_bwd_unique[{g_ty}->{x_ty},BT{BLOCK_T},BD{BLOCK_D},w{NUM_WARPS}]",
                                 _gather_bwd_unique_kernel, sig, tile, num_warps=NUM_WARPS))
    specs.append(AotSpec(f"gather_inverse_index[B{INVERSE_BLOCK},w4]", _inverse_index_kernel,
                         {"INDEX": "*i32", "INVERSE": "*i32", "T": "i32", "BLOCK": "constexpr"},
                         dict(BLOCK=INVERSE_BLOCK), num_warps=4))
    return specs
