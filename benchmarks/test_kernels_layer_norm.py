"""fused_add_layer_norm and bias_gelu: the Triton kernels vs the unfused PyTorch chain, eager and
``torch.compile``d, forward and forward+backward, in GB/s and as a fraction of device copy bandwidth.

Shapes (ViT-H/14 at batch 128, official masks; bf16 autocast numerics):
- LayerNorm, D 1280: context encoder 128 x 110 = 14 080 rows, target encoder 128 x 256 = 32 768 rows;
  predictor D 384: 4 x 128 sequences of ~154 tokens = 78 848 rows. x (the branch output) in bf16, the
  residual stream in fp32 or bf16 (``stream``), ``normed`` in bf16 (the next matmul's input).
- bias + GELU: the MLP hidden layer, 14 080 x 5120 and 32 768 x 5120 (encoders), 78 848 x 1536
  (predictor); x bf16, bias fp32 (the module's parameter under autocast).

Providers: ``triton`` (the fused op), ``eager`` (what the unfused block does: ``x + residual``,
``F.layer_norm`` in fp32, a cast to bf16; ``x + bias`` then ``F.gelu``), ``compiled`` (that chain
through ``torch.compile``, what ``train.compile`` fuses). Bytes counted are the fused op's own
traffic (each input read once, each output written once; the backward reads the saved stream, the
statistics and the upstream gradients and writes dx, dresidual when it has its own dtype, and the
small dweight/dbias partials are left out), the same count for every provider, so GB/s compare time.
On CPU only the eager chain runs, at small sizes (the interpreter is no speed; inductor would need a
C++ toolchain); the Triton and compiled providers and the ViT-H shapes need CUDA.

Run: ``pytest benchmarks/test_kernels_layer_norm.py --benchmark-only``.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")  # benchmarks/conftest.py sets the interpreter up first on CPU

from fastjepa_kernels import bias_gelu, fused_add_layer_norm  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-6
LN_CASES = {"context_vith": (14_080, 1280), "target_vith": (32_768, 1280), "predictor": (78_848, 384)}
GELU_CASES = {"context_vith": (14_080, 5120), "target_vith": (32_768, 5120), "predictor": (78_848, 1536)}
CPU_LN_CASES = {"cpu_small": (512, 128)}
CPU_GELU_CASES = {"cpu_small": (512, 512)}
PROVIDERS = ("triton", "eager", "compiled")
MODES = ("fwd", "full")


def eager_add_layer_norm(x, residual, weight, bias):
    """The unfused block's chain: the add (promoting to the stream's dtype), LayerNorm in fp32, a cast."""
    s = x + residual
    return F.layer_norm(s.float(), (s.shape[-1],), weight, bias, EPS).to(x.dtype), s


def eager_bias_gelu(x, bias):
    """nn.Linear's biased output rounded to bf16, then nn.GELU (exact) in bf16."""
    return F.gelu(x + bias.to(x.dtype))


@functools.cache
def compiled(fn):
    return torch.compile(fn, dynamic=False)


def skip_unless_runnable(case, cuda_cases, provider):
    on_cuda = DEVICE.type == "cuda"
    if (case in cuda_cases) != on_cuda:
        pytest.skip("ViT-H shapes need CUDA" if case in cuda_cases else "small shapes are the CPU stand-in")
    if provider != "eager" and not on_cuda:
        pytest.skip(f"{provider}: CUDA only (the interpreter is no speed; inductor on CPU needs a C++ toolchain)")


def report(benchmark, tools, seconds, nbytes, **info):
    peak = tools.copy_gbps(DEVICE)
    benchmark.extra_info.update(tools.describe(DEVICE))
    benchmark.extra_info.update(triton=triton.__version__, bytes=nbytes, gbps=nbytes / seconds / 1e9,
                                copy_gbps=peak, fraction_of_copy=nbytes / seconds / 1e9 / peak, **info)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stream", ["fp32", "bf16"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(LN_CASES) + list(CPU_LN_CASES))
def test_add_layer_norm_bandwidth(benchmark, bench_tools, case, provider, stream, mode):
    skip_unless_runnable(case, LN_CASES, provider)
    if stream == "bf16" and DEVICE.type != "cuda":
        pytest.skip("CPU runs fp32: a bf16 stream is the fp32 case there")
    rows, dim = (LN_CASES if DEVICE.type == "cuda" else CPU_LN_CASES)[case]
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    stream_dtype = torch.float32 if stream == "fp32" else dtype
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(rows, dim, device=DEVICE, dtype=dtype, generator=g)
    residual = torch.randn(rows, dim, device=DEVICE, generator=g).to(stream_dtype)
    weight = torch.randn(dim, device=DEVICE, generator=g)
    bias = torch.randn(dim, device=DEVICE, generator=g)
    dnormed = torch.randn(rows, dim, device=DEVICE, dtype=dtype, generator=g)
    dnew = torch.randn(rows, dim, device=DEVICE, generator=g).to(stream_dtype)
    leaves = [t.requires_grad_(mode == "full") for t in (x, residual, weight, bias)]

    if provider == "triton":
        def op(*args):
            return fused_add_layer_norm(*args, EPS, out_dtype=dtype, backend="triton")
    else:
        op = eager_add_layer_norm if provider == "eager" else compiled(eager_add_layer_norm)

    def step():
        normed, new_res = op(*leaves)
        if mode == "full":
            torch.autograd.grad((normed, new_res), leaves, (dnormed, dnew))

    step()  # warm-up: compiles
    seconds = bench_tools.per_call_seconds(benchmark, step, DEVICE)
    e_x, e_s, n = x.element_size(), residual.element_size(), rows * dim
    fwd = n * (e_x + 2 * e_s + e_x) + 8 * rows  # x, residual in; new_residual, normed, mean/rstd out
    bwd = n * (e_x + 2 * e_s + e_x + (e_s if stream_dtype != dtype else 0)) + 8 * rows
    report(benchmark, bench_tools, seconds, fwd if mode == "fwd" else fwd + bwd, op="fused_add_layer_norm",
           provider=provider, mode=mode, dtype=str(dtype), stream_dtype=str(stream_dtype), shape=[rows, dim],
           ms=seconds * 1e3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(GELU_CASES) + list(CPU_GELU_CASES))
def test_bias_gelu_bandwidth(benchmark, bench_tools, case, provider, mode):
    skip_unless_runnable(case, GELU_CASES, provider)
    rows, width = (GELU_CASES if DEVICE.type == "cuda" else CPU_GELU_CASES)[case]
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    g = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(rows, width, device=DEVICE, dtype=dtype, generator=g).requires_grad_(mode == "full")
    bias = torch.randn(width, device=DEVICE, generator=g).requires_grad_(mode == "full")
    dy = torch.randn(rows, width, device=DEVICE, dtype=dtype, generator=g)
    if provider == "triton":
        op = functools.partial(bias_gelu, backend="triton")
    else:
        op = eager_bias_gelu if provider == "eager" else compiled(eager_bias_gelu)

    def step():
        y = op(x, bias)
        if mode == "full":
            torch.autograd.grad(y, (x, bias), dy)

    step()
    seconds = bench_tools.per_call_seconds(benchmark, step, DEVICE)
    n, e = rows * width, x.element_size()
    fwd, bwd = 2 * n * e, 3 * n * e  # x in, y out; x and dy in, dx out
    report(benchmark, bench_tools, seconds, fwd if mode == "fwd" else fwd + bwd, op="bias_gelu", provider=provider,
           mode=mode, dtype=str(dtype), shape=[rows, width], ms=seconds * 1e3)
