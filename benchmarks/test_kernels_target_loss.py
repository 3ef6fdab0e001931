"""jepa_target_loss: the fused Triton kernel vs the unfused PyTorch chain, forward+backward, GB/s.

Shape (official masks): ViT-H/14, batch 128, 4 target blocks of ~44 patches per image, so
``T = 128 * 4 * 44`` rows of ``pred [T, 1280]`` bf16 against ``target [128, 256, 1280]`` fp32 (the
target encoder's final LayerNorm runs in fp32 under autocast). Bytes counted: the picked target rows,
the index and ``pred`` read once, the unscaled derivative written, and the backward's read of it and
write of the gradient (4 ``pred``-sized passes; until 2026-12 this file counted 5, so the fractions in
``benchmarks/results/h100-sxm-2026-11-28-5c15091.json`` are 14/12 = 1.17x too high there).
``speedup_vs_reference`` compares with ``jepa_target_loss_reference`` (gather -> layer_norm -> loss)
timed on the same device. On CPU only the reference runs, at a small size.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")  # benchmarks/conftest.py sets the interpreter up first on CPU

from fastjepa_kernels import jepa_target_loss  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA_CASE = (128, 256, 1280, 4 * 44)  # B, N, D, target rows per image
CPU_CASE = (4, 64, 128, 4 * 11)


def make_case(B, N, D, per_image, pred_dtype, target_dtype):
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(B, N, D, generator=gen).to(target_dtype)
    index = torch.cat([torch.randint(0, N, (per_image,), generator=gen) + b * N for b in range(B)]).to(torch.int32)
    pred = torch.randn(index.shape[0], D, generator=gen).to(pred_dtype)
    return pred.to(DEVICE).requires_grad_(), target.to(DEVICE), index.to(DEVICE)


@pytest.mark.parametrize("kind", ["smooth_l1", "l2"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_target_loss_fwd_bwd(benchmark, bench_tools, backend, kind):
    on_cuda = DEVICE.type == "cuda"
    if backend == "triton" and not on_cuda:
        pytest.skip("the Triton path is benchmarked on CUDA only (never under the interpreter)")
    B, N, D, per_image = CUDA_CASE if on_cuda else CPU_CASE
    pred_dtype = torch.bfloat16 if on_cuda else torch.float32
    pred, target, index = make_case(B, N, D, per_image, pred_dtype, torch.float32)

    def run(which):
        def step():
            loss = jepa_target_loss(pred, target, index, kind, backend=which)
            torch.autograd.grad(loss, pred)
        return step

    seconds = bench_tools.per_call_seconds(benchmark, run(backend), DEVICE)
    T = index.shape[0]
    nbytes = T * D * (target.element_size() + 4 * pred.element_size()) + T * 4
    peak = bench_tools.copy_gbps(DEVICE)
    info = dict(triton=triton.__version__, op="jepa_target_loss", backend=backend, kind=kind, mode="full",
                shape=dict(pred=[T, D], target=list(target.shape)), pred_dtype=str(pred_dtype),
                target_dtype=str(target.dtype), bytes=nbytes, gbps=nbytes / seconds / 1e9, copy_gbps=peak,
                fraction_of_copy=nbytes / seconds / 1e9 / peak)
    if backend == "triton":
        # same back-to-back issue as the benchmark itself: ten calls, one synchronize
        info["speedup_vs_reference"] = bench_tools.time_call(
            lambda: [run("reference")() for _ in range(10)], DEVICE) / 10 / seconds
    benchmark.extra_info.update(bench_tools.describe(DEVICE))
    benchmark.extra_info.update(info)
