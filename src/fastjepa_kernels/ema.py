"""In-place exponential moving average of weights: ``target = m * target + (1 - m) * source``.

``target`` is fp32 (bf16 targets stall: with 1 - m <= 0.004 an update is below one bf16 ulp);
``source`` is fp32, bf16 or fp16. Works on one tensor or lists, and on any contiguous slice (a ZeRO
shard). An optional ``copy_out`` receives a bf16/fp16 copy of the updated target in the same pass.

Backends: ``reference`` (``torch._foreach_lerp_``), ``triton`` (one fused multi-tensor kernel launch per
(source dtype, copy dtype) group) and ``auto`` (triton for CUDA tensors when triton imports).

Numerics: both backends compute in fp32 with ``w = 1 - m`` exactly as ``torch.lerp`` does
(``t + w * (s - t)`` for ``|w| < 0.5``, else ``s - (s - t) * (1 - w)``; ATen ``Lerp.h``). A float
momentum gives ``w`` rounded once to fp32 (as ``_foreach_lerp_`` does with a Python scalar); a 0-d
tensor momentum is read inside the kernel as fp64 and ``1 - m`` is formed in fp64 before the rounding.
The Triton result agrees with ``torch._foreach_lerp_`` within 1 ulp of ``max(|t|, |s|)`` (the only
difference can be whether ``w * d + t`` is fused into one fma); on CUDA both fuse it, so they are
expected to agree bit for bit there.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Optional

import torch

from ._backend import TRITON_DTYPES, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path works without triton
    triton = None
    tl = None

BACKENDS = ("reference", "triton", "auto")
SOURCE_DTYPES = tuple(TRITON_DTYPES)  # fp32, bf16, fp16: every dtype the kernels take
COPY_DTYPES = (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------
def ema_reference_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], weight) -> None:
    """``torch._foreach_lerp_``: ``t += w * (s - t)`` with ``w = 1 - m`` (a float or a 0-d tensor)."""
    sources = [s if s.dtype == t.dtype else s.to(t.dtype) for t, s in zip(targets, sources)]
    if isinstance(weight, torch.Tensor):
        # lerp has no tensor-scalar overload: t + w * (s - t) with w on the device (no host sync)
        delta = torch._foreach_sub(sources, targets)
        torch._foreach_mul_(delta, weight)
        torch._foreach_add_(targets, delta)
    else:
        torch._foreach_lerp_(list(targets), sources, weight)


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EmaConfig:
    block_size: int  # elements per program
    num_warps: int


# No autotuner: it would re-run an in-place update (the targets live behind a pointer table, so
# ``restore_value`` cannot save them). 4096 fp32 per program = 16 per thread at 8 warps, i.e. four
# 128-bit loads of each stream in flight per thread; the small config gives small problems (a few
# shards or a tiny model) enough programs to cover every SM.
CONFIGS = (EmaConfig(4096, 8), EmaConfig(1024, 4))
SMALL_PROBLEM = 1 << 21  # elements; below this the 1024-element config is used (2048 programs)
ALIGN = 16  # bytes; a tensor whose three addresses are 16-byte aligned gets 128-bit accesses


def pick_config(numel: int) -> EmaConfig:
    return CONFIGS[1] if numel < SMALL_PROBLEM else CONFIGS[0]


# ---------------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _round_to(x, DTYPE: tl.constexpr):
        """fp32 -> DTYPE rounded to nearest even. bf16 by integer arithmetic (c10 ``round_to_nearest_even``):
        the same bits as a ``cvt.rn`` on the GPU, and also right in the interpreter, whose bf16 cast truncates."""
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
            rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
            return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(DTYPE)

    # no specialization on the flags (1 would become a constexpr) nor on the witness pointers' alignment:
    # the variants stay exactly those aot_specs() lists
    @triton.jit(do_not_specialize=["T0_ptr", "S0_ptr", "C0_ptr", "multi", "use_m"])
    def _ema_fwd_kernel(
        T0_ptr, S0_ptr, C0_ptr,  # the group's first tensors: typed pointers that carry the dtypes only
        entry_ptr,  # int64 [n_entries, 5]: target, source, copy addresses, numel, all-16-byte-aligned
        block_ptr,  # int64 [n_blocks]: (entry << 32) | block within the entry; unread if one entry
        multi,  # i32: more than one entry (else program i is block i of entry 0)
        M_ptr,  # *fp64 0-d momentum (read when use_m)
        w_arg,  # fp32 weight 1 - m (used when not use_m)
        use_m,  # i32
        HAS_COPY: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        """``t <- lerp(t, s, w)`` in fp32 over one BLOCK_SIZE chunk of one tensor; ``c <- t`` (bf16/fp16)."""
        pid = tl.program_id(0).to(tl.int64)
        if multi != 0:
            desc = tl.load(block_ptr + pid)
        else:
            desc = pid
        entry = entry_ptr + (desc >> 32) * 5
        start = (desc & 0xFFFFFFFF) * BLOCK_SIZE
        numel = tl.load(entry + 3)
        if use_m != 0:
            # 1 - m in fp64: in fp32 1 - 0.9999 is off by ~6e-4 relative
            w = (1.0 - tl.load(M_ptr).to(tl.float64)).to(tl.float32)
        else:
            w = w_arg
        offs = start + tl.arange(0, BLOCK_SIZE)
        if (start + BLOCK_SIZE <= numel) & (tl.load(entry + 4) != 0):
            # full block of an aligned tensor: the hint gives a pointer read from memory the 16-byte
            # alignment the host checked, so loads and stores are unmasked and 128-bit (v4.b32)
            t_ptr = tl.multiple_of(tl.load(entry).to(T0_ptr.dtype), 16) + offs
            s_ptr = tl.multiple_of(tl.load(entry + 1).to(S0_ptr.dtype), 16) + offs
            t = tl.load(t_ptr)
            s = tl.load(s_ptr).to(tl.float32)
            d = s - t
            # torch.lerp's two-sided formula (ATen Lerp.h), so results match _foreach_lerp_
            new = tl.where(tl.abs(w) < 0.5, t + w * d, s - d * (1.0 - w))
            tl.store(t_ptr, new)
            if HAS_COPY:
                c_ptr = tl.multiple_of(tl.load(entry + 2).to(C0_ptr.dtype), 16) + offs
                tl.store(c_ptr, _round_to(new, C0_ptr.dtype.element_ty))
        else:
            mask = offs < numel
            t_ptr = tl.load(entry).to(T0_ptr.dtype) + offs
            s_ptr = tl.load(entry + 1).to(S0_ptr.dtype) + offs
            t = tl.load(t_ptr, mask=mask, other=0.0)
            s = tl.load(s_ptr, mask=mask, other=0.0).to(tl.float32)
            d = s - t
            new = tl.where(tl.abs(w) < 0.5, t + w * d, s - d * (1.0 - w))
            tl.store(t_ptr, new, mask=mask)
            if HAS_COPY:
                c_ptr = tl.load(entry + 2).to(C0_ptr.dtype) + offs
                tl.store(c_ptr, _round_to(new, C0_ptr.dtype.element_ty), mask=mask)
else:  # pragma: no cover
    _ema_fwd_kernel = None


# ---------------------------------------------------------------------------------------------------
# Launcher: a cached pointer table per list of tensors
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Plan:
    config: EmaConfig
    entries: torch.Tensor  # int64 [n_entries, 5] on the device
    blocks: torch.Tensor  # int64 [n_blocks] on the device (or a 1-element dummy)
    n_entries: int
    n_blocks: int


_PLANS: collections.OrderedDict[tuple, _Plan] = collections.OrderedDict()
_PLAN_CACHE_SIZE = 32
_DUMMY_MOMENTUM: dict = {}


def _build_plan(device, rows: list) -> _Plan:
    """rows: (target, source, copy addresses, numel, target, source, copy element sizes) per tensor.

    Views that continue one another (a list of views of one flat buffer) merge into one entry, so a
    flat buffer or a single tensor needs no per-block table at all.
    """
    merged = []
    for row in rows:
        ta, sa, ca, n, te, se, ce = row
        if merged:
            pt, ps, pc, pn = merged[-1][:4]
            if ta == pt + pn * te and sa == ps + pn * se and (ca == pc + pn * ce if ce else True):
                merged[-1][3] += n
                continue
        merged.append([ta, sa, ca, n, te, se, ce])
    total = sum(m[3] for m in merged)
    config = pick_config(total)
    table, per_entry = [], []
    for ta, sa, ca, n, _te, _se, ce in merged:
        aligned = ta % ALIGN == 0 and sa % ALIGN == 0 and (ca % ALIGN == 0 if ce else True)
        table.append([ta, sa, ca, n, int(aligned)])
        per_entry.append(triton.cdiv(n, config.block_size))
    n_blocks = sum(per_entry)
    entries = torch.tensor(table, dtype=torch.int64).to(device)
    if len(merged) > 1:
        ids = torch.repeat_interleave(torch.arange(len(merged), dtype=torch.int64), torch.tensor(per_entry))
        firsts = torch.cumsum(torch.tensor([0] + per_entry[:-1]), 0)
        within = torch.arange(n_blocks, dtype=torch.int64) - torch.repeat_interleave(firsts, torch.tensor(per_entry))
        blocks = ((ids << 32) | within).to(device)
    else:
        blocks = entries  # never read
    return _Plan(config, entries, blocks, len(merged), n_blocks)


_data_ptr, _numel = torch.Tensor.data_ptr, torch.Tensor.numel


def _get_plan(targets, sources, copies) -> _Plan:
    """The pointer table for these tensors, built once per (addresses, sizes): the key determines the
    table completely, so a hit is always valid, even for new tensors at old addresses."""
    # map over unbound methods: the per-step cost is a few C-level loops over the lists
    key = (tuple(map(_data_ptr, targets)), tuple(map(_data_ptr, sources)), tuple(map(_numel, targets)),
           sources[0].dtype, targets[0].device)
    if copies is not None:
        key += (tuple(map(_data_ptr, copies)), copies[0].dtype)
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return plan
    te, se = 4, sources[0].element_size()
    ce = copies[0].element_size() if copies is not None else 0
    rows = [(t.data_ptr(), s.data_ptr(), copies[i].data_ptr() if copies is not None else 0, t.numel(), te, se, ce)
            for i, (t, s) in enumerate(zip(targets, sources)) if t.numel() > 0]
    plan = _build_plan(targets[0].device, rows) if rows else None
    _PLANS[key] = plan
    if len(_PLANS) > _PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


def _launch(targets, sources, copies, momentum: Optional[torch.Tensor], weight: float) -> None:
    """One kernel launch over a group of tensors sharing (source dtype, copy dtype)."""
    plan = _get_plan(targets, sources, copies)
    if plan is None:
        return
    device = targets[0].device
    if momentum is None:
        momentum = _DUMMY_MOMENTUM.get(device)
        if momentum is None:
            momentum = _DUMMY_MOMENTUM[device] = torch.zeros((), dtype=torch.float64, device=device)
        use_m = 0
    else:
        use_m = 1
    c0 = copies[0] if copies is not None else targets[0]
    _ema_fwd_kernel[(plan.n_blocks,)](
        targets[0], sources[0], c0, plan.entries, plan.blocks, int(plan.n_entries > 1),
        momentum, weight, use_m,
        HAS_COPY=copies is not None, BLOCK_SIZE=plan.config.block_size, num_warps=plan.config.num_warps,
    )


# ---------------------------------------------------------------------------------------------------
# Custom op (torch.compile sees an opaque in-place op)
# ---------------------------------------------------------------------------------------------------
def _ema_impl(targets: list, sources: list, momentum: Optional[torch.Tensor], weight: float,
              copy_out: Optional[list]) -> None:
    """One launch per (source dtype, copy dtype) group; ``momentum`` (0-d fp64 on the targets' device)
    wins over ``weight``; ``copy_out`` is None or one bf16/fp16 tensor per target."""
    src_dtypes = set(map(_dtype, sources))
    copy_dtypes = set(map(_dtype, copy_out)) if copy_out is not None else {None}
    if len(src_dtypes) == 1 and len(copy_dtypes) == 1:  # the usual case: one launch
        _launch(targets, sources, copy_out, momentum, weight)
        return
    groups: dict = {}
    for i, s in enumerate(sources):
        groups.setdefault((s.dtype, copy_out[i].dtype if copy_out is not None else None), []).append(i)
    for idx in groups.values():
        sub_c = [copy_out[i] for i in idx] if copy_out is not None else None
        _launch([targets[i] for i in idx], [sources[i] for i in idx], sub_c, momentum, weight)


@torch.library.custom_op("fastjepa_kernels::ema_", mutates_args=("targets", "copy_out"))
def _ema_op(targets: list[torch.Tensor], sources: list[torch.Tensor], momentum: Optional[torch.Tensor],
            weight: float, copy_out: list[torch.Tensor]) -> None:
    """:func:`_ema_impl` as an op torch.compile can trace (``copy_out`` empty for none)."""
    _ema_impl(targets, sources, momentum, weight, copy_out or None)


@_ema_op.register_fake
def _(targets, sources, momentum, weight, copy_out) -> None:
    return None


# ---------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------
def _dtype(t):  # functions rather than operator.attrgetter, which torch.compile cannot trace
    return t.dtype


def _shape(t):
    return t.shape


_is_contiguous, _get_device = torch.Tensor.is_contiguous, torch.Tensor.get_device


def _as_list(x, name: str) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return list(x)
    raise TypeError(f"ema_: {name} must be a tensor or a list of tensors, got {type(x).__name__}")


def ema_(target, source, momentum, backend: str = "auto", copy_out=None) -> None:
    """Update ``target`` in place towards ``source``: ``target = m * target + (1 - m) * source``.

    target: a tensor or a list of contiguous fp32 tensors (e.g. a ZeRO shard ``flat[start:end]``).
    source: the same shapes, fp32/bf16/fp16, contiguous.
    momentum: float, or a 0-d tensor (e.g. 1.0 on a skipped step, so no host sync is needed); a
        device tensor is read by the kernel, a CPU tensor with CUDA targets is read on the host.
    copy_out: optional tensor/list like target, bf16 or fp16: receives the updated target, rounded.
    backend: "reference", "triton" (CUDA, or CPU under ``TRITON_INTERPRET=1``) or "auto".
    """
    targets = _as_list(target, "target")
    sources = _as_list(source, "source")
    copies = None if copy_out is None else _as_list(copy_out, "copy_out")
    if len(targets) != len(sources) or (copies is not None and len(copies) != len(targets)):
        raise ValueError(f"ema_: {len(targets)} targets but {len(sources)} sources"
                         + ("" if copies is None else f" and {len(copies)} copy_out tensors"))
    if backend not in BACKENDS:
        raise ValueError(f"ema backend {backend!r} is unknown; choose one of {BACKENDS}")
    if not targets:
        return
    device = targets[0].device
    # C-level loops over the lists (map with unbound methods): ~1 us per tensor less than a Python loop
    if set(map(_dtype, targets)) != {torch.float32}:
        raise TypeError(f"ema_: target must be float32 (bf16 EMA stalls), got {set(map(_dtype, targets))}")
    if not set(map(_dtype, sources)) <= set(SOURCE_DTYPES):
        raise TypeError(f"ema_: source must be one of {SOURCE_DTYPES}, got {set(map(_dtype, sources))}")
    shapes = list(map(_shape, targets))
    if shapes != list(map(_shape, sources)):
        bad = next(i for i, (t, s) in enumerate(zip(targets, sources)) if t.shape != s.shape)
        raise ValueError(f"ema_: shape mismatch {tuple(targets[bad].shape)} vs {tuple(sources[bad].shape)}")
    if not (all(map(_is_contiguous, targets)) and all(map(_is_contiguous, sources))):
        raise ValueError("ema_: target and source must be contiguous (a slice of a flat buffer is fine)")
    index = device.index if device.type == "cuda" else -1  # get_device(): -1 for CPU
    if set(map(_get_device, targets)) != {index} or set(map(_get_device, sources)) != {index}:
        raise ValueError(f"ema_: every tensor must be on {device}")
    if copies is not None:
        if not set(map(_dtype, copies)) <= set(COPY_DTYPES):
            raise TypeError(f"ema_: copy_out must be one of {COPY_DTYPES}, got {set(map(_dtype, copies))}")
        if (list(map(_shape, copies)) != shapes or not all(map(_is_contiguous, copies))
                or set(map(_get_device, copies)) != {index}):
            raise ValueError("ema_: copy_out must be contiguous, on the target's device, of the target's shape")

    # the one backend rule of every op (dtypes and devices were checked above for every tensor)
    backend = "triton" if use_triton("ema_", backend, (targets[0], sources[0]), TRITON_DTYPES) else "reference"

    if isinstance(momentum, torch.Tensor):
        if momentum.dim() != 0:
            raise ValueError(f"ema_: a tensor momentum must be 0-d, got shape {tuple(momentum.shape)}")
        if momentum.device.type == "cpu" and device.type != "cpu":
            momentum = float(momentum)  # already on the host: reading it costs no device sync

    if backend == "reference":
        with torch.no_grad():
            ema_reference_(targets, sources, 1.0 - momentum)
            if copies is not None:
                torch._foreach_copy_(copies, targets)
        return

    if isinstance(momentum, torch.Tensor):
        if momentum.device != device:
            raise ValueError(f"ema_: momentum is on {momentum.device}, the targets on {device}")
        m = momentum if momentum.dtype == torch.float64 else momentum.to(torch.float64)  # a device cast
        w = 0.0
    else:
        m, w = None, 1.0 - float(momentum)
    if torch.compiler.is_compiling():
        _ema_op(targets, sources, m, w, copies or [])
    else:
        # eager: skip the dispatcher, whose per-tensor version bumps cost ~1 us per tensor on the host
        # (the EMA targets are never saved for backward, so nothing reads those versions)
        _ema_impl(targets, sources, m, w, copies)


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs
# ---------------------------------------------------------------------------------------------------


def aot_specs():
    """Every variant the launcher can pick: config x source dtype x copy-out (none, bf16, fp16)."""
    from .aot import AotSpec

    specs = []
    for cfg in CONFIGS:
        for src in SOURCE_DTYPES:
            for copy in (None,) + COPY_DTYPES:
                s, c = TRITON_DTYPES[src], TRITON_DTYPES[copy] if copy is not None else None
                signature = {"T0_ptr": "*fp32", "S0_ptr": f"*{s}", "C0_ptr": f"*{c or 'fp32'}",
                             "entry_ptr": "*i64", "block_ptr": "*i64", "multi": "i32", "M_ptr": "*fp64",
                             "w_arg": "fp32", "use_m": "i32", "HAS_COPY": "constexpr", "BLOCK_SIZE": "constexpr"}
                specs.append(AotSpec(
                    name=f"ema_fwd[src{s},copy{c or 'none'},B{cfg.block_size},w{cfg.num_warps}]",
                    fn=_ema_fwd_kernel, signature=signature,
                    constexprs={"HAS_COPY": copy is not None, "BLOCK_SIZE": cfg.block_size},
                    num_warps=cfg.num_warps, num_stages=1, wants_wgmma=False))
    return specs
