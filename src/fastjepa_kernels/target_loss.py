"""I-JEPA regression loss between predictions and layer-normed target features.

``pred [T, D]``; ``target [B, N, D]`` (target-encoder output, no grad); ``index`` int ``[T]`` of flat
rows ``b * N + n`` in ``target``. The target rows are layer-normed without affine (``eps``, default
1e-6; the official I-JEPA code uses torch's default 1e-5) and the
loss is averaged over all ``T * D`` elements. smooth-L1 uses beta 1 (the official default).

Backends: ``reference`` (gather -> layer_norm -> loss in PyTorch), ``triton`` (one fused kernel, custom
op ``fastjepa_kernels::jepa_target_loss``), ``auto`` (triton on CUDA tensors when Triton imports).

Triton design: one program per ``BLOCK_T`` rows reads each picked target row straight from ``target``
(no gathered or normalised copy), merges per-chunk mean / M2 over ``D`` in ``BLOCK_D`` chunks (Chan et
al. 1979 pairwise update, so a large mean does not cancel the variance), then re-reads the row (an
L1/L2 hit) with ``pred``, normalises in registers and writes the elementwise loss gradient, already
scaled by ``1 / (T * D)``, in ``pred``'s dtype. Each program writes one fp32 partial loss sum and
torch sums the partials in a fixed order: the loss is deterministic. The backward is one multiply of
the saved gradient by the upstream scalar on the device (no host sync).
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

KINDS = ("smooth_l1", "l2")
BACKENDS = ("reference", "triton", "auto")
LN_EPS = 1e-6  # the default eps (the encoders' LayerNorm eps); the same in both backends


# ---------------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------------
def jepa_target_loss_reference(pred, target, index, kind="smooth_l1", eps: float = LN_EPS):
    """Plain-PyTorch chain: gather -> layer_norm -> loss (fp32 maths)."""
    rows = target.reshape(-1, target.shape[-1]).index_select(0, index)
    rows = F.layer_norm(rows.float(), (rows.shape[-1],), eps=eps)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred.float(), rows, beta=1.0)
    if kind == "l2":
        return F.mse_loss(pred.float(), rows)
    raise ValueError(f"unknown loss kind {kind!r}; choose one of {KINDS}")


# ---------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------
# 8 rows x 256 columns per step: 2048 fp32 values per tensor with 4 warps (16 per thread), five chunks
# for ViT-H's D=1280. The 8 rows' targets (40 KB fp32 at D=1280) stay in L1/L2 for the second read.
BLOCK_T, BLOCK_D, NUM_WARPS = 8, 256, 4
_empty = torch.empty  # output allocator; tests swap in a NaN-filled one to catch unwritten elements


# ---------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _target_loss_fwd_kernel(PRED, TARGET, INDEX, GRAD, PARTIAL, T, D, N, stride_pred, stride_tb, stride_tn,
                                stride_grad, inv_count, eps, IS_L2,
                                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """Per row ``t``: ``y = (x - mean) / sqrt(var + eps)`` of ``x = TARGET[b, n]``, ``d = PRED[t] - y``;
        ``PARTIAL[pid] = sum loss(d)`` over the block, ``GRAD[t] = loss'(d) * inv_count``.

        smooth-L1 (beta 1): ``0.5 d^2`` if ``|d| < 1`` else ``|d| - 0.5``, derivative ``clamp(d, -1, 1)``
        (torch.nn.SmoothL1Loss); L2: ``d^2``, derivative ``2 d``."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        idx = tl.load(INDEX + rows, mask=row_ok, other=0).to(tl.int64)
        b = idx // N
        target_rows = TARGET + b * stride_tb + (idx - b * N) * stride_tn
        rows64 = rows.to(tl.int64)

        # pass 1: mean and M2 per row, merging chunk statistics (Chan, Golub & LeVeque 1979)
        mean = tl.zeros([BLOCK_T], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_T], dtype=tl.float32)
        # (while, not range(0, D, ...): Triton's interpreter cannot take a runtime bound in range())
        start = 0
        while start < D:
            cols = start + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < D)[None, :]
            x = tl.load(target_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            n_chunk = tl.minimum(D - start, BLOCK_D).to(tl.float32)
            n_before = start.to(tl.float32)
            chunk_mean = tl.sum(x, axis=1) / n_chunk
            dev = tl.where(mask, x - chunk_mean[:, None], 0.0)
            delta = chunk_mean - mean
            n_after = n_before + n_chunk
            mean += delta * (n_chunk / n_after)
            m2 += tl.sum(dev * dev, axis=1) + delta * delta * (n_before * n_chunk / n_after)
            start += BLOCK_D
        rstd = 1.0 / tl.sqrt_rn(m2 / D + eps)  # biased variance, as F.layer_norm

        # pass 2: normalise, loss and its gradient
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        start = 0
        while start < D:
            cols = start + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < D)[None, :]
            x = tl.load(target_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            p = tl.load(PRED + rows64[:, None] * stride_pred + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            d = p - (x - mean[:, None]) * rstd[:, None]
            ad = tl.abs(d)
            if IS_L2:
                loss = d * d
                grad = 2.0 * d
            else:
                loss = tl.where(ad < 1.0, 0.5 * d * d, ad - 0.5)
                grad = tl.minimum(tl.maximum(d, -1.0), 1.0)
            acc += tl.where(mask, loss, 0.0)
            tl.store(GRAD + rows64[:, None] * stride_grad + cols[None, :],
                     (grad * inv_count).to(GRAD.dtype.element_ty), mask=mask)
            start += BLOCK_D
        tl.store(PARTIAL + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


# ---------------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------------
def _target_loss_fwd(pred, target, index, is_l2: bool, eps: float):
    """Returns ``(loss fp32 0-d, grad_pred [T, D] in pred's dtype = d loss / d pred)``."""
    t, dim = pred.shape
    pred = pred if pred.stride(-1) == 1 else pred.contiguous()
    target = target if target.dim() == 3 else target.unsqueeze(0)
    target = target if target.stride(-1) == 1 else target.contiguous()
    grad = _empty(pred.shape, device=pred.device, dtype=pred.dtype)
    programs = triton.cdiv(t, BLOCK_T)
    partial = _empty(programs, device=pred.device, dtype=torch.float32)
    if programs == 0 or dim == 0:
        return torch.full((), float("nan"), device=pred.device), grad  # mean of nothing, as torch
    _target_loss_fwd_kernel[(programs,)](
        pred, target, index, grad, partial, t, dim, target.shape[1], pred.stride(0), target.stride(0),
        target.stride(1), grad.stride(0), 1.0 / (t * dim), eps, int(is_l2),
        BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    return partial.sum() / (t * dim), grad


# ---------------------------------------------------------------------------------------------------
# custom op and autograd
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastjepa_kernels::jepa_target_loss", mutates_args=())
def _target_loss_op(pred: torch.Tensor, target: torch.Tensor, index: torch.Tensor, is_l2: bool, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton fused loss; index int32 ``[T]``. Returns ``(loss, grad_pred)``; only ``loss`` is for users."""
    return _target_loss_fwd(pred, target, index, is_l2, eps)


@_target_loss_op.register_fake
def _(pred, target, index, is_l2, eps):
    return pred.new_empty((), dtype=torch.float32), torch.empty_like(pred, memory_format=torch.contiguous_format)


def _target_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _target_loss_backward(ctx, grad_loss, _grad_of_grad):
    (grad_pred,) = ctx.saved_tensors
    # a 0-d fp32 tensor times a bf16 tensor stays bf16 (computed in fp32): one pass, no host sync
    return grad_pred * grad_loss, None, None, None, None


_target_loss_op.register_autograd(_target_loss_backward, setup_context=_target_loss_setup)


# ---------------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------------
def _use_triton(backend: str, *tensors) -> bool:
    return use_triton("target-loss", backend, tensors, TRITON_DTYPES)


def jepa_target_loss(pred, target, index, kind: str = "smooth_l1", backend: str = "auto", eps: float = LN_EPS):
    """Scalar fp32 loss; gradient flows to ``pred`` only.

    pred: ``[T, D]`` fp32/bf16/fp16. target: ``[B, N, D]`` (or ``[R, D]``), detached. index: int32/int64
    ``[T]`` flat rows of ``target``. kind: ``smooth_l1`` (beta 1) or ``l2``; mean over ``T * D``.
    eps: the target LayerNorm's eps (the official I-JEPA code: torch's default 1e-5).
    """
    if pred.dim() != 2 or pred.shape[0] != index.shape[0] or pred.shape[-1] != target.shape[-1]:
        raise ValueError(f"pred {tuple(pred.shape)} does not match index {tuple(index.shape)} / target {tuple(target.shape)}")
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; choose one of {KINDS}")
    if not _use_triton(backend, pred, target):
        return jepa_target_loss_reference(pred, target.detach(), index, kind, eps)
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be a 1-D int32/int64 tensor, got {index.dtype}")
    if target.numel() // max(target.shape[-1], 1) >= 2**31:
        raise ValueError("target has too many rows for int32 indices")
    index = index.to(torch.int32).contiguous()
    loss, _ = _target_loss_op(pred, target.detach(), index, kind == "l2", float(eps))
    return loss


# ---------------------------------------------------------------------------------------------------
# ahead-of-time variants
# ---------------------------------------------------------------------------------------------------
def aot_specs():
    """Every variant the launcher picks: one tile, per (pred dtype, target dtype). The loss kind is a
    runtime argument (both branches are compiled in)."""
    if triton is None:
        return []
    from .aot import AotSpec

    specs = []
    for p_ty in TRITON_DTYPES.values():
        for t_ty in TRITON_DTYPES.values():
            sig = {"PRED": f"*{p_ty}", "TARGET": f"*{t_ty}", "INDEX": "*i32", "GRAD": f"*{p_ty}", "PARTIAL": "*fp32",
                   "T": "i32", "D": "i32", "N": "i32", "stride_pred": "i32", "stride_tb": "i32", "stride_tn": "i32",
                   "stride_grad": "i32", "inv_count": "fp32", "eps": "fp32", "IS_L2": "i32",
                   "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
            specs.append(AotSpec(f"target_loss_fwd[{p_ty},target_{t_ty},BT{BLOCK_T},BD{BLOCK_D},w{NUM_WARPS}]",
                                 _target_loss_fwd_kernel, sig, dict(BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D),
                                 num_warps=NUM_WARPS))
    return specs
