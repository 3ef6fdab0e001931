"""Triton ``gather_tokens`` / ``scatter_tokens`` against float64 PyTorch maths.

Runs the kernels compiled on CUDA and in Triton's interpreter on CPU (tests/conftest.py sets
``TRITON_INTERPRET=1`` there). Covers odd D (24, 96, 130), int32/int64 indices with repeats, ``pos`` on
and off, ``out_dtype``, strided ``x``, fp32/bf16/fp16, NaN-poisoned outputs, every gradient (x, pos,
tokens), hot rows picked hundreds of times, the atomic-free ``unique=True`` backward, the custom-op
registration and ``torch.compile``.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

pytest.importorskip("triton")

import fastjepa_kernels.gather as gather_mod  # noqa: E402
from fastjepa_kernels import gather_tokens, scatter_tokens  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (atol, rtol) per output dtype: one rounding of an fp32 sum (fp32: sums of a few terms)
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-2), torch.float16: (2e-3, 1e-3)}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch, helpers):
    """Every output the launchers allocate starts as NaN, so unwritten elements fail the comparison."""
    monkeypatch.setattr(gather_mod, "_empty", helpers.nan_empty)


def random_index(total, count, index_dtype, gen, hot=None):
    """``count`` flat row ids in ``[0, total)`` with repeats; ``hot`` rows (if given) appear many times."""
    index = torch.randint(0, total, (count,), generator=gen)
    if hot is not None:
        index[::3] = hot
    return index.to(index_dtype).to(DEVICE)


def gather64(x, index, pos, grad):
    """float64 forward and gradients on the CPU, written independently of the module (no index_select)."""
    x64 = x.detach().cpu().double().reshape(-1, x.shape[-1])
    idx, grad = index.cpu().long(), grad.cpu()
    pos = None if pos is None else pos.detach().cpu()
    out = x64[idx]
    gx = torch.zeros_like(x64).index_put_((idx,), grad.double(), accumulate=True)
    gpos = None
    if pos is not None:
        n = idx % x.shape[1]
        out = out + pos.double()[n]
        gpos = torch.zeros_like(pos, dtype=torch.float64).index_put_((n,), grad.double(), accumulate=True)
    return out, gx.view(x.shape), gpos


def close(got, ref, dtype, what):
    atol, rtol = TOL[dtype]
    assert not torch.isnan(got).any(), f"{what}: NaN (an element was never written)"
    torch.testing.assert_close(got.double(), ref.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dim", [24, 96, 130])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("with_pos", [False, True])
def test_gather_forward_and_gradients(dim, dtype, index_dtype, with_pos):
    gen = torch.Generator().manual_seed(dim + 7 * with_pos)
    B, N, T = 3, 11, 37  # T odd, not a multiple of the 32-row tile
    x = torch.randn(B, N, dim, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    pos = torch.randn(N, dim, generator=gen).to(dtype).to(DEVICE).requires_grad_() if with_pos else None
    index = random_index(B * N, T, index_dtype, gen)
    grad = torch.randn(T, dim, generator=gen).to(dtype).to(DEVICE)

    out = gather_tokens(x, index, pos, backend="triton")
    grads = torch.autograd.grad(out, (x, pos) if with_pos else (x,), grad)
    ref, gx, gpos = gather64(x, index.cpu(), pos, grad.cpu())
    assert out.shape == (T, dim) and out.dtype == dtype
    close(out, ref.to(DEVICE), dtype, "out")
    assert grads[0].shape == x.shape and grads[0].dtype == dtype
    close(grads[0], gx.to(DEVICE), dtype, "grad x")
    if with_pos:
        assert grads[1].dtype == dtype
        close(grads[1], gpos.to(DEVICE), dtype, "grad pos")


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                               (torch.bfloat16, torch.float32)])
def test_gather_out_dtype_rounds_once(x_dtype, out_dtype):
    """``out_dtype`` in the same pass is bit-identical to the sum in fp32 followed by one cast."""
    gen = torch.Generator().manual_seed(1)
    B, N, D, T = 2, 9, 96, 21
    x = torch.randn(B, N, D, generator=gen).to(x_dtype).to(DEVICE).requires_grad_()
    pos = torch.randn(N, D, generator=gen).to(x_dtype).to(DEVICE).requires_grad_()
    index = random_index(B * N, T, torch.int32, gen)
    out = gather_tokens(x, index, pos, out_dtype=out_dtype, backend="triton")
    expect = (x.detach().float().reshape(-1, D)[index.long()] + pos.detach().float()[index.long() % N]).to(out_dtype)
    assert out.dtype == out_dtype
    if DEVICE == "cuda":
        assert torch.equal(out, expect)
    else:  # Triton's interpreter casts fp32 -> bf16 by truncation (triton 3.6 cast_impl): allow one ulp
        ulp = torch.finfo(out_dtype).eps * expect.float().abs()
        assert ((out.float() - expect.float()).abs() <= ulp).all()
    grad = torch.randn(T, D, generator=gen).to(out_dtype).to(DEVICE)
    gx, gpos = torch.autograd.grad(out, (x, pos), grad)
    assert gx.dtype == x_dtype and gpos.dtype == x_dtype
    _, rgx, rgpos = gather64(x, index.cpu(), pos, grad.cpu())
    close(gx, rgx.to(DEVICE), x_dtype, "grad x")
    close(gpos, rgpos.to(DEVICE), x_dtype, "grad pos")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_hot_row_like_the_mask_token(dtype):
    """A flat table whose last row is picked by a third of all tokens (the predictor's mask token):
    the fp32 accumulation keeps its gradient accurate even in bf16."""
    gen = torch.Generator().manual_seed(2)
    R, D, T = 20, 130, 301
    table = torch.randn(R, D, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    index = random_index(R, T, torch.int32, gen, hot=R - 1)
    grad = torch.randn(T, D, generator=gen).to(dtype).to(DEVICE)
    out = gather_tokens(table, index, backend="triton")
    (gx,) = torch.autograd.grad(out, table, grad)
    ref, rgx, _ = gather64(table, index.cpu(), None, grad.cpu())
    assert torch.equal(out.double().cpu(), ref)  # a plain copy is exact
    atol, rtol = TOL[dtype]
    # the hot row sums ~100 terms: fp32 error ~1e-6 relative, then one rounding to the output dtype
    torch.testing.assert_close(gx.double().cpu(), rgx, atol=atol * 4, rtol=rtol)


def test_gather_strided_x_and_unpicked_rows_are_zero():
    """``x`` as the transposed patch-embed output ``[B, D, N] -> [B, N, D]`` (no copy needed)."""
    gen = torch.Generator().manual_seed(3)
    B, N, D, T = 2, 13, 24, 9
    x = torch.randn(B, D, N, generator=gen).to(DEVICE).transpose(1, 2).requires_grad_()
    index = torch.randperm(B * N, generator=gen)[:T].to(torch.int32).to(DEVICE)
    out = gather_tokens(x, index, backend="triton")
    assert torch.equal(out, x.detach().reshape(-1, D)[index.long()])
    (gx,) = torch.autograd.grad(out, x, torch.ones(T, D, device=DEVICE))
    picked = torch.zeros(B * N, dtype=torch.bool, device=DEVICE)
    picked[index.long()] = True
    flat = gx.reshape(-1, D)
    assert (flat[picked] == 1).all() and (flat[~picked] == 0).all()


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dim", [24, 130])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
                                             (torch.float32, torch.bfloat16)])
def test_unique_backward_writes_without_atomics(monkeypatch, layout, dim, dtype, out_dtype):
    """``unique=True`` (a context mask: each patch row at most once): the gradient of ``x`` is each
    picked row's gradient or 0, written in x's dtype by one pass with no atomic scatter-add; the same
    bits as the atomic path (a single addend per row), the pos gradient a fixed-order batch sum."""
    gen = torch.Generator().manual_seed(dim + 3)
    B, N, T = 3, 17, 29
    if layout == "contiguous":
        x = torch.randn(B, N, dim, generator=gen)
    else:  # the patch-embed output [B, D, N] seen as [B, N, D]
        x = torch.randn(B, dim, N, generator=gen).transpose(1, 2)
    x = x.to(dtype).to(DEVICE).requires_grad_()
    pos = torch.randn(N, dim, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    index = torch.randperm(B * N, generator=gen)[:T].to(torch.int32).to(DEVICE)
    grad = torch.randn(T, dim, generator=gen).to(out_dtype or dtype).to(DEVICE)
    atomic_calls = []
    real = gather_mod._scatter_add
    monkeypatch.setattr(gather_mod, "_scatter_add", lambda *a: atomic_calls.append(1) or real(*a))

    out = gather_tokens(x, index, pos, out_dtype=out_dtype, backend="triton", unique=True)
    gx, gpos = torch.autograd.grad(out, (x, pos), grad)
    assert not atomic_calls, "the unique backward went through the atomic scatter-add"
    ref, rgx, rgpos = gather64(x, index.cpu(), pos, grad.cpu())
    assert gx.dtype == dtype and gx.shape == x.shape and gpos.dtype == dtype
    assert torch.equal(gx.double().cpu(), rgx.to(dtype).double())  # a copy (or one rounding to x's dtype)
    close(gpos, rgpos.to(DEVICE), dtype, "grad pos")
    again = torch.autograd.grad(gather_tokens(x, index, pos, out_dtype=out_dtype, backend="triton", unique=True),
                                (x, pos), grad)
    assert torch.equal(again[0], gx) and torch.equal(again[1], gpos)  # deterministic
    atomic = torch.autograd.grad(gather_tokens(x, index, pos, out_dtype=out_dtype, backend="triton"), (x, pos), grad)
    assert atomic_calls and torch.equal(atomic[0], gx)


def test_unique_promise_is_checked_on_cpu():
    x = torch.randn(2, 5, 8, device=DEVICE)
    index = torch.tensor([3, 7, 3], dtype=torch.int32, device=DEVICE)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="repeated indices"):
            gather_tokens(x, index, backend="triton", unique=True)
    gather_tokens(x, index, backend="triton")  # repeats are fine without the promise


def test_auto_takes_the_reference(monkeypatch):
    """``auto`` stays on index_select until a GPU measurement shows the kernel ahead (it lost every H100
    case so far); ``triton`` still runs the kernel."""
    seen = []
    real = gather_mod.use_triton
    monkeypatch.setattr(gather_mod, "use_triton", lambda *a, **k: seen.append(k) or real(*a, **k))
    x = torch.randn(2, 5, 8, device=DEVICE)
    index = torch.tensor([9, 0, 3], dtype=torch.int32, device=DEVICE)
    torch.testing.assert_close(gather_tokens(x, index), gather_mod.gather_tokens_reference(x, index), atol=0, rtol=0)
    assert seen and all(k.get("auto_takes_kernel") is False for k in seen)
    import fastjepa_kernels._backend as backend_mod

    monkeypatch.setattr(backend_mod, "TRITON_AVAILABLE", True)
    cuda_like = type("CudaLike", (), {"is_cuda": True, "dtype": torch.bfloat16})()
    assert not backend_mod.use_triton("gather", "auto", (cuda_like,), auto_takes_kernel=False)
    assert backend_mod.use_triton("gather", "auto", (cuda_like,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_scatter_forward_and_gradient(dtype, index_dtype):
    gen = torch.Generator().manual_seed(4)
    T, D, R = 37, 130, 17
    tokens = torch.randn(T, D, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    index = random_index(R, T, index_dtype, gen)  # repeats accumulate
    out = scatter_tokens(tokens, index, R, backend="triton")
    ref = torch.zeros(R, D, dtype=torch.float64).index_put_((index.long().cpu(),), tokens.detach().double().cpu(),
                                                             accumulate=True)
    assert out.shape == (R, D) and out.dtype == dtype
    close(out, ref.to(DEVICE), dtype, "scatter out")
    up = torch.randn(R, D, generator=gen).to(dtype).to(DEVICE)
    (gt,) = torch.autograd.grad(out, tokens, up)
    assert gt.dtype == dtype and torch.equal(gt, up[index.long()])


def test_scatter_inverts_gather():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 7, 96, generator=gen).to(DEVICE)
    index = torch.randperm(28, generator=gen)[:13].to(torch.int32).to(DEVICE)
    back = scatter_tokens(gather_tokens(x, index, backend="triton"), index, 28, backend="triton")
    expect = torch.zeros(28, 96, device=DEVICE)
    expect[index.long()] = x.reshape(28, 96)[index.long()]
    assert torch.equal(back, expect)


def test_backends_and_input_checks():
    x = torch.randn(2, 5, 8, device=DEVICE)
    index = torch.tensor([9, 0, 3], dtype=torch.int32, device=DEVICE)
    auto = gather_tokens(x, index, torch.randn(5, 8, device=DEVICE))  # auto: the reference (for now)
    assert auto.shape == (3, 8)
    with pytest.raises(ValueError):
        gather_tokens(x, index, backend="nope")
    with pytest.raises(ValueError):
        gather_tokens(x.reshape(10, 8), index, torch.randn(5, 8, device=DEVICE), backend="triton")
    with pytest.raises(TypeError):  # pos in another dtype than x
        gather_tokens(x, index, torch.randn(5, 8, device=DEVICE).double(), backend="triton")
    with pytest.raises(ValueError):
        gather_tokens(x, index.float(), backend="triton")
    with pytest.raises(ValueError):
        scatter_tokens(x, index, 10, backend="triton")
    empty = gather_tokens(x, index[:0], backend="triton")
    assert empty.shape == (0, 8)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) impl and autograd registration agree with the real kernels."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 24, generator=gen).to(DEVICE).requires_grad_()
    pos = torch.randn(5, 24, generator=gen).to(DEVICE).requires_grad_()
    index = torch.tensor([9, 0, 3, 3], dtype=torch.int32, device=DEVICE)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(gather_mod._gather_op, (x, index, pos, torch.float32), test_utils=tests)
    unique = torch.tensor([9, 0, 3, 4], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(gather_mod._gather_op, (x, unique, pos, torch.float32, True), test_utils=tests)
    torch.library.opcheck(gather_mod._gather_bwd_unique_op, (torch.randn(4, 24, device=DEVICE), unique, 10,
                                                             torch.bfloat16), test_utils=tests[:2])
    torch.library.opcheck(gather_mod._scatter_op, (x.reshape(10, 24), index.repeat(3)[:10], 12), test_utils=tests)


def test_torch_compile_fullgraph():
    """No graph break: the fake impls give dynamo shapes and dtypes (aot_eager on CPU: no C++ build)."""
    def step(x, pos, index):
        tokens = gather_tokens(x, index, pos, out_dtype=torch.float32, backend="triton")
        unique = gather_tokens(x, index[:3], pos, backend="triton", unique=True)  # index[:3] has no repeat
        return scatter_tokens(tokens * 2.0, index, x.shape[0] * x.shape[1], backend="triton").sum() + unique.sum()

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 24, generator=gen).to(DEVICE).requires_grad_()
    pos = torch.randn(5, 24, generator=gen).to(DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    # a new token count every step (packed masks): after dynamo's one automatic-dynamic recompile on the
    # second count, further counts must not compile again
    for i, count in enumerate((5, 7, 9, 4)):
        idx = torch.tensor([9, 0, 3, 3, 7, 1, 8, 2, 6][:count], dtype=torch.int32, device=DEVICE)
        with torch._dynamo.config.patch(error_on_recompile=i >= 2):
            loss = compiled(x, pos, idx)
        (gx,) = torch.autograd.grad(loss, x)
        eager = step(x, pos, idx)
        (ex,) = torch.autograd.grad(eager, x)
        torch.testing.assert_close(loss, eager)
        torch.testing.assert_close(gx, ex)
    torch._dynamo.reset()


@pytest.mark.skipif(DEVICE == "cuda", reason="the range check runs on CPU tensors only (no host sync on CUDA)")
def test_out_of_range_rows_are_refused_before_any_write():
    x = torch.randn(2, 5, 8)
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        gather_tokens(x, torch.tensor([0, 10], dtype=torch.int32), backend="triton")
    with pytest.raises(IndexError, match=r"\[0, 6\)"):
        scatter_tokens(torch.randn(2, 8), torch.tensor([5, 9], dtype=torch.int32), 6, backend="triton")
