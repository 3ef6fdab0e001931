"""gather_tokens: Triton vs ``index_select`` + add, forward and forward+backward, in GB/s.

Shapes (ViT-H/14 official masks; docs/scaling.md), as fastjepa calls the op: the ViT-H/14 encoder gathers ~110 of 256 patch rows
per image from ``x [128, 256, 1280]`` bf16 plus ``pos [256, 1280]`` (a buffer: no pos gradient), each row
at most once (``unique=True``); the predictor's gather picks ~4 x 110 context rows per image from a
``[128 * 110, 384]`` table (once per target block; the mask token is added outside the gather). ``x``
comes in two layouts: ``contiguous`` (what ``patchify`` now feeds) and ``transposed`` (the conv's
``[B, D, N]`` output seen as ``[B, N, D]``, what it fed before: strided row loads). Bytes counted are
those a gather must move: forward reads the picked rows, the index and the pos rows and writes the
output; the backward reads the output gradient and writes the whole input gradient (zeros included).
The fraction is against a measured device copy (``dst.copy_(src)``). On CPU only the reference path
runs, at small sizes; the Triton path and the big shapes need CUDA.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")  # benchmarks/conftest.py sets the interpreter up first on CPU

from fastjepa_kernels import gather_tokens  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# name: (B, N, D, rows kept per image, picks per kept row, with pos)
CUDA_CASES = {"encoder_vith": (128, 256, 1280, 110, 1, True), "predictor_src": (128, 110, 384, 110, 4, False)}
CPU_CASES = {"encoder_small": (4, 64, 128, 28, 1, True), "predictor_small": (4, 28, 64, 28, 4, False)}


def make_case(B, N, D, kept, picks, with_pos, dtype, layout="contiguous"):
    gen = torch.Generator().manual_seed(0)
    if layout == "contiguous":
        x = torch.randn(B, N, D, generator=gen).to(dtype)
    else:  # the patch-embed conv's [B, D, N] output seen as [B, N, D]
        x = torch.randn(B, D, N, generator=gen).to(dtype).transpose(1, 2)
    # each image keeps `kept` sorted rows, each picked `picks` times (one pass per target block)
    keep = torch.stack([torch.randperm(N, generator=gen)[:kept].sort().values + b * N for b in range(B)])
    index = keep.repeat_interleave(picks, dim=0).reshape(-1).to(torch.int32) if picks > 1 else keep.reshape(-1).to(torch.int32)
    pos = torch.randn(N, D, generator=gen).to(dtype) if with_pos else None
    x = x.to(DEVICE) if layout == "contiguous" else x.transpose(1, 2).to(DEVICE).transpose(1, 2)
    return x, index.to(DEVICE), (pos.to(DEVICE) if pos is not None else None)


def moved_bytes(x, index, pos, mode):
    T, D = index.shape[0], x.shape[-1]
    e = x.element_size()
    fwd = T * D * e * (3 if pos is not None else 2) + T * index.element_size()
    bwd = T * D * e + x.numel() * e
    return fwd if mode == "fwd" else fwd + bwd


@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", list(CUDA_CASES) + list(CPU_CASES))
def test_gather_bandwidth(benchmark, bench_tools, case, backend, layout, mode):
    on_cuda = DEVICE.type == "cuda"
    if (case in CUDA_CASES) != on_cuda:
        pytest.skip("ViT-H shapes need CUDA" if case in CUDA_CASES else "small shapes are the CPU stand-in")
    if backend == "triton" and not on_cuda:
        pytest.skip("the Triton path is benchmarked on CUDA only (never under the interpreter)")
    B, N, D, kept, picks, with_pos = (CUDA_CASES if on_cuda else CPU_CASES)[case]
    if layout == "transposed" and not with_pos:
        pytest.skip("only the encoder reads the patch-embed output")
    dtype = torch.bfloat16 if on_cuda else torch.float32
    x, index, pos = make_case(B, N, D, kept, picks, with_pos, dtype, layout)
    unique = picks == 1  # the encoder's call: a mask picks each patch at most once
    grad = torch.randn(index.shape[0], D, device=DEVICE, dtype=dtype)
    if mode == "full":
        x.requires_grad_()

    def step():
        out = gather_tokens(x, index, pos, backend=backend, unique=unique)
        if mode == "full":
            torch.autograd.grad(out, (x,), grad)

    seconds = bench_tools.per_call_seconds(benchmark, step, DEVICE)
    nbytes = moved_bytes(x, index, pos, mode)
    peak = bench_tools.copy_gbps(DEVICE)
    benchmark.extra_info.update(bench_tools.describe(DEVICE))
    benchmark.extra_info.update(
        triton=triton.__version__, op="gather_tokens", backend=backend, mode=mode, dtype=str(dtype),
        layout=layout, x_strides=list(x.stride()), unique=unique,
        shape=dict(x=list(x.shape), T=index.shape[0], pos=pos is not None), bytes=nbytes,
        gbps=nbytes / seconds / 1e9, copy_gbps=peak, fraction_of_copy=nbytes / seconds / 1e9 / peak)
