"""Triton ``fused_add_layer_norm`` against float64 maths.

Runs the kernels compiled on CUDA and in Triton's interpreter on CPU (tests/conftest.py sets
``TRITON_INTERPRET=1`` there). Every case compares ``normed``, ``new_residual`` and the gradients of x,
residual, weight and bias with a float64 evaluation of the same maths, and bounds the kernel's error by
the error of the unfused same-dtype PyTorch chain (``x + residual`` then ``F.layer_norm``) on the same
inputs: ``err_triton <= FACTOR * err_torch + u`` (relative Frobenius norms, ``u`` the dtype's unit
roundoff), the rule flash-attention's tests use. Odd sizes (T 1 and 37, D 24, 80, 130, 1280), residual
None / in x's dtype / fp32, every dtype, NaN-poisoned outputs (unwritten elements fail), the custom-op
registration and ``torch.compile``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import fastjepa_kernels.layer_norm as ln  # noqa: E402
from fastjepa_kernels import fused_add_layer_norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# On CUDA the kernel rounds like torch (to nearest even) and the rule is flash-attention's factor 2.
# Triton 3.6's interpreter casts fp32 -> bf16/fp16 by truncation (its cast_impl), which doubles the
# rounding error of every stored value, so on CPU the factor is 3.
FACTOR = 2.0 if DEVICE == "cuda" else 3.0
EPS = 1e-6
SHAPES = [(1, 24), (37, 80), (37, 130), (5, 1280)]
# residual: None (new_residual is x), "same" (x's dtype), "fp32", "cast" (None, new_residual in fp32)
RESIDUALS = ["none", "same", "fp32", "cast"]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch, helpers):
    """Every output the launchers allocate starts as NaN, so unwritten elements fail the comparison."""
    monkeypatch.setattr(ln, "_empty", helpers.nan_empty)


def make_case(T, D, dtype, residual, seed):
    """Inputs with a large common offset per row (the mean a one-pass variance would cancel against)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, D, generator=g) + 3.0 * torch.randn(T, 1, generator=g)).to(dtype)
    res = None
    if residual in ("same", "fp32"):
        res = torch.randn(T, D, generator=g) * 2.0
        res = res.to(dtype if residual == "same" else torch.float32)
    w = 1.0 + 0.5 * torch.randn(D, generator=g)
    b = 0.5 * torch.randn(D, generator=g)
    stream = res.dtype if res is not None else (torch.float32 if residual == "cast" else dtype)
    dnormed = torch.randn(T, D, generator=g).to(dtype)
    dnew = torch.randn(T, D, generator=g).to(stream)
    leaves = [t.to(DEVICE).requires_grad_() if t is not None else None for t in (x, res, w, b)]
    return leaves, stream, dnormed.to(DEVICE), dnew.to(DEVICE)


def run(backend, leaves, stream, dnormed, dnew, out_dtype=None):
    x, res, w, b = leaves
    normed, new_res = fused_add_layer_norm(x, res, w, b, EPS, out_dtype=out_dtype,
                                           residual_dtype=stream if res is None else None, backend=backend)
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad((normed, new_res), wrt, (dnormed.to(normed.dtype), dnew))
    return [normed.detach(), new_res.detach(), *grads]


def unfused_torch(leaves, stream, dnormed, dnew, out_dtype):
    """The same-dtype PyTorch chain: the add in the stream's dtype, ``F.layer_norm`` in that dtype."""
    x, res, w, b = (t.detach().clone().requires_grad_() if t is not None else None for t in leaves)
    s = (x if res is None else x + res).to(stream)
    normed = F.layer_norm(s, (s.shape[-1],), w.to(stream), b.to(stream), EPS).to(out_dtype)
    wrt = [t for t in (x, res, w, b) if t is not None]
    grads = torch.autograd.grad((normed, s), wrt, (dnormed.to(out_dtype), dnew))
    return [normed.detach(), s.detach(), *grads]


def float64_truth(leaves, stream, dnormed, dnew):
    """The op's maths in float64: the stream is rounded to its dtype (the op's definition; the gradient
    passes straight through the rounding), then LayerNorm from its formula."""
    x, res, w, b = (t.detach().cpu().double().requires_grad_() if t is not None else None for t in leaves)
    s = x if res is None else x + res
    s = s + (s.to(stream).double() - s).detach()
    mean = s.mean(-1, keepdim=True)
    var = ((s - mean) ** 2).mean(-1, keepdim=True)
    normed = (s - mean) / torch.sqrt(var + EPS) * w + b
    wrt = [t for t in (x, res, w, b) if t is not None]
    grads = torch.autograd.grad((normed, s), wrt, (dnormed.cpu().double(), dnew.cpu().double()))
    return [normed.detach(), s.detach(), *grads]


def rel_err(a, ref) -> float:
    return float((a.detach().cpu().double() - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_within_rule(got, torch_ref, truth, names, dtypes, context):
    for name, a, t, r, dt in zip(names, got, torch_ref, truth, dtypes):
        assert a.dtype == dt, f"{name}: dtype {a.dtype}, want {dt} {context}"
        assert torch.isfinite(a).all(), f"{name}: non-finite values (unwritten elements?) {context}"
        err, bound = rel_err(a, r), FACTOR * rel_err(t, r) + UNIT_ROUNDOFF[dt]
        assert err <= bound, f"{name}: triton error {err:.3e} > bound {bound:.3e} {context}"


@pytest.mark.parametrize("T,D", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("residual", RESIDUALS)
def test_forward_and_every_gradient_against_float64(T, D, dtype, residual):
    if residual == "fp32" and dtype == torch.float32:
        pytest.skip("the same case as residual='same'")
    if residual == "cast" and dtype == torch.float32:
        pytest.skip("the same case as residual='none'")
    leaves, stream, dnormed, dnew = make_case(T, D, dtype, residual, seed=T * 1000 + D)
    got = run("triton", leaves, stream, dnormed, dnew)
    torch_ref = unfused_torch(leaves, stream, dnormed, dnew, dtype)
    truth = float64_truth(leaves, stream, dnormed, dnew)
    names = ["normed", "new_residual", "dx"] + (["dresidual"] if leaves[1] is not None else []) + ["dweight", "dbias"]
    dtypes = [dtype, stream, dtype] + ([leaves[1].dtype] if leaves[1] is not None else []) + [torch.float32] * 2
    assert got[0].shape == (T, D) and got[1].shape == (T, D)
    assert_within_rule(got, torch_ref, truth, names, dtypes, f"(T={T}, D={D}, {dtype}, residual={residual})")
    if leaves[1] is not None:  # dx and dresidual carry the same values
        torch.testing.assert_close(got[2].double(), got[3].double(), atol=0, rtol=2 * UNIT_ROUNDOFF[dtype])  # 1 ulp


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("residual", ["fp32", "cast"])
def test_out_dtype_fp32_from_a_low_precision_x(dtype, residual):
    """The encoder's final norm under autocast: x in bf16, the stream and ``normed`` in fp32."""
    leaves, stream, dnormed, dnew = make_case(37, 130, dtype, residual, seed=11)
    got = run("triton", leaves, stream, dnormed.float(), dnew, out_dtype=torch.float32)
    torch_ref = unfused_torch(leaves, stream, dnormed.float(), dnew, torch.float32)
    truth = float64_truth(leaves, stream, dnormed.float(), dnew)
    names = ["normed", "new_residual", "dx"] + (["dresidual"] if leaves[1] is not None else []) + ["dweight", "dbias"]
    dtypes = [torch.float32, stream, dtype] + ([torch.float32] if leaves[1] is not None else []) + [torch.float32] * 2
    assert_within_rule(got, torch_ref, truth, names, dtypes, f"({dtype}, residual={residual}, out fp32)")


@pytest.mark.parametrize("with_dnew", [True, False])
def test_several_tiles_per_backward_program_and_bits_repeat(monkeypatch, with_dnew):
    """Two backward programs over 70 rows: each walks many tiles and the partial sums meet in torch.
    The same call twice gives the same bits (no atomics)."""
    monkeypatch.setattr(ln, "MAX_BWD_PROGRAMS", 2)
    assert ln.bwd_programs(70, ln.tile(96)[0])[0] == 2
    leaves, stream, dnormed, dnew = make_case(70, 96, torch.bfloat16, "fp32", seed=3)
    x, res, w, b = leaves

    def grads():
        normed, new_res = fused_add_layer_norm(x, res, w, b, EPS, backend="triton")
        outs, ups = (normed, new_res) if with_dnew else (normed,), (dnormed, dnew) if with_dnew else (dnormed,)
        return torch.autograd.grad(outs, (x, res, w, b), ups)

    first, second = grads(), grads()
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    truth = float64_truth(leaves, stream, dnormed, dnew if with_dnew else torch.zeros_like(dnew))
    torch_ref = unfused_torch(leaves, stream, dnormed, dnew if with_dnew else torch.zeros_like(dnew), torch.bfloat16)
    names = ["dx", "dresidual", "dweight", "dbias"]
    assert_within_rule(first, torch_ref[2:], truth[2:], names, [torch.bfloat16, torch.float32, torch.float32,
                                                                 torch.float32], f"(dnew={with_dnew})")


def test_new_residual_is_x_itself_without_residual_or_cast():
    """No residual, no cast: the op stores nothing and returns x; both outputs' gradients reach x."""
    leaves, stream, dnormed, dnew = make_case(9, 24, torch.float32, "none", seed=4)
    x, _, w, b = leaves
    normed, new_res = fused_add_layer_norm(x, None, w, b, EPS, backend="triton")
    assert new_res is x
    (gx,) = torch.autograd.grad((normed, new_res), (x,), (dnormed, dnew))
    truth = float64_truth(leaves, stream, dnormed, dnew)
    torch.testing.assert_close(gx.double().cpu(), truth[2], atol=1e-5, rtol=1e-5)


def test_leading_dims_are_rows():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 40, generator=g).to(DEVICE)
    res = torch.randn(2, 3, 40, generator=g).to(DEVICE)
    w, b = torch.randn(40, generator=g).to(DEVICE), torch.randn(40, generator=g).to(DEVICE)
    normed, new_res = fused_add_layer_norm(x, res, w, b, EPS, backend="triton")
    ref_n, ref_s = ln.fused_add_layer_norm_reference(x, res, w, b, EPS)
    assert normed.shape == new_res.shape == (2, 3, 40)
    torch.testing.assert_close(normed, ref_n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_res, ref_s, atol=0, rtol=0)


def test_empty_input():
    x = torch.randn(0, 24, device=DEVICE, requires_grad=True)
    w = torch.ones(24, device=DEVICE, requires_grad=True)
    b = torch.zeros(24, device=DEVICE, requires_grad=True)
    normed, new_res = fused_add_layer_norm(x, x.detach().clone(), w, b, EPS, backend="triton")
    assert normed.shape == (0, 24) and new_res.shape == (0, 24)
    gx, gw = torch.autograd.grad(normed.sum() + new_res.sum(), (x, w))
    assert gx.shape == (0, 24) and (gw == 0).all()


def test_backends_and_input_checks(monkeypatch):
    calls = []
    real = ln.fused_add_layer_norm_reference
    monkeypatch.setattr(ln, "fused_add_layer_norm_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(4, 16, device=DEVICE)
    w, b = torch.ones(16, device=DEVICE), torch.zeros(16, device=DEVICE)
    fused_add_layer_norm(x, None, w, b, EPS)  # auto: triton on CUDA, the reference elsewhere
    assert len(calls) == (0 if DEVICE == "cuda" else 1)
    fused_add_layer_norm(x.double(), None, w.double(), b.double(), EPS)  # float64: the reference under auto
    assert len(calls) == (1 if DEVICE == "cuda" else 2)
    with pytest.raises(ValueError, match="backend"):
        fused_add_layer_norm(x, None, w, b, EPS, backend="nope")
    with pytest.raises(ValueError, match="residual"):
        fused_add_layer_norm(x, x[:, :8], w, b, EPS, backend="triton")
    with pytest.raises(TypeError, match="residual"):
        fused_add_layer_norm(x.bfloat16(), x.half(), w, b, EPS, backend="triton")
    with pytest.raises(TypeError, match="residual_dtype"):
        fused_add_layer_norm(x, x, w, b, EPS, residual_dtype=torch.bfloat16, backend="triton")
    with pytest.raises(ValueError, match="weight"):
        fused_add_layer_norm(x, None, w[:8], b, EPS, backend="triton")
    with pytest.raises(ValueError, match="bias"):
        fused_add_layer_norm(x, None, w, None, EPS, backend="triton")
    with pytest.raises(TypeError):
        fused_add_layer_norm(x.double(), None, w, b, EPS, backend="triton")
    with pytest.raises(TypeError, match="out_dtype"):
        fused_add_layer_norm(x, None, w, b, EPS, out_dtype=torch.float64, backend="triton")


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) impl and autograd registration agree with the real kernels."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(7, 24, generator=g).to(DEVICE).bfloat16().requires_grad_()
    res = torch.randn(7, 24, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(24, generator=g).to(DEVICE).requires_grad_()
    b = torch.randn(24, generator=g).to(DEVICE).requires_grad_()
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(ln._add_ln_fwd_op, (x, res, w, b, EPS, torch.bfloat16, torch.float32), test_utils=tests)
    torch.library.opcheck(ln._add_ln_fwd_op, (x, None, w, b, EPS, torch.float32, torch.bfloat16), test_utils=tests)
    normed, new_res, mean, rstd = ln._add_ln_fwd_op(x.detach(), res.detach(), w.detach(), b.detach(), EPS,
                                                    torch.bfloat16, torch.float32)
    torch.library.opcheck(ln._add_ln_bwd_op, (normed, new_res, new_res, w.detach(), mean, rstd, torch.bfloat16,
                                              torch.float32, True), test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    """The ops trace into one graph (fake impls, no graph break); inductor on CUDA, aot_eager on CPU."""
    def block(x, res, w, b):
        normed, new_res = fused_add_layer_norm(x * 1.5, res, w, b, EPS, backend="triton")
        return (normed.float() * new_res).sum()

    leaves, _, _, _ = make_case(9, 24, torch.float32, "same", seed=7)
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    got = compiled(*leaves)
    g_got = torch.autograd.grad(got, leaves)
    want = block(*leaves)
    g_want = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(got, want)
    for a, c in zip(g_got, g_want):
        torch.testing.assert_close(a, c)
