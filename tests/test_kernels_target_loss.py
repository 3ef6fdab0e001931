"""Triton ``jepa_target_loss`` against float64 PyTorch maths.

Runs compiled on CUDA and in Triton's interpreter on CPU (tests/conftest.py sets ``TRITON_INTERPRET=1``).
Covers odd T and D (24, 96, 130, and 300 > one 256-column chunk), int32/int64 indices with repeats,
both loss kinds and both smooth-L1 branches, large-magnitude targets (mean >> std), pred in
fp32/bf16/fp16 and targets in fp32/bf16, NaN-poisoned outputs, the gradient of ``pred`` under a
non-unit upstream gradient, determinism, the custom-op registration and ``torch.compile``.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import fastjepa_kernels.target_loss as loss_mod  # noqa: E402
from fastjepa_kernels import jepa_target_loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# grad_pred tolerance per pred dtype, relative to the largest gradient element (one rounding of
# loss'(d) / (T D) to the dtype, then one more in the upstream multiply); the loss itself is fp32.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch, helpers):
    """Every output the launcher allocates (grad_pred, partial sums) starts as NaN."""
    monkeypatch.setattr(loss_mod, "_empty", helpers.nan_empty)


def loss64(pred, target, index, kind):
    """float64 loss and d loss / d pred, independent of the module: explicit mean/var and branches."""
    D = pred.shape[-1]
    rows = target.double().reshape(-1, D)[index.long()]
    mu = rows.mean(-1, keepdim=True)
    var = ((rows - mu) ** 2).mean(-1, keepdim=True)
    d = pred.double() - (rows - mu) / torch.sqrt(var + 1e-6)
    if kind == "smooth_l1":
        elem, grad = torch.where(d.abs() < 1, 0.5 * d * d, d.abs() - 0.5), d.clamp(-1, 1)
    else:
        elem, grad = d * d, 2 * d
    return elem.mean(), grad / d.numel(), d


def run(pred, target, index, kind, upstream=0.37):
    pred = pred.detach().clone().requires_grad_()
    loss = jepa_target_loss(pred, target, index, kind, backend="triton")
    (grad,) = torch.autograd.grad(loss * upstream, pred)
    return loss, grad


def check(pred, target, index, kind, upstream=0.37, loss_rtol=2e-6):
    loss, grad = run(pred, target, index, kind, upstream)
    ref, ref_grad, d = loss64(pred.cpu(), target.cpu(), index.cpu(), kind)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.device.type == DEVICE.split(":")[0]
    assert abs(loss.item() - ref.item()) <= loss_rtol * abs(ref.item()) + 1e-7, (loss.item(), ref.item())
    assert grad.dtype == pred.dtype and not torch.isnan(grad).any()
    scale = (ref_grad * upstream).abs().max().item()
    torch.testing.assert_close(grad.double().cpu(), ref_grad * upstream, rtol=0, atol=GRAD_RTOL[pred.dtype] * scale)
    return d


@pytest.mark.parametrize("kind", ["smooth_l1", "l2"])
@pytest.mark.parametrize("dim", [24, 96, 130, 300])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_target_loss_fp32(kind, dim, index_dtype):
    gen = torch.Generator().manual_seed(dim)
    B, N, T = 2, 13, 37
    target = (torch.randn(B, N, dim, generator=gen) + 0.5) * 3.0
    pred = torch.randn(T, dim, generator=gen) * 1.5  # |d| both below and above 1
    index = torch.randint(0, B * N, (T,), generator=gen).to(index_dtype)  # repeats
    d = check(pred.to(DEVICE), target.to(DEVICE), index.to(DEVICE), kind)
    assert (d.abs() > 1).any() and (d.abs() < 1).any()


@pytest.mark.parametrize("kind", ["smooth_l1", "l2"])
@pytest.mark.parametrize("pred_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16])
def test_target_loss_low_precision(kind, pred_dtype, target_dtype):
    gen = torch.Generator().manual_seed(11)
    B, N, T, D = 3, 7, 37, 130
    target = torch.randn(B, N, D, generator=gen).to(target_dtype)
    pred = (torch.randn(T, D, generator=gen) * 1.5).to(pred_dtype)
    index = torch.randint(0, B * N, (T,), generator=gen).to(torch.int32)
    # the loss reads the stored low-precision values exactly, so fp32 maths stays fp32-accurate
    check(pred.to(DEVICE), target.to(DEVICE), index.to(DEVICE), kind, loss_rtol=1e-5)


@pytest.mark.parametrize("kind", ["smooth_l1", "l2"])
def test_target_loss_large_magnitudes(kind):
    """Targets with mean 1e3 and std 1e-2 (a single-pass sum of squares would cancel to garbage) and
    predictions far off (|d| up to ~50: smooth-L1's linear branch) or close (|d| < 1). In fp32 the mean
    alone carries ~1 ulp(1e3) = 6e-5 of error (0.6 % of the std), so the bound is the flash-attn rule:
    at most twice the error of the fp32 PyTorch chain (plus a small floor)."""
    gen = torch.Generator().manual_seed(12)
    B, N, T, D = 2, 5, 21, 300
    target = (1e3 + 1e-2 * torch.randn(B, N, D, generator=gen)).to(DEVICE)
    index = torch.randint(0, B * N, (T,), generator=gen).to(DEVICE)
    pred = torch.randn(T, D, generator=gen) * 0.3
    pred[::2] *= 150.0  # half the rows far away
    pred = pred.to(DEVICE)
    loss, grad = run(pred, target, index, kind, upstream=1.0)
    ref, ref_grad, d = loss64(pred.cpu(), target.cpu(), index.cpu(), kind)
    torch_pred = pred.clone().requires_grad_()
    torch_loss = loss_mod.jepa_target_loss_reference(torch_pred, target, index, kind)
    (torch_grad,) = torch.autograd.grad(torch_loss, torch_pred)
    assert (d.abs() > 10).any() and (d.abs() < 1).any()
    scale = ref_grad.abs().max().item()
    loss_err, torch_loss_err = abs(loss.item() - ref.item()), abs(torch_loss.item() - ref.item())
    assert loss_err <= 2 * torch_loss_err + 1e-6 * abs(ref.item()), (loss_err, torch_loss_err)
    grad_err = (grad.double().cpu() - ref_grad).abs().max().item()
    torch_grad_err = (torch_grad.double().cpu() - ref_grad).abs().max().item()
    assert grad_err <= 2 * torch_grad_err + 1e-5 * scale, (grad_err, torch_grad_err)


def test_target_loss_tiny_variance_uses_eps():
    """var ~1e-6 ~ eps: the eps term changes the normalised target, and must match."""
    gen = torch.Generator().manual_seed(13)
    target = 1e-3 * torch.randn(2, 4, 96, generator=gen)
    pred = torch.randn(9, 96, generator=gen)
    index = torch.randint(0, 8, (9,), generator=gen)
    check(pred.to(DEVICE), target.to(DEVICE), index.to(DEVICE), "l2", loss_rtol=1e-5)


def test_target_loss_deterministic_and_no_target_grad():
    gen = torch.Generator().manual_seed(14)
    target = torch.randn(2, 9, 130, generator=gen).to(DEVICE).requires_grad_()
    pred = torch.randn(37, 130, generator=gen).to(DEVICE).requires_grad_()
    index = torch.randint(0, 18, (37,), generator=gen).to(torch.int32).to(DEVICE)
    first = jepa_target_loss(pred, target, index, backend="triton")
    second = jepa_target_loss(pred, target, index, backend="triton")
    assert torch.equal(first, second)  # fixed-order partial sums
    first.backward()
    assert target.grad is None and pred.grad is not None


def test_backends_and_input_checks():
    pred, target, index = torch.randn(2, 4), torch.randn(1, 5, 4), torch.tensor([0, 1])
    reference = jepa_target_loss(pred, target, index, backend="reference")
    torch.testing.assert_close(jepa_target_loss(pred, target, index), reference)  # auto
    with pytest.raises(ValueError):
        jepa_target_loss(pred, target, index, backend="nope")
    with pytest.raises(ValueError):
        jepa_target_loss(pred, target, index, kind="l1", backend="triton")
    with pytest.raises(ValueError):
        jepa_target_loss(pred[:1], target, index, backend="triton")
    with pytest.raises(TypeError):
        jepa_target_loss(pred.double(), target, index, backend="triton")


def test_custom_op_passes_opcheck():
    gen = torch.Generator().manual_seed(15)
    pred = torch.randn(9, 40, generator=gen).to(DEVICE).requires_grad_()
    target = torch.randn(2, 5, 40, generator=gen).to(DEVICE)
    index = torch.randint(0, 10, (9,), generator=gen).to(torch.int32).to(DEVICE)
    torch.library.opcheck(loss_mod._target_loss_op, (pred, target, index, False, 1e-6),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_fullgraph():
    def step(pred, target, index):
        return 2.0 * jepa_target_loss(pred * 1.5, target, index, "smooth_l1", backend="triton")

    gen = torch.Generator().manual_seed(16)
    pred = torch.randn(9, 40, generator=gen).to(DEVICE).requires_grad_()
    target = torch.randn(2, 5, 40, generator=gen).to(DEVICE)
    index = torch.randint(0, 10, (9,), generator=gen).to(torch.int32).to(DEVICE)
    compiled = torch.compile(step, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    loss = compiled(pred, target, index)
    (grad,) = torch.autograd.grad(loss, pred)
    eager = step(pred, target, index)
    (eager_grad,) = torch.autograd.grad(eager, pred)
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grad, eager_grad)
