"""Non-causal attention over packed variable-length sequences.

Layout (the flash-attn varlen convention): ``q, k, v`` are ``[T, H, d]`` where ``T = sum(lengths)``;
``cu_seqlens`` is int32 ``[B + 1]`` with ``cu_seqlens[0] = 0``, ``cu_seqlens[i]`` the first row of
sequence ``i`` and ``cu_seqlens[B] = T``; ``max_seqlen`` is a host int. Token ``t`` of sequence ``i``
attends to every token of sequence ``i`` and to nothing else. ``varlen_attention_qkvpacked`` takes the
``[T, 3, H, d]`` output of a fused qkv projection as is.

Backends:
- ``sdpa``: the reference. Equal lengths (a full-image batch) go straight to
  ``scaled_dot_product_attention`` on ``[B, H, L, d]``; unequal lengths are padded to ``max_seqlen``
  with a key-padding mask, all index maths on the device, so the host never waits.
- ``triton``: fused flash-attention-2 kernels (custom ops ``fastjepa_kernels::varlen_attention_fwd``
  / ``_bwd`` and ``varlen_attention_qkvpacked_fwd`` / ``_bwd``), on CUDA, or on CPU tensors under
  ``TRITON_INTERPRET=1``. fp32 / bf16 / fp16; head dims 8..128 that are multiples of 8.
- ``auto`` (default): ``triton`` for CUDA tensors when Triton imports and the head dim is supported,
  else ``sdpa``.

Triton design:
- Grid over real work only. The host knows ``T``, ``B`` and ``max_seqlen`` but not the lengths, so it
  launches ``min(ceil(T / 64) + B, B * ceil(max_seqlen / 64))`` programs per head (an upper bound on
  ``sum_i ceil(len_i / 64)``) and a device-side table, built from ``cu_seqlens`` with a handful of torch
  ops (no host sync), maps program ``p`` to ``(sequence, tile)``; programs past the real tile count
  read sequence ``-1``, treat it as length 0 and store nothing. The table is built inside
  the custom ops (so ``torch.compile`` never traces it into a block's graph) and cached per
  ``cu_seqlens`` tensor (same object and version), so the 32 layers of an encoder pass, forward and
  backward, build it once.
  One tile size (64 rows) serves every kernel so one table serves forward and backward: the I-JEPA
  sequences are 90-260 tokens, where 64-row tiles waste at most 63 rows per sequence (128-row tiles
  would waste up to 127; they would help only long sequences by reusing K/V tiles more).
- Head dims that are not a power of two are split in two power-of-two column chunks loaded as
  separate tiles, the ``QK^T`` products summed across chunks and ``PV`` / gradients accumulated per
  chunk: 80 = 64 + 16, 96 = 64 + 32, 48 = 32 + 16 (padding to 128 / 64 would do 1.6x / 1.33x the work
  on 80 / 96). ``tl.dot`` needs K >= 16 (and N >= 16 for ``PV``), so a remainder narrower than 16 is
  loaded as 16 columns with the missing ones masked to zero (72 = 64 + 16 of which 8 are real). For
  24 = 16 + 8 that makes 16 + 16 columns, the same work as one 32-wide chunk, so 24 runs as one masked
  32-wide chunk (fewer, larger dots): a third more than 24 columns, the least a tensor-core ``mma``
  with K = 16 allows short of a scalar path. A remainder as wide as the first chunk (112 = 64 + 48 ->
  64 + 64) is likewise merged into one chunk.
- Forward (FA2, Dao 2023, Algorithm 1): online softmax in base 2, ``exp2`` with
  ``softmax_scale * log2(e)`` folded into one multiply of the scores; ``P`` is rounded to the input dtype
  for the ``PV`` product (as flash-attn does); the log-sum-exp is saved as fp32 ``[H, T]`` in base-2
  units of the scaled scores (``lse2 = m + log2(l)``), so the backward recomputes ``P = exp2(S' - lse2)``.
- Backward (FA2, Algorithm 2, in the two-kernel form of Triton's fused-attention tutorial): a dQ pass
  over query tiles, which also computes ``delta = rowsum(dO * O)`` for its rows from tiles it loads
  anyway (so there is no separate preprocess launch) and stores it, then a dK/dV pass over key tiles
  that reads ``delta``. Each gradient element is written by exactly one program: no atomics, no
  zero-fill, bit-for-bit deterministic (the atomic-dQ alternative saves recomputing ``QK^T`` once but
  gives run-to-run noise and needs an fp32 dQ buffer plus a cast).
- All tensors are read and written through (token, head) strides with a unit column stride, so the
  packed entry point reads q/k/v as views of ``qkv`` and writes dq/dk/dv into one ``[T, 3, H, d]``
  gradient. Row offsets are int64 (``T * 3 * H * d`` can pass 2**31). Strides must be multiples of 8
  elements and data 16-byte aligned (the launchers copy views that are not), which the kernels state
  with ``tl.multiple_of`` so rows load as 16-byte vectors / ``cp.async`` even when the head stride is
  24. Padded rows and columns load as zeros; only the forward needs a ``-inf`` key mask (in the
  backward, zero K / Q / dO rows make padded keys or queries contribute nothing).
- fp32 inputs use ``input_precision="ieee"`` dots (exact fp32, no tensor cores: for tests and
  references); bf16/fp16 use tensor cores with fp32 accumulation.
- Launch configurations are fixed, not autotuned: :data:`CONFIG_TABLE` maps (compute capability
  major, head dim, dtype) to one configuration per kernel. The tile sizes set the order in which each
  row's sums are formed, so a per-process autotuner could give two runs, a resumed run or two ranks
  different bits, and it benchmarked in the middle of training whenever a new key (a ``max_seqlen``
  bucket) appeared. Same inputs, same GPU kind: same bits. Benchmarks A/B the alternatives in
  :data:`CANDIDATES` through :func:`override_configs`; ``fastjepa_kernels.aot`` compiles them all.
  Two interpreter-only shims (Triton 3.6 with NumPy 2.4) live in ``_mm`` / ``_loop_end``; the compiled
  kernels do not see them.
- ``max_seqlen`` must be >= every length (it bounds the grid, as in flash-attn); the kernels read the
  real lengths from ``cu_seqlens``. Rows outside ``cu_seqlens`` or lengths above ``max_seqlen`` are
  never written; ``FASTJEPA_KERNELS_DEBUG=1`` checks both on every launch (host syncs: debugging only)
  and raises a one-line error. Under ``torch.compile`` ``max_seqlen`` may be a symbolic int: nothing
  here specialises on its value, so a new value does not recompile a graph.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import weakref

import torch
import torch.nn.functional as F

from ._backend import TRITON_DTYPES, debugging, interpreting, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without Triton (sdpa backend only)
    triton = None
    tl = None

BACKENDS = ("sdpa", "triton", "auto")


# ---------------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------
TILE = 64  # rows per program in every kernel: query rows (forward, dQ) or key rows (dK/dV)
_INTERPRETING = interpreting()  # fixed when the kernels are decorated
# Tests set this to allocate every output with NaN, so an element a kernel fails to write shows up.
POISON_OUTPUTS = os.environ.get("FASTJEPA_KERNELS_POISON", "0") not in ("", "0")
# Check cu_seqlens against the tokens and max_seqlen on every launch (host syncs; debugging only).
DEBUG = debugging()


def head_dim_chunks(dim: int) -> tuple[int, int]:
    """``(BLOCK_D0, BLOCK_D1)``: power-of-two column chunks covering ``dim`` (``BLOCK_D1 = 0``: one chunk).

    The first chunk is the largest power of two <= dim (at least 16, the ``tl.dot`` minimum); the rest
    is rounded up to a power of two >= 16, or merged into one chunk when that is no wider."""
    d0 = max(16, 1 << (dim.bit_length() - 1))
    rest = dim - d0
    if rest <= 0:
        return d0, 0
    d1 = max(16, triton.next_power_of_2(rest) if triton else 1 << (rest - 1).bit_length())
    if d1 >= d0:  # e.g. 112 = 64 + 48 -> 64 + 64: one 128-wide chunk does the same work in fewer dots
        return 2 * d0, 0
    return d0, d1


def _supported_head_dim(dim: int) -> bool:
    return 8 <= dim <= 128 and dim % 8 == 0


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launch configuration. ``inner``: the key block (``BLOCK_N``) of the forward and dQ loops, the
    query block (``BLOCK_M``) of the dK/dV loop; the outer tile is always :data:`TILE` rows. ``heads``:
    heads per program, unrolled (1 when the head count is not a multiple); each head's maths and
    summation order are the same whatever the value."""

    inner: int
    num_warps: int = 4
    num_stages: int = 3
    heads: int = 1

    @property
    def label(self) -> str:
        return f"{self.inner},w{self.num_warps},s{self.num_stages}" + (f",h{self.heads}" if self.heads > 1 else "")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    fwd: KernelConfig
    dq: KernelConfig
    dkdv: KernelConfig


KERNELS = ("fwd", "dq", "dkdv")
# Every configuration a launch may use: the table's entries and the alternatives the benchmarks A/B
# (benchmarks/test_kernels_attention.py::test_attention_config_candidates). ``fastjepa_kernels.aot``
# compiles each for sm_80 and sm_90. Shared memory at d = 128, bf16 (AOT, sm_90): forward 112 KB (64-key
# blocks, 3 stages) / 144 KB (128-key, 2 stages); dQ 80 / 96 KB; dK/dV 80 / 96 KB; on sm_80 every one
# is <= 96 KB, so each also fits the 99 KB of sm_86/sm_89. The two-heads-per-program variants are for
# the predictor's d = 24 (~154-token sequences, latency-bound: 38 TFLOP/s forward on an H100, 5.5 % of
# the measured GEMM rate; benchmarks/results/h100-sxm-2026-11-28-5c15091.json) and wait for a device
# check to show whether they win there (compiled AOT for head dims <= MULTI_HEAD_MAX_DIM only).
MULTI_HEAD_MAX_DIM = 32
CANDIDATES = {
    "fwd": (KernelConfig(64, 4, 3), KernelConfig(128, 4, 2), KernelConfig(64, 4, 3, heads=2)),
    "dq": (KernelConfig(32, 4, 3), KernelConfig(64, 4, 2), KernelConfig(32, 4, 3, heads=2)),
    "dkdv": (KernelConfig(32, 4, 3), KernelConfig(64, 4, 2), KernelConfig(32, 4, 3, heads=2)),
}
# fp32 (ieee dots, no tensor cores) is for tests and references, not for speed: small tiles everywhere.
FP32_CONFIG = AttentionConfig(KernelConfig(32, 4, 2), KernelConfig(32, 4, 2), KernelConfig(32, 4, 2))
# The 16-bit default: the first candidate of each kernel (the configuration the interpreter tests have
# always run). benchmarks/results/h100-sxm-2026-11-28-5c15091.json timed the autotuner's pick without
# recording which it was, so no measurement decides between the candidates yet: the next device check
# must confirm (or replace) these entries with test_attention_config_candidates.
DEFAULT_16BIT = AttentionConfig(CANDIDATES["fwd"][0], CANDIDATES["dq"][0], CANDIDATES["dkdv"][0])
AOT_HEAD_DIMS = (24, 32, 64, 80, 88, 96, 128)  # ViT-H predictor (24), ViT-H encoder (80), ViT-g (88)
# (compute capability major, head dim, dtype) -> configuration. Source of every entry: DEFAULT_16BIT
# (see above; unmeasured). Keys not listed (another GPU, another head dim) fall back to DEFAULT_16BIT,
# fp32 always takes FP32_CONFIG. Edit single entries here as device checks measure them.
CONFIG_TABLE: dict = {
    (arch, dim, dtype): DEFAULT_16BIT
    for arch in (8, 9)  # Ampere (A100; sm_86/89 too), Hopper (H100, H200)
    for dim in AOT_HEAD_DIMS
    for dtype in (torch.bfloat16, torch.float16)
}
_OVERRIDE: dict = {}  # kernel name -> KernelConfig, set only by override_configs (benchmarks, tests)


def config_for(arch, dim: int, dtype: torch.dtype) -> AttentionConfig:
    """The fixed configuration of (compute capability major or None under the interpreter, head dim,
    dtype), with any :func:`override_configs` applied."""
    if dtype == torch.float32:
        config = FP32_CONFIG
    else:
        config = CONFIG_TABLE.get((arch, dim, dtype), DEFAULT_16BIT)
    return dataclasses.replace(config, **_OVERRIDE) if _OVERRIDE else config


@contextlib.contextmanager
def override_configs(**kernels: KernelConfig):
    """Run the kernels named (``fwd``, ``dq``, ``dkdv``) with these configurations instead of the table's,
    for A/B timing in benchmarks and for tests; each must be one of :data:`CANDIDATES` (compiled AOT)."""
    for name, config in kernels.items():
        if name not in KERNELS:
            raise ValueError(f"unknown attention kernel {name!r}; choose from {KERNELS}")
        if config not in CANDIDATES[name] and config != getattr(FP32_CONFIG, name):
            raise ValueError(f"{name} config {config} is not among the compiled candidates {CANDIDATES[name]}")
    saved = dict(_OVERRIDE)
    _OVERRIDE.update(kernels)
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(saved)


@functools.cache
def _arch(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


# ---------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------
if triton is not None:

    if _INTERPRETING:
        @triton.jit
        def _mm(a, b, PRECISION: tl.constexpr):
            # Triton 3.6's interpreter multiplies bf16 tiles as their raw uint16 bits (its create_dot
            # feeds the storage arrays to np.matmul); fp32 copies are exact and give the tensor-core result
            return tl.dot(a.to(tl.float32), b.to(tl.float32))

        @triton.jit
        def _mm_acc(a, b, acc, PRECISION: tl.constexpr):
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)

        def _loop_end(n):
            """A loaded scalar as a Python int for ``range``. Triton 3.6's interpreter holds scalars as
            1-element arrays and its ``__index__`` calls ``int()`` on them, which NumPy >= 2.4 rejects."""
            return int(n.handle.data.reshape(-1)[0])
    else:
        @triton.jit
        def _mm(a, b, PRECISION: tl.constexpr):
            return tl.dot(a, b, input_precision=PRECISION)

        @triton.jit
        def _mm_acc(a, b, acc, PRECISION: tl.constexpr):
            return tl.dot(a, b, acc, input_precision=PRECISION)

        @triton.jit
        def _loop_end(n):
            return n

    # The launchers pass only views whose (token, head) strides are multiples of 8 elements and whose
    # data starts on 16 bytes, and say so with tl.multiple_of: Triton specialises strides divisible by
    # 16 on its own, but the d = 24 head stride (24) is not, and without the hint every row start would
    # be only element-aligned (scalar loads, no cp.async pipelining).
    @triton.jit
    def _head(PTR, head, stride_h):
        return PTR + tl.multiple_of(head.to(tl.int64) * stride_h, 8)

    @triton.jit
    def _load_rows(BASE, rows, row_ok, stride_t, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
        """``[len(rows), WIDTH]`` tile of columns ``COL0 ..`` of a ``[T, d]`` head view (unit column
        stride); rows not ``row_ok`` and columns >= HEAD_DIM read 0."""
        cols = COL0 + tl.arange(0, WIDTH)
        ptrs = BASE + tl.multiple_of(rows.to(tl.int64) * stride_t, 8)[:, None] + cols[None, :]
        return tl.load(ptrs, mask=row_ok[:, None] & (cols[None, :] < HEAD_DIM), other=0.0)

    @triton.jit
    def _store_rows(BASE, value, rows, row_ok, stride_t, COL0: tl.constexpr, WIDTH: tl.constexpr,
                    HEAD_DIM: tl.constexpr):
        cols = COL0 + tl.arange(0, WIDTH)
        ptrs = BASE + tl.multiple_of(rows.to(tl.int64) * stride_t, 8)[:, None] + cols[None, :]
        tl.store(ptrs, value.to(BASE.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < HEAD_DIM))

    @triton.jit
    def _tile_of_program(CU_SEQLENS, TILES):
        """(first row, length, tile) of this program's (sequence, tile); length 0 past the real tiles."""
        pid = tl.program_id(0)
        seq = tl.load(TILES + 2 * pid)
        tile = tl.load(TILES + 2 * pid + 1)
        real = seq >= 0
        seq = tl.maximum(seq, 0)
        start = tl.load(CU_SEQLENS + seq)
        seqlen = tl.where(real, tl.load(CU_SEQLENS + seq + 1) - start, 0)
        return start, seqlen, tile

    @triton.jit
    def _attention_fwd_kernel(
        Q, K, V, O, LSE, CU_SEQLENS, TILES,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        total_tokens, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
        HEADS_PER_PROGRAM: tl.constexpr,
    ):
        """One (sequence, 64-query tile, head or heads): ``O = softmax(Q K^T * scale) V`` and ``LSE`` (base 2).

        ``qk_scale = softmax_scale * log2(e)``, so ``exp2(qk_scale * s) = exp(softmax_scale * s)``.
        FA2 forward (Dao 2023, arXiv:2307.08691, Algorithm 1) with the running max and sum per row."""
        start, seqlen, tile = _tile_of_program(CU_SEQLENS, TILES)
        # one program runs HEADS_PER_PROGRAM heads of its (sequence, tile), unrolled: the table lookup
        # is shared and one head's loads can overlap another's maths (short sequences are latency-bound)
        for head_in_program in tl.static_range(HEADS_PER_PROGRAM):
            head = tl.program_id(1) * HEADS_PER_PROGRAM + head_in_program
            offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < seqlen
            rows_q = start + offs_m
            q_base = _head(Q, head, stride_qh)
            k_base = _head(K, head, stride_kh)
            v_base = _head(V, head, stride_vh)
            q0 = _load_rows(q_base, rows_q, m_ok, stride_qt, 0, BLOCK_D0, HEAD_DIM)
            acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
            if BLOCK_D1 > 0:
                q1 = _load_rows(q_base, rows_q, m_ok, stride_qt, BLOCK_D0, BLOCK_D1, HEAD_DIM)
                acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            for n0 in range(0, _loop_end(seqlen), BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_ok = offs_n < seqlen
                rows_k = start + offs_n
                k0 = _load_rows(k_base, rows_k, n_ok, stride_kt, 0, BLOCK_D0, HEAD_DIM)
                s = _mm(q0, tl.trans(k0), DOT_PRECISION)
                if BLOCK_D1 > 0:
                    k1 = _load_rows(k_base, rows_k, n_ok, stride_kt, BLOCK_D0, BLOCK_D1, HEAD_DIM)
                    s = _mm_acc(q1, tl.trans(k1), s, DOT_PRECISION)
                # every key block starts inside the sequence, so each row has a finite maximum
                s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v0 = _load_rows(v_base, rows_k, n_ok, stride_vt, 0, BLOCK_D0, HEAD_DIM)
                acc0 = _mm_acc(p.to(v0.dtype), v0, acc0 * alpha[:, None], DOT_PRECISION)
                if BLOCK_D1 > 0:
                    v1 = _load_rows(v_base, rows_k, n_ok, stride_vt, BLOCK_D0, BLOCK_D1, HEAD_DIM)
                    acc1 = _mm_acc(p.to(v1.dtype), v1, acc1 * alpha[:, None], DOT_PRECISION)
                m_i = m_new
            l_i = tl.where(l_i > 0.0, l_i, 1.0)  # 0 only in programs past the real tiles (nothing stored)
            inv_l = 1.0 / l_i
            o_base = _head(O, head, stride_oh)
            _store_rows(o_base, acc0 * inv_l[:, None], rows_q, m_ok, stride_ot, 0, BLOCK_D0, HEAD_DIM)
            if BLOCK_D1 > 0:
                _store_rows(o_base, acc1 * inv_l[:, None], rows_q, m_ok, stride_ot, BLOCK_D0, BLOCK_D1, HEAD_DIM)
            tl.store(LSE + head * total_tokens + rows_q, m_i + tl.math.log2(l_i), mask=m_ok)

    @triton.jit
    def _attention_bwd_dq_kernel(
        Q, K, V, O, DO, DQ, LSE, DELTA, CU_SEQLENS, TILES,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        stride_dot, stride_doh, stride_dqt, stride_dqh,
        total_tokens, qk_scale, softmax_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
        HEADS_PER_PROGRAM: tl.constexpr,
    ):
        """One (sequence, 64-query tile, head): ``delta = rowsum(dO * O)`` (stored for the dK/dV pass) and
        ``dQ = scale * sum_j dS_j K_j`` with ``P = exp2(S' - LSE)``, ``dS = P * (dO V^T - delta)``
        (FA2 backward, Dao 2023, Algorithm 2)."""
        start, seqlen, tile = _tile_of_program(CU_SEQLENS, TILES)
        # one program runs HEADS_PER_PROGRAM heads of its (sequence, tile), unrolled: the table lookup
        # is shared and one head's loads can overlap another's maths (short sequences are latency-bound)
        for head_in_program in tl.static_range(HEADS_PER_PROGRAM):
            head = tl.program_id(1) * HEADS_PER_PROGRAM + head_in_program
            offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < seqlen
            rows_q = start + offs_m
            q_base = _head(Q, head, stride_qh)
            k_base = _head(K, head, stride_kh)
            v_base = _head(V, head, stride_vh)
            do_base = _head(DO, head, stride_doh)
            o_base = _head(O, head, stride_oh)
            q0 = _load_rows(q_base, rows_q, m_ok, stride_qt, 0, BLOCK_D0, HEAD_DIM)
            do0 = _load_rows(do_base, rows_q, m_ok, stride_dot, 0, BLOCK_D0, HEAD_DIM)
            o0 = _load_rows(o_base, rows_q, m_ok, stride_ot, 0, BLOCK_D0, HEAD_DIM)
            delta = tl.sum(do0.to(tl.float32) * o0.to(tl.float32), 1)
            dq0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
            if BLOCK_D1 > 0:
                q1 = _load_rows(q_base, rows_q, m_ok, stride_qt, BLOCK_D0, BLOCK_D1, HEAD_DIM)
                do1 = _load_rows(do_base, rows_q, m_ok, stride_dot, BLOCK_D0, BLOCK_D1, HEAD_DIM)
                o1 = _load_rows(o_base, rows_q, m_ok, stride_ot, BLOCK_D0, BLOCK_D1, HEAD_DIM)
                delta += tl.sum(do1.to(tl.float32) * o1.to(tl.float32), 1)
                dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
            tl.store(DELTA + head * total_tokens + rows_q, delta, mask=m_ok)
            lse = tl.load(LSE + head * total_tokens + rows_q, mask=m_ok, other=0.0)
            for n0 in range(0, _loop_end(seqlen), BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_ok = offs_n < seqlen
                rows_k = start + offs_n
                k0 = _load_rows(k_base, rows_k, n_ok, stride_kt, 0, BLOCK_D0, HEAD_DIM)
                v0 = _load_rows(v_base, rows_k, n_ok, stride_vt, 0, BLOCK_D0, HEAD_DIM)
                s = _mm(q0, tl.trans(k0), DOT_PRECISION)
                dp = _mm(do0, tl.trans(v0), DOT_PRECISION)
                if BLOCK_D1 > 0:
                    k1 = _load_rows(k_base, rows_k, n_ok, stride_kt, BLOCK_D0, BLOCK_D1, HEAD_DIM)
                    v1 = _load_rows(v_base, rows_k, n_ok, stride_vt, BLOCK_D0, BLOCK_D1, HEAD_DIM)
                    s = _mm_acc(q1, tl.trans(k1), s, DOT_PRECISION)
                    dp = _mm_acc(do1, tl.trans(v1), dp, DOT_PRECISION)
                # padded keys (score 0: zero K rows) must get P = 0: exp2(0 - lse) overflows to inf once lse
                # is very negative (every real score far below 0), and inf * 0 in ds @ K would make the
                # whole dQ row NaN. (In the dK/dV pass padded queries read lse = +inf, so P = 0 there.)
                p = tl.math.exp2(tl.where(n_ok[None, :], s * qk_scale - lse[:, None], float("-inf")))
                ds = (p * (dp - delta[:, None])).to(k0.dtype)
                dq0 = _mm_acc(ds, k0, dq0, DOT_PRECISION)
                if BLOCK_D1 > 0:
                    dq1 = _mm_acc(ds, k1, dq1, DOT_PRECISION)
            dq_base = _head(DQ, head, stride_dqh)
            _store_rows(dq_base, dq0 * softmax_scale, rows_q, m_ok, stride_dqt, 0, BLOCK_D0, HEAD_DIM)
            if BLOCK_D1 > 0:
                _store_rows(dq_base, dq1 * softmax_scale, rows_q, m_ok, stride_dqt, BLOCK_D0, BLOCK_D1, HEAD_DIM)

    @triton.jit
    def _attention_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, CU_SEQLENS, TILES,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
        total_tokens, qk_scale, softmax_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
        HEADS_PER_PROGRAM: tl.constexpr,
    ):
        """One (sequence, 64-key tile, head): ``dV = sum_i P_i^T dO_i`` and ``dK = scale * sum_i dS_i^T Q_i``,
        computed transposed (``P^T = exp2(K Q^T * qk_scale - LSE)``) so rows stay keys (FA2 Algorithm 2)."""
        start, seqlen, tile = _tile_of_program(CU_SEQLENS, TILES)
        # one program runs HEADS_PER_PROGRAM heads of its (sequence, tile), unrolled: the table lookup
        # is shared and one head's loads can overlap another's maths (short sequences are latency-bound)
        for head_in_program in tl.static_range(HEADS_PER_PROGRAM):
            head = tl.program_id(1) * HEADS_PER_PROGRAM + head_in_program
            offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < seqlen
            rows_k = start + offs_n
            q_base = _head(Q, head, stride_qh)
            k_base = _head(K, head, stride_kh)
            v_base = _head(V, head, stride_vh)
            do_base = _head(DO, head, stride_doh)
            k0 = _load_rows(k_base, rows_k, n_ok, stride_kt, 0, BLOCK_D0, HEAD_DIM)
            v0 = _load_rows(v_base, rows_k, n_ok, stride_vt, 0, BLOCK_D0, HEAD_DIM)
            dk0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
            dv0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
            if BLOCK_D1 > 0:
                k1 = _load_rows(k_base, rows_k, n_ok, stride_kt, BLOCK_D0, BLOCK_D1, HEAD_DIM)
                v1 = _load_rows(v_base, rows_k, n_ok, stride_vt, BLOCK_D0, BLOCK_D1, HEAD_DIM)
                dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
                dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
            for m0 in range(0, _loop_end(seqlen), BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                m_ok = offs_m < seqlen
                rows_q = start + offs_m
                q0 = _load_rows(q_base, rows_q, m_ok, stride_qt, 0, BLOCK_D0, HEAD_DIM)
                do0 = _load_rows(do_base, rows_q, m_ok, stride_dot, 0, BLOCK_D0, HEAD_DIM)
                # padded queries have zero Q and dO rows, so they add nothing; LSE = +inf also zeroes their P
                lse = tl.load(LSE + head * total_tokens + rows_q, mask=m_ok, other=float("inf"))
                delta = tl.load(DELTA + head * total_tokens + rows_q, mask=m_ok, other=0.0)
                s_t = _mm(k0, tl.trans(q0), DOT_PRECISION)
                dp_t = _mm(v0, tl.trans(do0), DOT_PRECISION)
                if BLOCK_D1 > 0:
                    q1 = _load_rows(q_base, rows_q, m_ok, stride_qt, BLOCK_D0, BLOCK_D1, HEAD_DIM)
                    do1 = _load_rows(do_base, rows_q, m_ok, stride_dot, BLOCK_D0, BLOCK_D1, HEAD_DIM)
                    s_t = _mm_acc(k1, tl.trans(q1), s_t, DOT_PRECISION)
                    dp_t = _mm_acc(v1, tl.trans(do1), dp_t, DOT_PRECISION)
                # padded keys (zero K rows, score 0) get P = 0 like in the dQ pass: their rows are never
                # stored, but exp2(-lse) = inf there would only make inf/NaN garbage
                p_t = tl.math.exp2(tl.where(n_ok[:, None], s_t * qk_scale - lse[None, :], float("-inf")))
                ds_t = (p_t * (dp_t - delta[None, :])).to(q0.dtype)
                p_t = p_t.to(do0.dtype)
                dv0 = _mm_acc(p_t, do0, dv0, DOT_PRECISION)
                dk0 = _mm_acc(ds_t, q0, dk0, DOT_PRECISION)
                if BLOCK_D1 > 0:
                    dv1 = _mm_acc(p_t, do1, dv1, DOT_PRECISION)
                    dk1 = _mm_acc(ds_t, q1, dk1, DOT_PRECISION)
            dk_base = _head(DK, head, stride_dkh)
            dv_base = _head(DV, head, stride_dvh)
            _store_rows(dk_base, dk0 * softmax_scale, rows_k, n_ok, stride_dkt, 0, BLOCK_D0, HEAD_DIM)
            _store_rows(dv_base, dv0, rows_k, n_ok, stride_dvt, 0, BLOCK_D0, HEAD_DIM)
            if BLOCK_D1 > 0:
                _store_rows(dk_base, dk1 * softmax_scale, rows_k, n_ok, stride_dkt, BLOCK_D0, BLOCK_D1, HEAD_DIM)
                _store_rows(dv_base, dv1, rows_k, n_ok, stride_dvt, BLOCK_D0, BLOCK_D1, HEAD_DIM)


# ---------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------
def tile_bound(total: int, batch: int, max_seqlen: int) -> int:
    """Host upper bound on ``sum_i ceil(len_i / TILE)`` from what the host knows (no lengths)."""
    return min(triton.cdiv(total, TILE) + batch, batch * triton.cdiv(max(int(max_seqlen), 1), TILE)) if total else 0


def build_tile_table(cu_seqlens: torch.Tensor, bound: int) -> torch.Tensor:
    """int32 ``[bound, 2]``: ``(sequence, tile)`` of program ``p``; ``(-1, *)`` past the real tile count.

    Torch ops on ``cu_seqlens``' device, no host sync."""
    batch = cu_seqlens.shape[0] - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    tiles = (lengths + TILE - 1) // TILE
    ends = torch.cumsum(tiles, 0)  # ends[i] = first program after sequence i
    program = torch.arange(bound, device=cu_seqlens.device)
    seq = torch.searchsorted(ends, program, right=True)
    real = seq < batch
    seq = seq.clamp_max(batch - 1)
    tile = program - (ends[seq] - tiles[seq])
    return torch.stack([torch.where(real, seq, -1), tile], 1).to(torch.int32)


_TABLE_CACHE: dict = {}


def _tile_table(cu_seqlens: torch.Tensor, bound: int) -> torch.Tensor:
    """:func:`build_tile_table`, reused while the same ``cu_seqlens`` tensor (same object, unmodified)
    comes back: every layer of an encoder pass shares one. Called inside the custom ops only (eager
    code even under ``torch.compile``)."""
    key = (id(cu_seqlens), bound)
    hit = _TABLE_CACHE.get(key)
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version:
        return hit[2]
    table = build_tile_table(cu_seqlens, bound)
    if len(_TABLE_CACHE) >= 16:
        _TABLE_CACHE.clear()
    _TABLE_CACHE[key] = (weakref.ref(cu_seqlens), cu_seqlens._version, table)
    return table


def _alloc(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    dtype = dtype or like.dtype
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _meta(q: torch.Tensor) -> dict:
    d0, d1 = head_dim_chunks(q.shape[-1])
    return dict(HEAD_DIM=q.shape[-1], BLOCK_D0=d0, BLOCK_D1=d1,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def launch_config(q: torch.Tensor) -> AttentionConfig:
    """The configuration the kernels run with for ``q [T, H, d]`` (its device, head dim and dtype)."""
    arch = _arch(q.device.index if q.device.index is not None else torch.cuda.current_device()) if q.is_cuda else None
    return config_for(arch, q.shape[-1], q.dtype)


def _launch(kernel, tiles: int, heads: int, args, meta, tile_name: str, inner_name: str, config: KernelConfig):
    per_program = config.heads if heads % config.heads == 0 else 1
    kernel[(tiles, heads // per_program)](*args, **meta, **{tile_name: TILE, inner_name: config.inner},
                                          HEADS_PER_PROGRAM=per_program, num_warps=config.num_warps,
                                          num_stages=config.num_stages)


def check_packing(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    """Raise ValueError unless ``cu_seqlens`` starts at 0, never decreases, ends at ``total`` and no
    length exceeds ``max_seqlen`` (otherwise some output rows would never be written). Host syncs."""
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens must run from 0 to the {total} tokens, got {int(cu[0])} .. {int(cu[-1])}")
    if (lengths < 0).any():
        raise ValueError(f"cu_seqlens decreases at sequence {int((lengths < 0).nonzero()[0])}")
    if lengths.numel() and int(lengths.max()) > max_seqlen:
        raise ValueError(f"a sequence has {int(lengths.max())} tokens, more than max_seqlen={max_seqlen}")


def _tiles(q: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    if DEBUG:
        check_packing(cu_seqlens, q.shape[0], max_seqlen)
    return _tile_table(cu_seqlens, tile_bound(q.shape[0], cu_seqlens.shape[0] - 1, max_seqlen))


def _fwd(q, k, v, out, cu_seqlens, max_seqlen: int, softmax_scale: float):
    """Launch the forward into ``out`` (any ``[T, H, d]`` view, unit column stride). Returns ``lse``."""
    total, heads, _ = q.shape
    lse = _alloc((heads, total), q, torch.float32)
    tiles = _tiles(q, cu_seqlens, max_seqlen)
    if tiles.shape[0] == 0:
        return lse
    args = (q, k, v, out, lse, cu_seqlens, tiles, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), out.stride(0), out.stride(1), total, softmax_scale * math.log2(math.e))
    with torch.cuda.device(q.device) if q.is_cuda else _nullcontext():
        _launch(_attention_fwd_kernel, tiles.shape[0], heads, args, _meta(q), "BLOCK_M", "BLOCK_N",
                launch_config(q).fwd)
    return lse


def _bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen: int, softmax_scale: float):
    """Launch the dQ pass (which also writes ``delta``) then the dK/dV pass into ``dq, dk, dv``."""
    total, heads, _ = q.shape
    tiles = _tiles(q, cu_seqlens, max_seqlen)
    if tiles.shape[0] == 0:
        return
    delta = _alloc((heads, total), q, torch.float32)
    qk_scale = softmax_scale * math.log2(math.e)
    meta = _meta(q)
    config = launch_config(q)
    with torch.cuda.device(q.device) if q.is_cuda else _nullcontext():
        _launch(_attention_bwd_dq_kernel, tiles.shape[0], heads,
                (q, k, v, out, dout, dq, lse, delta, cu_seqlens, tiles, q.stride(0), q.stride(1), k.stride(0),
                 k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
                 dq.stride(0), dq.stride(1), total, qk_scale, softmax_scale),
                meta, "BLOCK_M", "BLOCK_N", config.dq)
        _launch(_attention_bwd_dkdv_kernel, tiles.shape[0], heads,
                (q, k, v, dout, dk, dv, lse, delta, cu_seqlens, tiles, q.stride(0), q.stride(1), k.stride(0),
                 k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1),
                 dv.stride(0), dv.stride(1), total, qk_scale, softmax_scale),
                meta, "BLOCK_N", "BLOCK_M", config.dkdv)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _unit_col(t: torch.Tensor) -> torch.Tensor:
    """The kernels want a unit column stride, other strides in multiples of 8 elements and a 16-byte
    aligned start (see ``_head``); copy only views that break that (a contiguous ``[T, (3,) H, d]``
    with ``d % 8 == 0`` never does)."""
    ok = (t.stride(-1) == 1 and all(st % 8 == 0 for st in t.stride()[:-1])
          and t.data_ptr() % 16 == 0)
    return t if ok else t.clone(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------------
# custom ops and autograd
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastjepa_kernels::varlen_attention_fwd", mutates_args=())
def _varlen_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                   softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: ``(out [T, H, d] in q's dtype, lse [H, T] fp32 base 2)``."""
    q, k, v = _unit_col(q), _unit_col(k), _unit_col(v)
    out = _alloc(q.shape, q)
    lse = _fwd(q, k, v, out, cu_seqlens, max_seqlen, softmax_scale)
    return out, lse


@_varlen_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastjepa_kernels::varlen_attention_bwd", mutates_args=())
def _varlen_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                   softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: ``(dq, dk, dv)``, each ``[T, H, d]`` in q's dtype."""
    dout, q, k, v, out = (_unit_col(t) for t in (dout, q, k, v, out))
    dq, dk, dv = (_alloc(q.shape, q) for _ in range(3))
    _bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen, softmax_scale)
    return dq, dk, dv


@_varlen_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, softmax_scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
    ctx.max_seqlen, ctx.softmax_scale = max_seqlen, softmax_scale


def _varlen_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _varlen_bwd_op(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.softmax_scale)
    return dq, dk, dv, None, None, None


_varlen_fwd_op.register_autograd(_varlen_backward, setup_context=_varlen_setup)


@torch.library.custom_op("fastjepa_kernels::varlen_attention_qkvpacked_fwd", mutates_args=())
def _qkvpacked_fwd_op(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                      softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward on ``qkv [T, 3, H, d]`` read in place: ``(out [T, H, d], lse [H, T] fp32)``."""
    qkv = _unit_col(qkv)
    q, k, v = qkv.unbind(1)
    out = _alloc(q.shape, q)
    lse = _fwd(q, k, v, out, cu_seqlens, max_seqlen, softmax_scale)
    return out, lse


@_qkvpacked_fwd_op.register_fake
def _(qkv, cu_seqlens, max_seqlen, softmax_scale):
    total, _, heads, dim = qkv.shape
    return qkv.new_empty((total, heads, dim)), qkv.new_empty((heads, total), dtype=torch.float32)


@torch.library.custom_op("fastjepa_kernels::varlen_attention_qkvpacked_bwd", mutates_args=())
def _qkvpacked_bwd_op(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                      cu_seqlens: torch.Tensor, max_seqlen: int, softmax_scale: float) -> torch.Tensor:
    """Triton backward: ``dqkv [T, 3, H, d]``, the kernels writing dq/dk/dv straight into its slices."""
    dout, qkv, out = _unit_col(dout), _unit_col(qkv), _unit_col(out)
    q, k, v = qkv.unbind(1)
    dqkv = _alloc(qkv.shape, qkv)
    dq, dk, dv = dqkv.unbind(1)
    _bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen, softmax_scale)
    return dqkv


@_qkvpacked_bwd_op.register_fake
def _(dout, qkv, out, lse, cu_seqlens, max_seqlen, softmax_scale):
    return qkv.new_empty(qkv.shape)


def _qkvpacked_setup(ctx, inputs, output):
    qkv, cu_seqlens, max_seqlen, softmax_scale = inputs
    ctx.save_for_backward(qkv, output[0], output[1], cu_seqlens)
    ctx.max_seqlen, ctx.softmax_scale = max_seqlen, softmax_scale


def _qkvpacked_backward(ctx, dout, _dlse):
    qkv, out, lse, cu_seqlens = ctx.saved_tensors
    dqkv = _qkvpacked_bwd_op(dout, qkv, out, lse, cu_seqlens, ctx.max_seqlen, ctx.softmax_scale)
    return dqkv, None, None, None


_qkvpacked_fwd_op.register_autograd(_qkvpacked_backward, setup_context=_qkvpacked_setup)


# ---------------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------------
def _check_cu_seqlens(cu_seqlens: torch.Tensor, device: torch.device) -> None:
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor of length batch + 1")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, the tokens on {device}")


def _use_triton(backend: str, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> bool:
    """Resolve ``backend`` for tokens ``x [T, (3,) H, d]``: True for the Triton path.

    ``auto`` leaves equal-length sequences (a batch of whole images: T = B * max_seqlen, known on the
    host) to SDPA: with no padding to remove, cuDNN's dense kernels win (H100, ViT-H/14 target encoder,
    128 x 256 tokens, d 80: 0.21 ms forward against Triton's 0.51 ms; benchmarks/results/)."""
    dim_ok = _supported_head_dim(x.shape[-1])
    if backend == "triton" and not dim_ok:
        raise ValueError(f"attention backend 'triton' supports head dims 8..128 in multiples of 8, got {x.shape[-1]}")
    # (only under auto: under torch.compile this comparison of symbolic sizes is a guard)
    dense = backend == "auto" and x.shape[0] == (cu_seqlens.shape[0] - 1) * max_seqlen
    return use_triton("attention", backend, (x,), TRITON_DTYPES, reference="sdpa", supported=dim_ok and not dense)


def _host_int(n):
    """``max_seqlen`` as an int, leaving a symbolic int (torch.compile) symbolic: ``int()`` would
    specialise the graph on its value and recompile for every new one."""
    return n if isinstance(n, torch.SymInt) else int(n)


def _scale(softmax_scale, dim: int) -> float:
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(dim)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention within each packed sequence. q, k, v ``[T, H, d]`` -> out ``[T, H, d]`` (q's dtype).

    cu_seqlens: int32 ``[B + 1]`` on the tokens' device; max_seqlen: host int >= every length;
    softmax_scale: default ``1 / sqrt(d)``. backend: ``sdpa``, ``triton`` or ``auto``."""
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be [T, H, d]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor of length batch + 1")
    if not _use_triton(backend, q, cu_seqlens, max_seqlen):
        return varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise ValueError("q, k, v must share one dtype and device")
    _check_cu_seqlens(cu_seqlens, q.device)
    out, _ = _varlen_fwd_op(q, k, v, cu_seqlens, _host_int(max_seqlen), _scale(softmax_scale, q.shape[-1]))
    return out


def varlen_attention_qkvpacked(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`varlen_attention` on ``qkv [T, 3, H, d]`` (e.g. ``linear(x).view(T, 3, H, d)``) -> ``[T, H, d]``.

    The Triton backward writes one ``[T, 3, H, d]`` gradient (no concatenation of dq, dk, dv)."""
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be [T, 3, H, d]; got {tuple(qkv.shape)}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor of length batch + 1")
    if not _use_triton(backend, qkv, cu_seqlens, max_seqlen):
        q, k, v = qkv.unbind(1)
        return varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    _check_cu_seqlens(cu_seqlens, qkv.device)
    out, _ = _qkvpacked_fwd_op(qkv, cu_seqlens, _host_int(max_seqlen), _scale(softmax_scale, qkv.shape[-1]))
    return out


# ---------------------------------------------------------------------------------------------------
# ahead-of-time variants
# ---------------------------------------------------------------------------------------------------
def aot_specs():
    """Every variant a launch can use: per (dtype, head dim in :data:`AOT_HEAD_DIMS`), the forward, dQ
    and dK/dV kernels in each configuration of :data:`CANDIDATES` (bf16/fp16; the table's entries are
    among them; several heads per program only up to :data:`MULTI_HEAD_MAX_DIM`) or :data:`FP32_CONFIG`
    (fp32). Names start with ``attention``. The bf16/fp16 ones are
    tensor-core kernels with 64-row tiles and 4 warps: they must use wgmma on sm_90."""
    if triton is None:
        return []
    from .aot import AotSpec

    specs = []
    for dtype, ty in TRITON_DTYPES.items():
        for dim in AOT_HEAD_DIMS:
            d0, d1 = head_dim_chunks(dim)
            meta = dict(HEAD_DIM=dim, BLOCK_D0=d0, BLOCK_D1=d1, DOT_PRECISION="ieee" if ty == "fp32" else "tf32")
            common = {"total_tokens": "i32", "qk_scale": "fp32"}
            kernels = (
                ("fwd", _attention_fwd_kernel, "BLOCK_M", "BLOCK_N",
                 ["Q", "K", "V", "O"], ["LSE"], ["qt", "qh", "kt", "kh", "vt", "vh", "ot", "oh"], False),
                ("dq", _attention_bwd_dq_kernel, "BLOCK_M", "BLOCK_N",
                 ["Q", "K", "V", "O", "DO", "DQ"], ["LSE", "DELTA"],
                 ["qt", "qh", "kt", "kh", "vt", "vh", "ot", "oh", "dot", "doh", "dqt", "dqh"], True),
                ("dkdv", _attention_bwd_dkdv_kernel, "BLOCK_N", "BLOCK_M",
                 ["Q", "K", "V", "DO", "DK", "DV"], ["LSE", "DELTA"],
                 ["qt", "qh", "kt", "kh", "vt", "vh", "dot", "doh", "dkt", "dkh", "dvt", "dvh"], True),
            )
            for name, fn, tile_name, inner_name, tensors, fp32s, strides, backward in kernels:
                sig = {t: f"*{ty}" for t in tensors}
                sig.update({t: "*fp32" for t in fp32s})
                sig.update({"CU_SEQLENS": "*i32", "TILES": "*i32"})
                sig.update({f"stride_{s}": "i32" for s in strides})
                sig.update(common)
                if backward:
                    sig["softmax_scale"] = "fp32"
                sig.update({c: "constexpr" for c in ("HEAD_DIM", "BLOCK_D0", "BLOCK_D1", "BLOCK_M", "BLOCK_N",
                                                     "DOT_PRECISION", "HEADS_PER_PROGRAM")})
                configs = (getattr(FP32_CONFIG, name),) if dtype == torch.float32 else CANDIDATES[name]
                # several heads per program only where they are meant to run: the short d <= 32 heads
                for config in (c for c in configs if c.heads == 1 or dim <= MULTI_HEAD_MAX_DIM):
                    constexprs = {**meta, tile_name: TILE, inner_name: config.inner, "HEADS_PER_PROGRAM": config.heads}
                    specs.append(AotSpec(
                        f"attention_{name}[d{dim},{ty},BM{constexprs['BLOCK_M']},BN{constexprs['BLOCK_N']},"
                        f"w{config.num_warps},s{config.num_stages}{f',h{config.heads}' if config.heads > 1 else ''}]",
                        fn, sig, constexprs, num_warps=config.num_warps, num_stages=config.num_stages,
                        wants_wgmma=ty != "fp32"))
    return specs
