"""Fused Triton varlen attention (``fastjepa_kernels.attention``, backend "triton") against float64 maths.

Every case compares the forward output and dq, dk, dv with a plain per-sequence ``softmax(Q K^T s) V`` in
float64, and bounds the kernel's error by the error of the same-dtype SDPA reference path on the same
inputs: ``err_triton <= 3 * err_sdpa + u`` (relative Frobenius norms, ``u`` the dtype's unit roundoff).
On CPU the kernels run in Triton's interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``), so
the cases are tiny (a few sequences up to ~130 tokens, 1-2 heads); on CUDA the same tests run compiled,
plus lengths up to 4096. Every output the kernels write is first filled with NaN (``POISON_OUTPUTS``),
so an element no program writes fails the comparison.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastjepa_kernels.attention as attn
from fastjepa_kernels import ATTENTION_BACKENDS
from fastjepa_kernels.attention import (
    build_tile_table,
    tile_bound,
    varlen_attention,
    varlen_attention_qkvpacked,
    varlen_attention_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = DEVICE == "cuda"
HEAD_DIMS = (24, 32, 64, 80, 88, 96, 128)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ERROR_FACTOR = 3.0  # kernel error at most this times the same-dtype SDPA error (plus one unit roundoff)

pytestmark = pytest.mark.skipif(attn.triton is None, reason="triton is not installed")
triton = attn.triton


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN; an element no program writes then fails every comparison."""
    monkeypatch.setattr(attn, "POISON_OUTPUTS", True)


def cu_of(lengths) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=DEVICE)


def attention_fp64(q, k, v, lengths, scale):
    """float64 ``softmax(Q K^T * scale) V`` one sequence at a time, all heads at once: ``[T, H, d]``."""
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start:start + n] for t in (q, k, v))
        p = torch.softmax(torch.einsum("qhd,khd->hqk", qs, ks) * scale, dim=-1)
        outs.append(torch.einsum("hqk,khd->qhd", p, vs))
        start += n
    return torch.cat(outs)


def random_case(lengths, heads, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    qkv = torch.randn(total, 3, heads, dim, generator=g).to(DEVICE, dtype)
    dout = torch.randn(total, heads, dim, generator=g).to(DEVICE, dtype)
    return qkv, dout


def run_unpacked(qkv, dout, lengths, backend, scale=None):
    """Output and (dq, dk, dv) of varlen_attention on q, k, v leaves cut from ``qkv``."""
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv.unbind(1))
    out = varlen_attention(q, k, v, cu_of(lengths), max(lengths, default=1), softmax_scale=scale, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return (out.detach(),) + grads


def run_packed(qkv, dout, lengths, backend, scale=None):
    leaf = qkv.detach().clone().requires_grad_()
    out = varlen_attention_qkvpacked(leaf, cu_of(lengths), max(lengths, default=1), softmax_scale=scale,
                                     backend=backend)
    (dqkv,) = torch.autograd.grad(out, (leaf,), dout)
    return (out.detach(),) + tuple(dqkv.unbind(1))


def reference_fp64(qkv, dout, lengths, scale=None):
    q, k, v = (t.detach().double().requires_grad_() for t in qkv.unbind(1))
    scale = scale if scale is not None else 1.0 / math.sqrt(qkv.shape[-1])
    out = attention_fp64(q, k, v, lengths, scale)
    grads = torch.autograd.grad(out, (q, k, v), dout.double())
    return (out.detach(),) + grads


def rel_err(a, ref) -> float:
    return float((a.double() - ref).norm() / ref.norm().clamp_min(1e-30))


NAMES = ("out", "dq", "dk", "dv")


def assert_close_to_fp64(got, ref, sdpa, dtype, context=""):
    for name, a, r, s in zip(NAMES, got, ref, sdpa):
        assert a.dtype == dtype, (name, a.dtype)
        assert torch.isfinite(a).all(), f"{name}: non-finite values (unwritten elements?) {context}"
        err, bound = rel_err(a, r), ERROR_FACTOR * rel_err(s, r) + UNIT_ROUNDOFF[dtype]
        assert err <= bound, f"{name}: triton error {err:.3e} > bound {bound:.3e} {context}"


def lengths_for(seed, count=4, longest=70):
    """Random lengths in [1, longest] with one length-1 sequence among them."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, longest + 1, (count - 1,), generator=g).tolist()
    lengths.insert(int(torch.randint(0, count, (1,), generator=g)), 1)
    return lengths


# ---------------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("dim", HEAD_DIMS)
def test_forward_and_gradients_match_fp64(dim, dtype):
    seed = dim * 10 + DTYPES.index(dtype)
    lengths = lengths_for(seed, count=4, longest=140 if dim <= 32 else 70)
    qkv, dout = random_case(lengths, 2, dim, dtype, seed)
    got = run_unpacked(qkv, dout, lengths, "triton")
    sdpa = run_unpacked(qkv, dout, lengths, "sdpa")
    assert_close_to_fp64(got, reference_fp64(qkv, dout, lengths), sdpa, dtype, f"lengths={lengths}")


@pytest.mark.parametrize("candidate", [1, 2], ids=["wider-blocks", "two-heads-per-program"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_every_candidate_config(dtype, candidate):
    """The default cases run the table's configuration; this one runs each other candidate of every
    kernel (CUDA too), on a sequence of 130 tokens (three 64-row tiles, a 128-key block that is partly
    padding) with 2 heads, so a configuration the benchmarks may promote into the table is proven."""
    lengths = [130, 1, 37]
    dim = 80 if candidate == 1 else 24
    qkv, dout = random_case(lengths, 2, dim, dtype, seed=11)
    picked = attn.AttentionConfig(*(attn.CANDIDATES[n][candidate] for n in attn.KERNELS))
    with attn.override_configs(**{name: getattr(picked, name) for name in attn.KERNELS}):
        assert attn.launch_config(qkv[:, 0]) == picked
        got = run_unpacked(qkv, dout, lengths, "triton")
    assert attn.launch_config(qkv[:, 0]) == attn.config_for(attn._arch(0) if CUDA else None, dim, dtype)
    sdpa = run_unpacked(qkv, dout, lengths, "sdpa")
    assert_close_to_fp64(got, reference_fp64(qkv, dout, lengths), sdpa, dtype)
    if candidate == 2 and not CUDA:  # per head the same maths in the same order as one head per program
        assert all(torch.equal(a, b) for a, b in zip(got, run_unpacked(qkv, dout, lengths, "triton")))


def test_heads_per_program_falls_back_when_heads_do_not_divide():
    """Three heads with a two-heads-per-program configuration run one head per program: every head is
    computed (NaN-poisoned outputs), exactly as with the default configuration."""
    lengths = [20, 45]
    qkv, dout = random_case(lengths, 3, 24, torch.bfloat16, seed=13)
    two = {name: attn.CANDIDATES[name][2] for name in attn.KERNELS}
    with attn.override_configs(**two):
        got = run_packed(qkv, dout, lengths, "triton")
    assert all(torch.equal(a, b) for a, b in zip(got, run_packed(qkv, dout, lengths, "triton")))


@pytest.mark.parametrize("dim", [24, 80])
def test_qkvpacked_matches_unpacked_and_fp64(dim):
    lengths = [33, 1, 64, 9]
    qkv, dout = random_case(lengths, 2, dim, torch.bfloat16, seed=dim)
    packed = run_packed(qkv, dout, lengths, "triton")
    unpacked = run_unpacked(qkv, dout, lengths, "triton")
    for name, a, b in zip(NAMES, packed, unpacked):  # same kernels, only the strides differ
        assert torch.equal(a, b), name
    sdpa = run_packed(qkv, dout, lengths, "sdpa")
    assert_close_to_fp64(packed, reference_fp64(qkv, dout, lengths), sdpa, torch.bfloat16)


def test_qkvpacked_backward_writes_one_gradient():
    """The packed backward op returns one [T, 3, H, d] tensor (dq, dk, dv written in place by the kernels)."""
    lengths = [5, 12]
    qkv, dout = random_case(lengths, 2, 32, torch.float32, seed=3)
    cu = cu_of(lengths)
    out, lse = attn._qkvpacked_fwd_op(qkv, cu, 12, 0.25)
    assert lse.shape == (2, qkv.shape[0]) and lse.dtype == torch.float32
    dqkv = attn._qkvpacked_bwd_op(dout, qkv, out, lse, cu, 12, 0.25)
    assert dqkv.shape == qkv.shape and dqkv.is_contiguous() and torch.isfinite(dqkv).all()


def test_single_tokens_zero_lengths_and_custom_scale():
    """Length-1 sequences return their own v (and get dq = dk = 0); empty sequences are skipped."""
    lengths = [1, 0, 20, 1, 0, 1]
    qkv, dout = random_case(lengths, 2, 32, torch.float32, seed=5)
    got = run_unpacked(qkv, dout, lengths, "triton", scale=0.3)
    ref = reference_fp64(qkv, dout, lengths, scale=0.3)
    for name, a, r in zip(NAMES, got, ref):
        torch.testing.assert_close(a.double(), r, atol=2e-6, rtol=1e-5, msg=name)
    cu = cu_of(lengths).tolist()
    for i, n in enumerate(lengths):
        if n == 1:
            row = cu[i]
            torch.testing.assert_close(got[0][row], qkv[row, 2])
            # exactly 0 in exact math (dS = P (dP - D) with P = 1, D = dP); fp32 leaves the rounding of D - dP,
            # ~ eps * |dout . v| ~ 1e-6 here, so the bound is the fp64 comparison's atol above
            assert got[1][row].abs().max() < 2e-6 and got[2][row].abs().max() < 2e-6


def test_strided_views():
    """[H, T, d] tensors seen as [T, H, d] (head stride T * d), and a view with a non-unit column stride
    (which the launcher copies), give the same result as contiguous inputs."""
    lengths = [7, 19]
    total, heads, dim = sum(lengths), 2, 32
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(heads, total, dim, generator=g).to(DEVICE).transpose(0, 1) for _ in range(3))
    wide = torch.randn(total, heads, 2 * dim, generator=g).to(DEVICE)
    cu = cu_of(lengths)
    out = varlen_attention(q, k, wide[..., ::2], cu, 19, backend="triton")
    ref = varlen_attention(q.contiguous(), k.contiguous(), wide[..., ::2].contiguous(), cu, 19, backend="triton")
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    ref64 = attention_fp64(q.double(), k.double(), wide[..., ::2].double(), lengths, dim**-0.5)
    torch.testing.assert_close(out.double(), ref64, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_dq_stays_finite_when_every_score_is_very_negative(dtype):
    """Keys opposite to the queries: every scaled score is ~ -230 (base 2), so lse ~ -230 and the padded
    key columns of the last key block, whose score is 0, would get P = exp2(230) = inf; inf * 0 in
    dS @ K then turned the whole dQ row into NaN. Lengths 37 and 5 leave padding in every key block."""
    lengths = [37, 5]
    total, heads, dim = sum(lengths), 2, 32
    g = torch.Generator().manual_seed(21)
    direction = torch.nn.functional.normalize(torch.randn(heads, dim, generator=g), dim=-1)
    q = 30.0 * direction + 0.3 * torch.randn(total, heads, dim, generator=g)
    k = -30.0 * direction + 0.3 * torch.randn(total, heads, dim, generator=g)
    v = torch.randn(total, heads, dim, generator=g)
    qkv = torch.stack([q, k, v], 1).to(DEVICE, dtype)
    dout = torch.randn(total, heads, dim, generator=g).to(DEVICE, dtype)
    scores = torch.einsum("qhd,khd->hqk", q[:37], k[:37]) * dim**-0.5 * math.log2(math.e)
    assert scores.max() < -150  # exp2(-lse) overflows fp32 (and fp16 long before)
    got = run_packed(qkv, dout, lengths, "triton")
    sdpa = run_packed(qkv, dout, lengths, "sdpa")
    assert_close_to_fp64(got, reference_fp64(qkv, dout, lengths), sdpa, dtype)


def test_backward_is_deterministic():
    lengths = [40, 3, 66]
    qkv, dout = random_case(lengths, 1, 64, torch.bfloat16, seed=2)
    first = run_packed(qkv, dout, lengths, "triton")
    second = run_packed(qkv, dout, lengths, "triton")
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_many_tiles_per_sequence():
    """A 700-token sequence: 11 query tiles and 11 key tiles, each looping over 11+ blocks."""
    lengths = [3, 700, 1]
    qkv, dout = random_case(lengths, 1, 32, torch.bfloat16, seed=12)
    got = run_unpacked(qkv, dout, lengths, "triton")
    sdpa = run_unpacked(qkv, dout, lengths, "sdpa")
    assert_close_to_fp64(got, reference_fp64(qkv, dout, lengths), sdpa, torch.bfloat16)


@pytest.mark.skipif(not CUDA, reason="lengths up to 4096 only compiled on CUDA (the interpreter is too slow)")
@pytest.mark.parametrize("dim,dtype", [(d, torch.bfloat16) for d in HEAD_DIMS] + [(80, torch.float16)],
                         ids=[f"{d}-bfloat16" for d in HEAD_DIMS] + ["80-float16"])
def test_long_sequences_cuda(dim, dtype):
    lengths = [1, 4096, 17, 1000, 64, 2049, 129]
    qkv, dout = random_case(lengths, 3, dim, dtype, seed=dim)
    got = run_unpacked(qkv, dout, lengths, "triton")
    sdpa = run_unpacked(qkv, dout, lengths, "sdpa")
    assert_close_to_fp64(got, reference_fp64(qkv, dout, lengths), sdpa, dtype)


@pytest.mark.skipif(not CUDA, reason="I-JEPA shapes only on CUDA")
def test_ijepa_predictor_shape_cuda():
    """Many short sequences (the predictor: d = 24, 16 heads, ~154 tokens each)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(120, 190, (64,), generator=g).tolist()
    qkv, dout = random_case(lengths, 16, 24, torch.bfloat16, seed=1)
    got = run_packed(qkv, dout, lengths, "triton")
    sdpa = run_packed(qkv, dout, lengths, "sdpa")
    assert_close_to_fp64(got, reference_fp64(qkv, dout, lengths), sdpa, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------
# the (sequence, tile) table
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths", [[1], [64], [65, 0, 1, 128, 3], [0, 0, 5], [200, 63, 64, 1, 1, 1]])
def test_tile_table_lists_every_real_tile_once(lengths):
    cu = cu_of(lengths)
    bound = tile_bound(sum(lengths), len(lengths), max(lengths))
    expected = [(i, t) for i, n in enumerate(lengths) for t in range(math.ceil(n / attn.TILE))]
    assert bound >= len(expected)
    table = build_tile_table(cu, bound).cpu()
    assert table.dtype == torch.int32 and table.shape == (bound, 2)
    assert [tuple(r) for r in table[:len(expected)].tolist()] == expected
    assert (table[len(expected):, 0] == -1).all()


def count_table_builds(monkeypatch) -> list:
    builds = []
    real = attn.build_tile_table
    monkeypatch.setattr(attn, "build_tile_table", lambda cu, bound: builds.append(bound) or real(cu, bound))
    return builds


def three_layers(x, cu_seqlens, max_seqlen):
    """Three attention layers on one packing (the shape of an encoder pass)."""
    for _ in range(3):
        x = x + varlen_attention_qkvpacked(x, cu_seqlens, max_seqlen, backend="triton").unsqueeze(1)
    return x


def test_one_tile_table_per_packing_forward_and_backward(monkeypatch):
    builds = count_table_builds(monkeypatch)
    for lengths in ([9, 1, 30], [5, 17, 3, 40]):
        builds.clear()
        qkv, _ = random_case(lengths, 2, 16, torch.float32, seed=len(lengths))
        leaf = qkv.requires_grad_()
        three_layers(leaf, cu_of(lengths), max(lengths)).sum().backward()
        assert len(builds) == 1, f"{len(builds)} tile tables built for one packing (3 layers, fwd + bwd)"


def test_torch_compile_neither_rebuilds_tables_nor_recompiles_per_max_seqlen(monkeypatch):
    """Under torch.compile the table is built inside the custom ops, once per packing, not traced into
    every block's graph; and ``max_seqlen`` stays symbolic: after dynamo's one automatic-dynamic
    recompile (the second shape), new token counts and new ``max_seqlen`` values compile nothing."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    builds = count_table_builds(monkeypatch)
    compiled = torch.compile(three_layers, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    cases = ([9, 1, 30], [5, 17, 3, 40], [64, 2], [7, 70, 1], [3, 3, 90])
    graphs = []
    for i, lengths in enumerate(cases):
        qkv, _ = random_case(lengths, 2, 16, torch.float32, seed=30 + i)
        leaf, eager_leaf = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
        builds.clear()
        with torch._dynamo.config.patch(error_on_recompile=i >= 2):
            out = compiled(leaf, cu_of(lengths), max(lengths))
        out.sum().backward()
        # aot_eager hands the backward the forward's cu_seqlens object: one table; allow inductor a second
        # if it gives the backward a new view of it (traced into each layer's graph it would be 3 or more)
        assert len(builds) <= (2 if CUDA else 1), f"{lengths}: {len(builds)} tile tables for 3 compiled layers"
        graphs.append(counters["stats"]["unique_graphs"])
        expect = three_layers(eager_leaf, cu_of(lengths), max(lengths))
        expect.sum().backward()
        torch.testing.assert_close(out, expect)
        torch.testing.assert_close(leaf.grad, eager_leaf.grad)
    assert graphs[-1] == graphs[1] <= 2, f"graphs compiled after each call: {graphs}"
    torch._dynamo.reset()


def test_tile_table_is_reused_per_cu_seqlens_tensor():
    cu = cu_of([5, 70])
    first = attn._tile_table(cu, 4)
    assert attn._tile_table(cu, 4) is first
    cu[2] = 71  # in-place change: a new table
    assert attn._tile_table(cu, 4) is not first
    assert attn._tile_table(cu_of([5, 70]), 4) is not first


# ---------------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------------
def test_custom_ops_pass_opcheck():
    lengths = [3, 17]
    qkv, dout = random_case(lengths, 1, 16, torch.float32, seed=4)
    cu = cu_of(lengths)
    q, k, v = (t.clone().requires_grad_() for t in qkv.unbind(1))
    torch.library.opcheck(attn._varlen_fwd_op, (q, k, v, cu, 17, 0.25))
    torch.library.opcheck(attn._qkvpacked_fwd_op, (qkv.clone().requires_grad_(), cu, 17, 0.25))
    out, lse = attn._varlen_fwd_op(q.detach(), k.detach(), v.detach(), cu, 17, 0.25)
    torch.library.opcheck(attn._varlen_bwd_op, (dout, q.detach(), k.detach(), v.detach(), out, lse, cu,
                                                17, 0.25),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    """The ops trace into one graph (fake impls, no graph break); inductor on CUDA, aot_eager on CPU
    (the interpreter runs the kernels either way, and aot_eager skips the C++ compile)."""
    lengths = [9, 1, 30]
    qkv, dout = random_case(lengths, 2, 24, torch.float32, seed=6)
    cu = cu_of(lengths)

    def block(x, cu_seqlens):
        return varlen_attention_qkvpacked(x * 1.5, cu_seqlens, 30, backend="triton").sum(-1)

    compiled = torch.compile(block, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    leaf = qkv.clone().requires_grad_()
    got = compiled(leaf, cu)
    (grad,) = torch.autograd.grad(got, leaf, dout.sum(-1))
    leaf_eager = qkv.clone().requires_grad_()
    want = block(leaf_eager, cu)
    (grad_eager,) = torch.autograd.grad(want, leaf_eager, dout.sum(-1))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, grad_eager)


# ---------------------------------------------------------------------------------------------------
# backend choice and input checks
# ---------------------------------------------------------------------------------------------------
def test_backends_listed():
    assert ATTENTION_BACKENDS == ("sdpa", "triton", "auto")


def test_auto_picks_triton_only_for_cuda(monkeypatch):
    calls = []
    real = attn.varlen_attention_reference
    monkeypatch.setattr(attn, "varlen_attention_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    lengths = [4, 6]
    q, k, v = random_case(lengths, 1, 32, torch.float32, seed=1)[0].unbind(1)
    varlen_attention(q, k, v, cu_of(lengths), 6)  # backend="auto" is the default
    assert len(calls) == (0 if CUDA else 1)
    qkv12 = torch.randn(10, 3, 1, 12, device=DEVICE)  # head dim 12 (not a multiple of 8): sdpa under auto
    varlen_attention_qkvpacked(qkv12, cu_of(lengths), 6)
    assert len(calls) == (1 if CUDA else 2)
    varlen_attention(q.double(), k.double(), v.double(), cu_of(lengths), 6)  # float64: sdpa under auto
    assert len(calls) == (2 if CUDA else 3)
    # equal lengths (whole images, nothing to unpad): SDPA's dense kernels under auto, Triton when asked
    q, k, v = random_case([5, 5], 1, 32, torch.float32, seed=2)[0].unbind(1)
    varlen_attention(q, k, v, cu_of([5, 5]), 5)
    assert len(calls) == (3 if CUDA else 4)
    varlen_attention(q, k, v, cu_of([5, 5]), 5, backend="triton")
    assert len(calls) == (3 if CUDA else 4)


def test_input_checks():
    q = torch.randn(6, 2, 16, device=DEVICE)
    cu = cu_of([6])
    with pytest.raises(ValueError):
        varlen_attention(q, q, q, cu.long(), 6, backend="triton")  # int64 cu_seqlens
    with pytest.raises(ValueError):
        varlen_attention(q, q[:, :1], q, cu, 6, backend="triton")  # shape mismatch
    with pytest.raises(ValueError):
        varlen_attention(q, q, q, cu, 6, backend="flash")  # unknown backend
    with pytest.raises(TypeError):
        varlen_attention(q.double(), q.double(), q.double(), cu, 6, backend="triton")
    with pytest.raises(ValueError):
        varlen_attention(q, q.half(), q, cu, 6, backend="triton")  # mixed dtypes
    q12 = torch.randn(6, 2, 12, device=DEVICE)
    with pytest.raises(ValueError):
        varlen_attention(q12, q12, q12, cu, 6, backend="triton")  # head dim not a multiple of 8
    with pytest.raises(ValueError):
        varlen_attention_qkvpacked(q, cu, 6, backend="triton")  # not [T, 3, H, d]
    with pytest.raises(ValueError):
        varlen_attention(q, q, q, cu_of([6])[:1], 6, backend="triton")  # cu_seqlens needs B + 1 >= 2


def test_debug_mode_checks_the_packing(monkeypatch):
    """FASTJEPA_KERNELS_DEBUG=1 (``attn.DEBUG``): rows outside cu_seqlens and lengths above max_seqlen
    would leave outputs unwritten; the launcher names the problem instead. Off by default: no check."""
    qkv = torch.randn(20, 3, 1, 16, device=DEVICE)
    checks = []
    real = attn.check_packing
    monkeypatch.setattr(attn, "check_packing", lambda *a: checks.append(a) or real(*a))
    varlen_attention_qkvpacked(qkv, cu_of([12, 6]), 5, backend="triton")  # wrong, but unchecked
    assert not checks and not attn.DEBUG
    monkeypatch.setattr(attn, "DEBUG", True)
    with pytest.raises(ValueError, match="from 0 to the 20 tokens"):
        varlen_attention_qkvpacked(qkv, cu_of([12, 6]), 12, backend="triton")  # rows 18, 19 uncovered
    with pytest.raises(ValueError, match="more than max_seqlen=10"):
        varlen_attention_qkvpacked(qkv, cu_of([12, 8]), 10, backend="triton")
    with pytest.raises(ValueError, match="decreases"):
        varlen_attention_qkvpacked(qkv, torch.tensor([0, 12, 8, 20], dtype=torch.int32, device=DEVICE), 12,
                                   backend="triton")
    leaf = qkv.clone().requires_grad_()
    varlen_attention_qkvpacked(leaf, cu_of([12, 8]), 12, backend="triton").sum().backward()
    assert len(checks) == 5  # the three bad packings, then the good one's forward and backward


def test_fixed_configurations():
    """One configuration per (architecture, head dim, dtype), independent of lengths and token counts
    (no autotuner: same inputs, same bits, no benchmarking mid-run); every table entry is an AOT-compiled
    candidate; overrides (benchmarks' A/B) accept only candidates and are undone on exit."""
    kernels = [getattr(attn, name) for name in dir(attn) if name.startswith("_attention_")]
    assert len(kernels) == 3 and not any(isinstance(fn, triton.runtime.Autotuner) for fn in kernels)
    for (arch, dim, dtype), config in attn.CONFIG_TABLE.items():
        assert dim in attn.AOT_HEAD_DIMS and dtype in (torch.bfloat16, torch.float16)
        assert all(getattr(config, name) in attn.CANDIDATES[name] for name in attn.KERNELS), (arch, dim, dtype)
        assert dim <= attn.MULTI_HEAD_MAX_DIM or all(getattr(config, n).heads == 1 for n in attn.KERNELS)
    assert attn.config_for(9, 80, torch.float32) == attn.FP32_CONFIG
    assert attn.config_for(12, 40, torch.bfloat16) == attn.DEFAULT_16BIT  # unlisted: the default
    with pytest.raises(ValueError, match="not among the compiled candidates"):
        with attn.override_configs(fwd=attn.KernelConfig(256, 8, 1)):
            pass
    before = attn.config_for(9, 80, torch.bfloat16)
    with attn.override_configs(dq=attn.CANDIDATES["dq"][1]):
        assert attn.config_for(9, 80, torch.bfloat16).dq == attn.CANDIDATES["dq"][1]
        assert attn.config_for(9, 80, torch.bfloat16).fwd == before.fwd
    assert attn.config_for(9, 80, torch.bfloat16) == before


def test_poison_fills_outputs_with_nan():
    assert torch.isnan(attn._alloc((3, 2), torch.empty(0, device=DEVICE))).all()


def test_reference_path_unchanged():
    """backend="sdpa" is the padded-SDPA reference itself."""
    lengths = [3, 8]
    q, k, v = random_case(lengths, 2, 16, torch.float32, seed=8)[0].unbind(1)
    torch.testing.assert_close(varlen_attention(q, k, v, cu_of(lengths), 8, backend="sdpa"),
                               varlen_attention_reference(q, k, v, cu_of(lengths), 8), atol=0, rtol=0)
