"""Triton ``bias_gelu`` (exact erf GELU of ``x + bias``) against float64 maths.

Runs the kernels compiled on CUDA and in Triton's interpreter on CPU (tests/conftest.py sets
``TRITON_INTERPRET=1`` there). Every case compares ``y``, ``dx`` and ``dbias`` with float64
``0.5 z (1 + erf(z / sqrt 2))`` and bounds the kernel's error by that of the unfused same-dtype
PyTorch chain (``F.gelu(x + bias.to(x.dtype))``, what ``nn.Linear`` + ``nn.GELU`` compute under
autocast): ``err_triton <= FACTOR * err_torch + u`` (relative Frobenius norms, ``u`` the dtype's unit
roundoff). Odd sizes, bias in fp32 and in x's dtype, values far into both tails, NaN-poisoned
outputs, several row chunks per column tile, repeatable bits, the custom ops and ``torch.compile``.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from fastjepa_kernels import bias_gelu  # noqa: E402

# the module, not the function of the same name that the package exports
bg = importlib.import_module("fastjepa_kernels.bias_gelu")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# flash-attention's factor 2 on CUDA; 3 under Triton 3.6's interpreter, whose fp32 -> bf16 casts
# truncate (its cast_impl) and so double the rounding error of every stored value
FACTOR = 2.0 if DEVICE == "cuda" else 3.0
SHAPES = [(1, 24), (37, 80), (37, 130), (5, 1280)]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch, helpers):
    """Every output the launchers allocate starts as NaN, so unwritten elements fail the comparison."""
    monkeypatch.setattr(bg, "_empty", helpers.nan_empty)


def make_case(T, F_, dtype, bias_dtype, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, F_, generator=g) * scale).to(dtype)
    bias = torch.randn(F_, generator=g).to(bias_dtype)
    dy = torch.randn(T, F_, generator=g).to(dtype)
    return x.to(DEVICE).requires_grad_(), bias.to(DEVICE).requires_grad_(), dy.to(DEVICE)


def float64_truth(x, bias, dy):
    x64, b64 = (t.detach().cpu().double().requires_grad_() for t in (x, bias))
    z = x64 + b64
    y = 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))
    return [y.detach(), *torch.autograd.grad(y, (x64, b64), dy.cpu().double())]


def unfused_torch(x, bias, dy):
    x_, b_ = (t.detach().clone().requires_grad_() for t in (x, bias))
    y = F.gelu(x_ + b_.to(x.dtype))
    return [y.detach(), *torch.autograd.grad(y, (x_, b_), dy)]


def run(x, bias, dy, backend="triton"):
    y = bias_gelu(x, bias, backend=backend)
    return [y.detach(), *torch.autograd.grad(y, (x, bias), dy)]


def rel_err(a, ref) -> float:
    return float((a.detach().cpu().double() - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_within_rule(got, torch_ref, truth, dtypes, context):
    for name, a, t, r, dt in zip(("y", "dx", "dbias"), got, torch_ref, truth, dtypes):
        assert a.dtype == dt, f"{name}: dtype {a.dtype}, want {dt} {context}"
        assert torch.isfinite(a).all(), f"{name}: non-finite values (unwritten elements?) {context}"
        err, bound = rel_err(a, r), FACTOR * rel_err(t, r) + UNIT_ROUNDOFF[dt]
        assert err <= bound, f"{name}: triton error {err:.3e} > bound {bound:.3e} {context}"


@pytest.mark.parametrize("T,F_", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("bias_fp32", [True, False])
def test_forward_and_gradients_against_float64(T, F_, dtype, bias_fp32):
    if bias_fp32 and dtype == torch.float32:
        pytest.skip("the same case as bias in x's dtype")
    bias_dtype = torch.float32 if bias_fp32 else dtype
    x, bias, dy = make_case(T, F_, dtype, bias_dtype, seed=T * 1000 + F_)
    got = run(x, bias, dy)
    assert got[0].shape == (T, F_)
    assert_within_rule(got, unfused_torch(x, bias, dy), float64_truth(x, bias, dy), [dtype, dtype, bias_dtype],
                       f"(T={T}, F={F_}, {dtype}, bias {bias_dtype})")


def test_tails_and_zero():
    """z from -12 to 12 (GELU ~0 and ~z, gradient ~0 and ~1) and exactly 0 (GELU 0, gradient 1/2)."""
    z = torch.linspace(-12.0, 12.0, 97).to(DEVICE)
    x = torch.stack([z, torch.zeros_like(z)]).requires_grad_()
    bias = torch.zeros(97, device=DEVICE, requires_grad=True)
    dy = torch.ones(2, 97, device=DEVICE)
    y, dx, db = run(x, bias, dy)
    truth = float64_truth(x, bias, dy)
    torch.testing.assert_close(y.double().cpu(), truth[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dx.double().cpu(), truth[1], atol=1e-6, rtol=1e-6)
    assert (y[1] == 0).all() and (dx[1] == 0.5).all()
    torch.testing.assert_close(db.double().cpu(), truth[2], atol=1e-6, rtol=1e-6)


def test_several_row_chunks_and_bits_repeat(monkeypatch):
    """Three row chunks over 200 rows (each walks several tiles; partial sums meet in torch); the same
    call twice gives the same bits (no atomics)."""
    monkeypatch.setattr(bg, "ROW_CHUNKS", 3)
    assert bg.bwd_chunks(200)[0] == 3
    x, bias, dy = make_case(200, 130, torch.bfloat16, torch.float32, seed=3)
    first, second = run(x, bias, dy), run(x, bias, dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    assert_within_rule(first, unfused_torch(x, bias, dy), float64_truth(x, bias, dy),
                       [torch.bfloat16, torch.bfloat16, torch.float32], "(3 chunks)")


def test_leading_dims_and_empty():
    x, bias, dy = make_case(6, 40, torch.float32, torch.float32, seed=4)
    y3 = bias_gelu(x.view(2, 3, 40), bias, backend="triton")
    assert y3.shape == (2, 3, 40)
    torch.testing.assert_close(y3.view(6, 40), bg.bias_gelu_reference(x, bias))
    empty = torch.zeros(0, 40, device=DEVICE, requires_grad=True)
    y = bias_gelu(empty, bias, backend="triton")
    gx, gb = torch.autograd.grad(y.sum(), (empty, bias))
    assert y.shape == (0, 40) and gx.shape == (0, 40) and (gb == 0).all()


def test_backends_and_input_checks(monkeypatch):
    calls = []
    real = bg.bias_gelu_reference
    monkeypatch.setattr(bg, "bias_gelu_reference", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(4, 16, device=DEVICE)
    b = torch.zeros(16, device=DEVICE)
    bias_gelu(x, b)  # auto: triton on CUDA, the reference elsewhere
    assert len(calls) == (0 if DEVICE == "cuda" else 1)
    bias_gelu(x.double(), b.double())  # float64: the reference under auto
    assert len(calls) == (1 if DEVICE == "cuda" else 2)
    with pytest.raises(ValueError, match="backend"):
        bias_gelu(x, b, backend="nope")
    with pytest.raises(ValueError, match="bias"):
        bias_gelu(x, b[:8], backend="triton")
    with pytest.raises(TypeError, match="bias"):
        bias_gelu(x.bfloat16(), b.half(), backend="triton")
    with pytest.raises(TypeError):
        bias_gelu(x.double(), b.double(), backend="triton")


def test_custom_ops_pass_opcheck():
    x, bias, dy = make_case(7, 24, torch.bfloat16, torch.float32, seed=6)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(bg._bias_gelu_fwd_op, (x, bias), test_utils=tests)
    torch.library.opcheck(bg._bias_gelu_bwd_op, (dy, x.detach(), bias.detach()),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    """One graph (fake impls, no graph break); inductor on CUDA, aot_eager on CPU."""
    def mlp_epilogue(x, bias):
        return (bias_gelu(x * 1.5, bias, backend="triton") * 2.0).sum()

    x, bias, _ = make_case(9, 24, torch.float32, torch.float32, seed=7)
    compiled = torch.compile(mlp_epilogue, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    got = compiled(x, bias)
    g_got = torch.autograd.grad(got, (x, bias))
    want = mlp_epilogue(x, bias)
    g_want = torch.autograd.grad(want, (x, bias))
    torch.testing.assert_close(got, want)
    for a, c in zip(g_got, g_want):
        torch.testing.assert_close(a, c)
