"""EMA of the target encoder: the fused Triton op against the official loop, foreach lerp and a flat lerp.

Shapes: the parameter list of I-JEPA's ViT-H/14 target encoder on CUDA (patch embed 1280x3x14x14, fixed
pos embed 256x1280, 32 blocks of width 1280 / MLP 5120 with qkv bias, final LayerNorm: 630.8 M params);
a two-block width-32 list on CPU, where only the PyTorch paths run (the Triton path would run in the
interpreter, which says nothing about speed).

Bytes: 12 B/param with an fp32 source (fp32 target read + write, fp32 source read), 10 B/param with a
bf16 source; +2 B/param with a bf16 copy_out. Peak: a measured ``dst.copy_(src)`` (2 x size bytes).
Each round runs ``ITERS`` updates back to back, then synchronizes, so launches overlap the host work.
"""
from __future__ import annotations

import time

import pytest
import torch

from fastjepa_kernels.ema import ema_, ema_reference_

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
ITERS = 10 if CUDA else 3
MOMENTUM = 0.996  # I-JEPA's starting momentum


def vit_param_shapes(width=1280, depth=32, mlp=5120, patch=14, in_chans=3, num_patches=256):
    """Parameter shapes of an I-JEPA ViT encoder, in ``parameters()`` order (ViT-H/14 by default)."""
    shapes = [(width, in_chans, patch, patch), (width,), (1, num_patches, width)]
    for _ in range(depth):
        shapes += [(width,), (width,),  # norm1
                   (3 * width, width), (3 * width,), (width, width), (width,),  # attn qkv, proj
                   (width,), (width,),  # norm2
                   (mlp, width), (mlp,), (width, mlp), (width,)]  # mlp fc1, fc2
    return shapes + [(width,), (width,)]  # final norm


SHAPES = vit_param_shapes() if CUDA else vit_param_shapes(width=32, depth=2, mlp=128, patch=4, num_patches=16)
NUMEL = sum(torch.Size(s).numel() for s in SHAPES)


def official_loop(targets, sources, m):
    """facebookresearch/ijepa ``src/train.py``: the momentum update, one parameter at a time."""
    for t, s in zip(targets, sources):
        t.mul_(m).add_((1.0 - m) * s.detach())


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _seconds(fn, iters=ITERS, repeats=3) -> float:
    """Best mean seconds per call over ``repeats`` runs of ``iters`` back-to-back calls."""
    fn()
    _sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync()
        best = min(best, (time.perf_counter() - start) / iters)
    return best


@pytest.fixture(scope="module")
def copy_gbps() -> float:
    """Measured device copy bandwidth: 512 MB on CUDA (8 MB on CPU), 2 x size bytes per copy."""
    n = (128 << 20) if CUDA else (2 << 20)
    src = torch.empty(n, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _seconds(lambda: dst.copy_(src), iters=20 if CUDA else 5) / 1e9


@pytest.fixture(scope="module")
def problem():
    """Separately allocated fp32 target and source parameters (as a module's are)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    targets = [torch.randn(s, device=DEVICE, generator=g) for s in SHAPES]
    sources = [torch.randn(s, device=DEVICE, generator=g) for s in SHAPES]
    return targets, sources


_OFFICIAL_SECONDS: dict = {}


def _official_seconds(problem, source_dtype, cache=_OFFICIAL_SECONDS) -> float:
    if source_dtype not in cache:
        targets, sources = problem
        srcs = [s.to(source_dtype) for s in sources]
        cache[source_dtype] = _seconds(lambda: official_loop(targets, srcs, MOMENTUM))
    return cache[source_dtype]


METHODS = ["triton", "triton_copy_out", "official_loop", "foreach_lerp", "flat_lerp"]


@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16], ids=["src_fp32", "src_bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_ema_bandwidth(benchmark, bench_tools, copy_gbps, problem, method, source_dtype):
    if method == "flat_lerp" and source_dtype != torch.float32:
        pytest.skip("lerp needs one dtype: the flat baseline is fp32 only")
    if method.startswith("triton") and not CUDA:
        pytest.skip("the Triton path is timed on CUDA only (the CPU interpreter is not a speed)")
    targets, sources32 = problem
    sources = [s.to(source_dtype) for s in sources32]
    copies = None
    momentum_t = torch.full((), MOMENTUM, dtype=torch.float64, device=DEVICE)  # as the trainer passes it
    if method == "triton":
        fn = lambda: ema_(targets, sources, momentum_t, backend="triton")  # noqa: E731
    elif method == "triton_copy_out":
        copies = [torch.empty_like(t, dtype=torch.bfloat16) for t in targets]
        fn = lambda: ema_(targets, sources, momentum_t, backend="triton", copy_out=copies)  # noqa: E731
    elif method == "official_loop":
        fn = lambda: official_loop(targets, sources, MOMENTUM)  # noqa: E731
    elif method == "foreach_lerp":
        fn = lambda: ema_reference_(targets, sources, 1.0 - MOMENTUM)  # noqa: E731
    else:  # one flat buffer: the best a single PyTorch kernel can do
        flat_t = torch.cat([t.reshape(-1) for t in targets])
        flat_s = torch.cat([s.reshape(-1) for s in sources]).float()  # lerp wants one dtype
        fn = lambda: flat_t.lerp_(flat_s, 1.0 - MOMENTUM)  # noqa: E731

    def rounds():
        for _ in range(ITERS):
            fn()
        bench_tools.synchronize(DEVICE)

    rounds()  # warm-up: compiles the kernel, builds and caches the pointer table
    benchmark.pedantic(rounds, rounds=5 if CUDA else 3, iterations=1)
    seconds = benchmark.stats.stats.mean / ITERS
    src_bytes = 4 if method == "flat_lerp" else torch.empty((), dtype=source_dtype).element_size()
    bytes_per_param = 8 + src_bytes + (2 if copies is not None else 0)
    gbps = bytes_per_param * NUMEL / seconds / 1e9
    benchmark.extra_info.update(bench_tools.describe(DEVICE))
    benchmark.extra_info.update({
        "triton": __import__("triton").__version__ if CUDA else None,
        "mode": "fwd (in-place update)", "method": method, "source_dtype": str(source_dtype),
        "params": NUMEL, "tensors": len(SHAPES), "bytes_per_param": bytes_per_param,
        "ms_per_update": seconds * 1e3, "GB/s": gbps, "copy_GB/s": copy_gbps,
        "fraction_of_copy_bandwidth": gbps / copy_gbps,
        "speedup_vs_official_loop": _official_seconds(problem, source_dtype) / seconds,
    })
    if copies is not None:
        assert all(torch.equal(c, t.bfloat16()) for c, t in zip(copies[:3], targets[:3]))
