"""The fused multi-tensor Triton EMA (``fastjepa_kernels.ema_``, backend "triton").

On CPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so sizes
are small but odd (1, 7, 4097, 3x5x7 ...) and cover full blocks, tails, unaligned slices and both
configurations. References: a float64 simulation of ``t <- t + w (s - t)`` and ``torch._foreach_lerp_``.
Every copy_out starts NaN-poisoned.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fastjepa_kernels import ema as ema_mod  # noqa: E402
from fastjepa_kernels import ema_  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = torch.finfo(torch.float32).eps
SHAPES = [(1,), (7,), (4097,), (3, 5, 7), (2, 1030)]


def make(shapes, source_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    targets = [torch.randn(s, generator=g).to(DEVICE) for s in shapes]
    sources = [torch.randn(s, generator=g).to(source_dtype).to(DEVICE) for s in shapes]
    return targets, sources


def lerp_f64(t, s, w):
    return t.double() + w * (s.double() - t.double())


def ulp_bound(t, s):
    """One fp32 ulp of the inputs' magnitude: rounding differences between lerp evaluations stay below."""
    return EPS * torch.maximum(t.double().abs(), s.double().abs()) + 1e-30


def poisoned_like(tensors, dtype):
    return [torch.full(t.shape, float("nan"), dtype=dtype, device=t.device) for t in tensors]


@pytest.fixture(autouse=True)
def _fresh_plans():
    ema_mod._PLANS.clear()
    yield
    ema_mod._PLANS.clear()


@pytest.fixture(params=["small", "large"])
def config(request, monkeypatch):
    """Both launch configurations (the 4096-element one is normally for >= 2M elements)."""
    if request.param == "large":
        monkeypatch.setattr(ema_mod, "SMALL_PROBLEM", 0)
    return request.param


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("momentum_kind", ["float", "tensor64", "tensor32"])
def test_lists_track_fp64_and_foreach_lerp(source_dtype, momentum_kind, config):
    targets, sources = make(SHAPES, source_dtype, seed=0)
    ref = [t.double() for t in targets]
    for step, m in enumerate([0.9, 0.3, 0.996]):  # 0.3: lerp's other branch (w >= 0.5)
        if momentum_kind == "float":
            momentum, w32 = m, 1.0 - m
        else:
            dtype = torch.float64 if momentum_kind == "tensor64" else torch.float32
            momentum = torch.tensor(m, dtype=dtype, device=DEVICE)
            w32 = float(torch.tensor(1.0 - float(momentum), dtype=torch.float32))
        before = [t.clone() for t in targets]
        lerped = [t.clone() for t in targets]
        torch._foreach_lerp_(lerped, [s.float() for s in sources], w32)
        ema_(targets, sources, momentum, backend="triton")
        for t, b, s, lp, i in zip(targets, before, sources, lerped, range(len(ref))):
            assert t.shape == b.shape and t.dtype == torch.float32
            # the same formula as _foreach_lerp_: within one fp32 ulp of the inputs
            assert ((t.double() - lp.double()).abs() <= ulp_bound(b, s)).all(), (step, i)
            if DEVICE == "cuda":
                assert torch.equal(t, lp), (step, i)  # both fuse w * d + t into one fma
            ref[i] = lerp_f64(ref[i], s, 1.0 - m)
    for t, r in zip(targets, ref):
        assert (t.double() - r).abs().max() <= 1e-6 * max(1.0, r.abs().max())


@pytest.mark.parametrize("copy_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16])
def test_copy_out_is_the_rounded_target(copy_dtype, source_dtype, config):
    targets, sources = make(SHAPES, source_dtype, seed=1)
    copies = poisoned_like(targets, copy_dtype)
    for m in (0.99, torch.tensor(0.5, dtype=torch.float64, device=DEVICE)):
        ema_(targets, sources, m, backend="triton", copy_out=copies)
        for t, c in zip(targets, copies):
            assert c.dtype == copy_dtype
            assert torch.equal(c, t.to(copy_dtype))  # round to nearest even, no NaN left


def test_single_flat_tensor_and_momentum_one(config):
    g = torch.Generator().manual_seed(2)
    n = 3 * 4096 + 5  # full blocks of either config and a tail
    t = (torch.randn(n, generator=g) * 1e3).to(DEVICE)
    s = torch.randn(n, generator=g).to(torch.bfloat16).to(DEVICE)
    before = t.clone()
    copy = torch.full((n,), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    for m in (1.0, torch.tensor(1.0, dtype=torch.float64, device=DEVICE), torch.tensor(1.0, device=DEVICE)):
        ema_(t, s, m, backend="triton", copy_out=copy)
        assert torch.equal(t, before)  # a skipped step leaves the target bit for bit
        assert torch.equal(copy, before.bfloat16())
    ema_(t, s, 0.75, backend="triton")
    expect = lerp_f64(before, s, 0.25)
    assert ((t.double() - expect).abs() <= ulp_bound(before, s)).all()


@pytest.mark.parametrize("start,end", [(1024, 9216), (1001, 7003), (3, 4)])
def test_slice_of_a_bigger_buffer(start, end):
    """A ZeRO shard: only ``flat[start:end]`` changes (aligned and unaligned starts)."""
    g = torch.Generator().manual_seed(3)
    flat = torch.randn(10_000, generator=g).to(DEVICE)
    src = torch.randn(10_000, generator=g).to(torch.bfloat16).to(DEVICE)
    copy = torch.full((10_000,), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    original = flat.clone()
    ema_(flat[start:end], src[start:end], 0.9, backend="triton", copy_out=copy[start:end])
    expect = lerp_f64(original[start:end], src[start:end], 0.1)
    assert ((flat[start:end].double() - expect).abs() <= ulp_bound(original[start:end], src[start:end])).all()
    assert torch.equal(flat[:start], original[:start]) and torch.equal(flat[end:], original[end:])
    assert torch.equal(copy[start:end], flat[start:end].bfloat16())
    assert copy[:start].isnan().all() and copy[end:].isnan().all()  # nothing written outside


def test_views_of_one_buffer_merge_and_plans_are_cached():
    flat_t = torch.randn(5000, device=DEVICE)
    flat_s = torch.randn(5000, device=DEVICE)
    bounds = [0, 1, 8, 4105, 5000]
    ts = [flat_t[a:b] for a, b in zip(bounds, bounds[1:])]
    ss = [flat_s[a:b] for a, b in zip(bounds, bounds[1:])]
    expect = lerp_f64(flat_t, flat_s, 0.2)
    ema_(ts, ss, 0.8, backend="triton")
    (plan,) = ema_mod._PLANS.values()
    assert plan.n_entries == 1  # the list of views became one flat range
    assert ((flat_t.double() - expect).abs() <= 2 * EPS * (expect.abs() + flat_s.double().abs())).all()
    ema_(ts, ss, 0.8, backend="triton")
    assert len(ema_mod._PLANS) == 1  # the second step reuses the table


def test_mixed_source_dtypes_in_one_list():
    targets, _ = make(SHAPES, torch.float32, seed=4)
    g = torch.Generator().manual_seed(5)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16, torch.float32]
    sources = [torch.randn(t.shape, generator=g).to(d).to(DEVICE) for t, d in zip(targets, dtypes)]
    before = [t.clone() for t in targets]
    ema_(targets, sources, 0.95, backend="triton")
    for t, b, s in zip(targets, before, sources):
        assert ((t.double() - lerp_f64(b, s, 0.05)).abs() <= ulp_bound(b, s)).all()


@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16])
def test_tiny_updates_move_as_fp32_predicts(source_dtype):
    """1 - m = 1e-4 for 200 steps: each update is ~1e-4 of |s - t| (below a bf16 ulp), and still the
    fp32 target follows the same fp32 maths (_foreach_lerp_) and the float64 truth."""
    g = torch.Generator().manual_seed(6)
    n, steps, w = 4097, 200, 1e-4
    t0 = torch.randn(n, generator=g).to(DEVICE)
    s0 = torch.randn(n, generator=g)
    sources = [(s0 + 0.05 * torch.randn(n, generator=g)).to(source_dtype).to(DEVICE) for _ in range(steps)]
    t, fp32, ref = t0.clone(), [t0.clone()], t0.double()
    momentum = torch.tensor(1.0 - w, dtype=torch.float64, device=DEVICE)
    for s in sources:
        ema_(t, s, momentum, backend="triton")
        torch._foreach_lerp_(fp32, [s.float()], float(torch.tensor(w, dtype=torch.float32)))
        ref = ref + w * (s.double() - ref)
    movement = (ref - t0.double()).abs().max()
    assert movement > 0.02  # 1 - (1 - 1e-4)^200 = 2 % of |s - t|
    assert (t.double() - fp32[0].double()).abs().max() <= 1e-6 * movement * steps ** 0.5 + 4 * EPS
    assert (t.double() - ref).abs().max() <= 1e-4 * movement


def test_auto_backend_and_reference_copy_out():
    targets, sources = make(SHAPES, torch.bfloat16, seed=7)
    ref_t = [t.clone() for t in targets]
    copies, ref_c = poisoned_like(targets, torch.bfloat16), poisoned_like(targets, torch.bfloat16)
    ema_(targets, sources, 0.9, copy_out=copies)  # auto: triton on CUDA, the reference on CPU
    ema_(ref_t, sources, 0.9, backend="reference", copy_out=ref_c)
    for t, r, c, rc in zip(targets, ref_t, copies, ref_c):
        assert ((t.double() - r.double()).abs() <= ulp_bound(r, t)).all()
        assert torch.equal(rc, r.bfloat16()) and torch.equal(c, t.bfloat16())


def test_compiles_without_graph_break():
    targets, sources = make([(7,), (3, 5)], torch.float32, seed=8)
    before = [t.clone() for t in targets]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(ts, ss, m):
        ema_(ts, ss, m, backend="triton")

    step(targets, sources, torch.tensor(0.5, dtype=torch.float64, device=DEVICE))
    for t, b, s in zip(targets, before, sources):
        assert ((t.double() - lerp_f64(b, s, 0.5)).abs() <= ulp_bound(b, s)).all()


def test_errors():
    t, s = torch.randn(4, 6, device=DEVICE), torch.randn(4, 6, device=DEVICE)
    with pytest.raises(TypeError):
        ema_(t.bfloat16(), s, 0.9, backend="triton")
    with pytest.raises(TypeError):
        ema_(t, s.double(), 0.9, backend="triton")
    with pytest.raises(ValueError):
        ema_(t, s[:, :5].contiguous(), 0.9, backend="triton")
    with pytest.raises(ValueError):
        ema_([t, t], [s], 0.9, backend="triton")
    with pytest.raises(ValueError):
        ema_(t.t(), s.t(), 0.9, backend="triton")  # non-contiguous
    with pytest.raises(ValueError):
        ema_(t, s, 0.9, backend="triton", copy_out=torch.empty(6, 4, dtype=torch.bfloat16, device=DEVICE).t())
    with pytest.raises(TypeError):
        ema_(t, s, 0.9, backend="triton", copy_out=torch.empty(4, 6, device=DEVICE))
    with pytest.raises(ValueError):
        ema_(t, s, torch.ones(1, device=DEVICE), backend="triton")
    with pytest.raises(ValueError):
        ema_(t, s, 0.9, backend="cuda")
    if DEVICE == "cpu":
        import fastjepa_kernels._backend as module  # the one backend rule every op goes through

        orig = module.interpreting
        module.interpreting = lambda: False
        try:
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
                ema_(t, s, 0.9, backend="triton")
        finally:
            module.interpreting = orig


def test_aot_specs_cover_the_launcher():
    names = {spec.name for spec in ema_mod.aot_specs()}
    assert all(name.startswith("ema") for name in names)
    for cfg in ema_mod.CONFIGS:
        for src in ("fp32", "bf16", "fp16"):
            for copy in ("none", "bf16", "fp16"):
                assert f"ema_fwd[src{src},copy{copy},B{cfg.block_size},w{cfg.num_warps}]" in names
    assert not any(spec.wants_wgmma for spec in ema_mod.aot_specs())


def test_opcheck():
    targets, sources = make([(7,), (3, 5)], torch.bfloat16, seed=9)
    copies = poisoned_like(targets, torch.float16)
    momentum = torch.tensor(0.9, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(ema_mod._ema_op, (targets, sources, momentum, 0.0, copies))
    torch.library.opcheck(ema_mod._ema_op, (targets, sources, None, 0.1, []))
