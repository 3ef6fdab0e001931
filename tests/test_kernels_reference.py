"""fastjepa_kernels (reference backends) against float64 naive loops.

- varlen_attention vs per-sequence softmax attention in float64, forward and gradients of q, k, v;
- gather_tokens / scatter_tokens vs explicit loops, including pos and the backward into x and pos;
- jepa_target_loss vs a float64 loop (LayerNorm without affine, eps 1e-6; smooth-L1 beta 1 / L2; mean);
- ema_ vs a float64 simulation of ``t <- m t + (1 - m) s``.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastjepa_kernels import ATTENTION_BACKENDS, ema_, gather_tokens, jepa_target_loss, scatter_tokens, varlen_attention

torch.set_num_threads(1)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def cu_of(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


# ---------------------------------------------------------------------------------------------------
# varlen attention
# ---------------------------------------------------------------------------------------------------
def naive_varlen_attention(q, k, v, lengths, scale=None):
    """float64, one sequence at a time, explicit softmax over that sequence's keys only."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        for h in range(q.shape[1]):
            qs, ks, vs = q[sl, h], k[sl, h], v[sl, h]
            s = (qs @ ks.T) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
            p = torch.exp(s - s.max(dim=1, keepdim=True).values)
            p = p / p.sum(dim=1, keepdim=True)
            out[sl, h] = p @ vs
        start += n
    return out


def attention_case(lengths, heads, dim, seed, dtype=torch.float32, scale=None):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, dim, generator=g).to(dtype).requires_grad_() for _ in range(3))
    grad_out = torch.randn(total, heads, dim, generator=g)
    out = varlen_attention(q, k, v, cu_of(lengths), max(lengths), softmax_scale=scale)
    out.backward(grad_out.to(out.dtype))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = naive_varlen_attention(q64, k64, v64, lengths, scale)
    ref.backward(grad_out.double())
    return (out, q.grad, k.grad, v.grad), (ref, q64.grad, k64.grad, v64.grad)


@pytest.mark.parametrize("dim", [24, 32, 80])
@pytest.mark.parametrize("lengths", [[1], [1, 1, 1], [7, 7, 7], [5, 1, 17], [3, 20, 1, 9], [16, 16], [1, 40]])
def test_varlen_attention_fp32_vs_fp64(lengths, dim):
    got, ref = attention_case(lengths, heads=2, dim=dim, seed=len(lengths) * 100 + dim)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a.double(), b, atol=2e-6, rtol=1e-5, msg=name)


@settings(max_examples=25, **SETTINGS)
@given(lengths=st.lists(st.integers(1, 24), min_size=1, max_size=6), dim=st.sampled_from([24, 32, 80]),
       heads=st.integers(1, 3), seed=st.integers(0, 10**6), scale=st.sampled_from([None, 0.05, 1.0]))
def test_varlen_attention_random_lengths(lengths, dim, heads, seed, scale):
    got, ref = attention_case(lengths, heads, dim, seed, scale=scale)
    for a, b in zip(got, ref):
        # atol: fp32 cancellation in the softmax backward (dq of a 1-token sequence is exactly 0 in
        # exact maths but ~|dO| |v| |k| scale * 2^-24 in fp32)
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-5)


def test_varlen_attention_length_one_is_identity_on_v():
    """A one-token sequence attends only to itself: out == v exactly (softmax of one logit is 1)."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(8, 2, 24, generator=g) for _ in range(3))
    out = varlen_attention(q, k, v, cu_of([1, 6, 1]), 6)
    torch.testing.assert_close(out[0], v[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[7], v[7], atol=1e-6, rtol=0)


def test_varlen_attention_no_cross_talk():
    """Changing one sequence's k/v leaves every other sequence's output bit-identical."""
    g = torch.Generator().manual_seed(0)
    lengths = [4, 9, 2]
    q, k, v = (torch.randn(15, 2, 32, generator=g) for _ in range(3))
    out = varlen_attention(q, k, v, cu_of(lengths), 9)
    k2, v2 = k.clone(), v.clone()
    k2[4:13] += 5.0
    v2[4:13] -= 3.0
    out2 = varlen_attention(q, k2, v2, cu_of(lengths), 9)
    assert torch.equal(out[:4], out2[:4]) and torch.equal(out[13:], out2[13:])
    assert not torch.allclose(out[4:13], out2[4:13])


def test_equal_lengths_take_the_no_padding_path(monkeypatch):
    """Full-image batches (all lengths equal) must not build a padded layout; unequal ones do."""
    import fastjepa_kernels.attention as attn_mod

    calls = []
    real = attn_mod._padding_layout
    monkeypatch.setattr(attn_mod, "_padding_layout", lambda *a, **k: calls.append(1) or real(*a, **k))
    got, ref = attention_case([9, 9, 9, 9], heads=2, dim=32, seed=5)
    assert not calls
    torch.testing.assert_close(got[0].double(), ref[0], atol=2e-6, rtol=1e-5)
    attention_case([9, 8], heads=2, dim=32, seed=5)
    assert calls


def test_varlen_attention_bf16_vs_fp64():
    lengths = [5, 1, 17, 8]
    got, ref = attention_case(lengths, heads=2, dim=80, seed=7, dtype=torch.bfloat16)
    assert got[0].dtype == torch.bfloat16
    for a, b in zip(got, ref):
        rel = (a.double() - b).norm() / b.norm()
        assert rel < 2e-2, float(rel)


def test_varlen_attention_input_checks():
    q = torch.randn(6, 2, 8)
    with pytest.raises(ValueError):
        varlen_attention(q, q, q, torch.tensor([0, 6]), 6)  # int64 cu_seqlens
    with pytest.raises(ValueError):
        varlen_attention(q, q[:, :1], q, torch.tensor([0, 6], dtype=torch.int32), 6)
    with pytest.raises(ValueError):
        varlen_attention(q, q, q, torch.tensor([0, 6], dtype=torch.int32), 6, backend="nope")
    assert "sdpa" in ATTENTION_BACKENDS


# ---------------------------------------------------------------------------------------------------
# gather / scatter
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("with_pos", [False, True])
def test_gather_tokens_vs_loop(index_dtype, with_pos):
    g = torch.Generator().manual_seed(0)
    B, N, D, T = 3, 10, 6, 25
    x = torch.randn(B, N, D, generator=g, requires_grad=True)
    pos = torch.randn(N, D, generator=g, requires_grad=True) if with_pos else None
    index = torch.randint(0, B * N, (T,), generator=g, dtype=torch.int64).to(index_dtype)  # with repeats
    out = gather_tokens(x, index, pos)
    grad = torch.randn(T, D, generator=g)
    out.backward(grad)

    ref = torch.zeros(T, D, dtype=torch.float64)
    gx = torch.zeros(B, N, D, dtype=torch.float64)
    gpos = torch.zeros(N, D, dtype=torch.float64)
    for t in range(T):
        i = int(index[t])
        b, n = divmod(i, N)
        ref[t] = x[b, n].double() + (pos[n].double() if with_pos else 0.0)
        gx[b, n] += grad[t].double()
        gpos[n] += grad[t].double()
    assert out.shape == (T, D)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(x.grad.double(), gx, atol=1e-6, rtol=0)
    if with_pos:
        torch.testing.assert_close(pos.grad.double(), gpos, atol=1e-6, rtol=0)


def test_gather_tokens_flat_input_and_out_dtype():
    x = torch.randn(2, 5, 4)
    idx = torch.tensor([9, 0, 3], dtype=torch.int32)
    assert torch.equal(gather_tokens(x.reshape(10, 4), idx), x.reshape(10, 4)[[9, 0, 3]])
    out = gather_tokens(x, idx, torch.randn(5, 4), out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        gather_tokens(x.reshape(10, 4), idx, torch.randn(5, 4))


def test_scatter_tokens_vs_loop_and_backward():
    g = torch.Generator().manual_seed(1)
    T, D, R = 30, 5, 12
    tokens = torch.randn(T, D, generator=g, requires_grad=True)
    index = torch.randint(0, R, (T,), generator=g).to(torch.int32)  # repeats accumulate
    out = scatter_tokens(tokens, index, R)
    up = torch.randn(R, D, generator=g)
    out.backward(up)
    ref = torch.zeros(R, D, dtype=torch.float64)
    for t in range(T):
        ref[int(index[t])] += tokens[t].double()
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(tokens.grad, up[index.long()], atol=0, rtol=0)


def test_scatter_inverts_gather_on_unique_rows():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 7, 3, generator=g)
    index = torch.randperm(28, generator=g)[:13].to(torch.int32)
    back = scatter_tokens(gather_tokens(x, index), index, 28)
    mask = torch.zeros(28, dtype=torch.bool)
    mask[index.long()] = True
    assert torch.equal(back[mask], x.reshape(28, 3)[mask])
    assert (back[~mask] == 0).all()


# ---------------------------------------------------------------------------------------------------
# target loss
# ---------------------------------------------------------------------------------------------------
def naive_target_loss(pred, target, index, kind):
    """float64 loops: layer-norm (no affine, eps 1e-6, biased variance) of each gathered row, then mean."""
    T, D = pred.shape
    N = target.shape[1]
    total = 0.0
    grad = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        b, n = divmod(int(index[t]), N)
        row = target[b, n].double()
        mu = row.mean()
        var = ((row - mu) ** 2).mean()
        y = (row - mu) / math.sqrt(var + 1e-6)
        for j in range(D):
            diff = float(pred[t, j]) - float(y[j])
            if kind == "smooth_l1":
                total += 0.5 * diff * diff if abs(diff) < 1.0 else abs(diff) - 0.5
                grad[t, j] = max(-1.0, min(1.0, diff))
            else:
                total += diff * diff
                grad[t, j] = 2.0 * diff
    return total / (T * D), grad / (T * D)


@pytest.mark.parametrize("kind", ["smooth_l1", "l2"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("feature_scale", [3.0, 3e-3])  # 3e-3: variance ~1e-5, so eps=1e-6 matters
def test_target_loss_vs_loop(kind, index_dtype, feature_scale):
    g = torch.Generator().manual_seed(3)
    B, N, D, T = 2, 9, 16, 14
    target = ((torch.randn(B, N, D, generator=g) + 0.5) * feature_scale).requires_grad_()  # LN must matter
    pred = (torch.randn(T, D, generator=g) * 1.5).requires_grad_()  # both smooth-L1 branches occur
    index = torch.randint(0, B * N, (T,), generator=g).to(index_dtype)
    loss = jepa_target_loss(pred, target, index, kind)
    loss.backward()
    ref_loss, ref_grad = naive_target_loss(pred.detach(), target.detach(), index, kind)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - ref_loss) <= 1e-6 * max(1.0, abs(ref_loss))
    torch.testing.assert_close(pred.grad.double(), ref_grad, atol=1e-8, rtol=1e-5)
    assert target.grad is None, "the target must get no gradient"
    if kind == "smooth_l1":  # the test exercised both branches
        _, gref = naive_target_loss(pred.detach(), target.detach(), index, kind)
        assert (gref.abs() * T * D >= 1.0 - 1e-12).any() and (gref.abs() * T * D < 1.0).any()


def test_target_loss_bf16_pred_is_fp32_maths():
    g = torch.Generator().manual_seed(4)
    target = torch.randn(2, 5, 8, generator=g)
    pred = torch.randn(6, 8, generator=g).bfloat16().requires_grad_()
    index = torch.tensor([0, 3, 9, 5, 5, 1], dtype=torch.int32)
    loss = jepa_target_loss(pred, target, index)
    ref, ref_grad = naive_target_loss(pred.detach().double(), target, index, "smooth_l1")
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref) < 1e-6
    loss.backward()
    assert pred.grad.dtype == torch.bfloat16
    torch.testing.assert_close(pred.grad.double(), ref_grad, atol=1e-4, rtol=1e-2)


def test_target_loss_input_checks():
    with pytest.raises(ValueError):
        jepa_target_loss(torch.randn(3, 4), torch.randn(1, 5, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        jepa_target_loss(torch.randn(2, 4), torch.randn(1, 5, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        jepa_target_loss(torch.randn(2, 4), torch.randn(1, 5, 4), torch.tensor([0, 1]), kind="l1")


# ---------------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------------
STEPS, W = 2000, 1e-4  # 1 - m = 1e-4: each update is ~1e-4 of |s - t|, far below one bf16 ulp


def ema_problem(n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    t0 = torch.randn(n, generator=g)
    s0 = torch.randn(n, generator=g)
    sources = [s0 + 0.05 * torch.randn(n, generator=g) for _ in range(STEPS)]  # the online model moves
    return t0, sources


def simulate(t0, sources, w=W):
    t = t0.double()
    for s in sources:
        t = t + w * (s.double() - t)
    return t


def run_ema(t0, sources, momentum):
    t = t0.clone()
    for s in sources:
        ema_(t, s, momentum)
    return t


@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16])
def test_ema_tiny_updates_track_fp64(source_dtype):
    t0, sources = ema_problem()
    sources = [s.to(source_dtype) for s in sources]  # bf16: the online model trained in bf16
    ref = simulate(t0, sources)
    got = run_ema(t0, sources, 1.0 - W)
    movement = (ref - t0.double()).abs().max()
    assert movement > 0.5  # 1 - (1 - 1e-4)^2000 = 18 % of |s - t|
    err = (got.double() - ref).abs().max()
    assert err <= 1e-4 * movement, float(err / movement)


def test_ema_bf16_target_would_stall():
    """What makes the test above meaningful: the same updates on a bf16 target barely move it."""
    t0, sources = ema_problem()
    ref = simulate(t0, sources)
    movement = (ref - t0.double()).abs().max()
    t = t0.bfloat16()
    for s in sources:
        t = torch.lerp(t, s.bfloat16(), W)
    assert (t.double() - ref).abs().max() > 0.5 * movement
    with pytest.raises(TypeError):
        ema_(t0.bfloat16(), sources[0], 1.0 - W)


@pytest.mark.parametrize("tensor_dtype", [torch.float64, torch.float32])
def test_ema_tensor_momentum_equals_float(tensor_dtype):
    t0, sources = ema_problem(n=1024, seed=1)
    # a momentum representable in both dtypes, so that the two paths mean the same number
    m = 1.0 - 2.0 ** -13 if tensor_dtype == torch.float32 else 1.0 - W
    as_float = run_ema(t0, sources, m)
    as_tensor = run_ema(t0, sources, torch.tensor(m, dtype=tensor_dtype))
    ref = simulate(t0, sources, 1.0 - m)
    movement = (ref - t0.double()).abs().max()
    assert (as_tensor.double() - as_float.double()).abs().max() <= 1e-5 * movement
    assert (as_tensor.double() - ref).abs().max() <= 1e-4 * movement


@pytest.mark.parametrize("momentum", [1.0, torch.tensor(1.0), torch.tensor(1.0, dtype=torch.float64)])
@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16])
def test_ema_momentum_one_is_a_no_op(momentum, source_dtype):
    g = torch.Generator().manual_seed(2)
    t = torch.randn(3, 257, generator=g) * 1e3
    before = t.clone()
    ema_([t, t[0]], [torch.randn(3, 257, generator=g).to(source_dtype), torch.randn(257, generator=g).to(source_dtype)],
         momentum)
    assert torch.equal(t, before)


def test_ema_lists_and_shard_views():
    g = torch.Generator().manual_seed(3)
    flat = torch.randn(1000, generator=g)
    src = torch.randn(1000, generator=g)
    original = flat.clone()
    shard = flat[200:450]  # a contiguous slice, like a ZeRO partition
    extra_t, extra_s = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    extra_ref = extra_t.double() + 0.25 * (extra_s.double() - extra_t.double())
    ema_([shard, extra_t], [src[200:450], extra_s], 0.75)
    expect = original.double().clone()
    expect[200:450] += 0.25 * (src[200:450].double() - expect[200:450])
    torch.testing.assert_close(flat.double(), expect, atol=1e-6, rtol=0)
    assert torch.equal(flat[:200], original[:200]) and torch.equal(flat[450:], original[450:])
    torch.testing.assert_close(extra_t.double(), extra_ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        ema_([flat], [src, src], 0.9)
    with pytest.raises(ValueError):
        ema_(flat, src[:10], 0.9)
