"""Varlen attention at the ViT-H/14 I-JEPA shapes: the fused Triton kernel against its peers.

Shapes (bf16 on CUDA; lengths drawn once with a fixed seed):
- ``context``: context encoder, d = 80, 16 heads, 128 images x ~110 tokens (uniform 90..130, varlen)
- ``target``: target encoder, d = 80, 16 heads, 128 images x 256 tokens (equal lengths)
- ``predictor``: predictor, d = 24, 16 heads, 4 x 128 sequences of ~154 tokens (uniform 134..174)
- ``cpu-small`` (CPU only): d = 24, 2 heads, 4 sequences of 9..40 tokens, fp32, the SDPA reference only.

Providers: ``triton`` (``varlen_attention_qkvpacked(backend="triton")``), ``reference``
(``varlen_attention(backend="sdpa")``: gather to a padded batch, SDPA with a key mask, gather back),
``sdpa_<flash|efficient|cudnn|math>`` (SDPA alone on an already padded ``[B, H, L, d]`` batch with a
key-padding mask where lengths differ, one backend forced with ``sdpa_kernel``; the pad/unpad gathers
are not timed), ``varlen_attn`` (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10),
``flex`` (compiled FlexAttention on ``[1, H, T, d]`` with a document mask, block mask built once,
outside the timing), ``flash_attn`` (``flash_attn_varlen_qkvpacked_func``) and ``xformers``
(``memory_efficient_attention`` with ``BlockDiagonalMask``) when installed. A provider that cannot run
a shape (no kernel for a mask or head dim, package absent) is skipped with a one-line reason.

FLOP convention (real tokens only, so padding shows up as lost throughput, not as work): forward
``4 * sum(len_i^2) * H * d`` (``Q K^T`` and ``P V``, 2 FLOPs per multiply-add); backward 2.5x the
forward (``dV``, ``dP``, ``dQ``, ``dK`` plus recomputing ``S``: 5 products against 2), so ``full``
(forward + backward) counts 3.5x the forward. The fraction of peak divides by a measured bf16 GEMM rate
(``measured_gemm_tflops(device, bf16, n=8192)``; fp32 n=512 on CPU).

``test_attention_config_candidates`` (CUDA) times each kernel in each configuration of
``attention.CANDIDATES`` at the context and predictor shapes (the forward alone for ``fwd``; forward +
backward with the one backward kernel swapped for ``dq`` / ``dkdv``), so a device check can tell which
entry ``attention.CONFIG_TABLE`` should hold; every ``triton`` row records the configuration it ran.

Run: ``pytest benchmarks/test_kernels_attention.py --benchmark-only`` (CPU: a few seconds).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import fastjepa_kernels.attention as attn
from fastjepa_kernels.attention import varlen_attention, varlen_attention_qkvpacked

CUDA = torch.cuda.is_available()
SHAPES = ("context", "target", "predictor", "cpu-small")
PROVIDERS = ("triton", "reference", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "varlen_attn",
             "flex", "flash_attn", "xformers")
MODES = ("fwd", "full")
BACKWARD_FACTOR = 2.5


def shape_lengths(shape: str) -> tuple[list[int], int, int]:
    """(lengths, heads, head dim) of a named shape."""
    g = torch.Generator().manual_seed(0)
    if shape == "context":
        return torch.randint(90, 131, (128,), generator=g).tolist(), 16, 80
    if shape == "target":
        return [256] * 128, 16, 80
    if shape == "predictor":
        return torch.randint(134, 175, (4 * 128,), generator=g).tolist(), 16, 24
    return [23, 40, 31, 9], 2, 24


def forward_flops(lengths, heads, dim) -> float:
    return 4.0 * sum(n * n for n in lengths) * heads * dim


_PEAKS: dict = {}


def gemm_peak(tools, device: torch.device) -> tuple[float, str]:
    """Measured GEMM rate of ``device`` (once per session)."""
    if device.type not in _PEAKS:
        if device.type == "cuda":
            _PEAKS[device.type] = tools.measured_gemm_tflops(device, torch.bfloat16, n=8192), "measured bf16 GEMM n=8192"
        else:
            _PEAKS[device.type] = tools.measured_gemm_tflops(device, torch.float32, n=512), "measured fp32 GEMM n=512"
    return _PEAKS[device.type]


class Case:
    """Inputs of one shape on one device: packed qkv, its padded copy and the upstream gradient."""

    def __init__(self, shape: str, device: torch.device, dtype: torch.dtype):
        self.lengths, self.heads, self.dim = shape_lengths(shape)
        self.device, self.dtype = device, dtype
        g = torch.Generator().manual_seed(1)
        total = sum(self.lengths)
        self.total, self.batch, self.max_seqlen = total, len(self.lengths), max(self.lengths)
        self.qkv = torch.randn(total, 3, self.heads, self.dim, generator=g).to(device, dtype)
        self.dout = torch.randn(total, self.heads, self.dim, generator=g).to(device, dtype)
        cu = [0]
        for n in self.lengths:
            cu.append(cu[-1] + n)
        self.cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
        pad_src, valid, self.unpad = attn._padding_layout(self.cu_seqlens, self.max_seqlen, total)
        padded = self.qkv.index_select(0, pad_src).view(self.batch, self.max_seqlen, 3, self.heads, self.dim)
        self.padded = padded.permute(2, 0, 3, 1, 4).contiguous()  # [3, B, H, L, d]
        self.padded_dout = self.dout.index_select(0, pad_src).view(
            self.batch, self.max_seqlen, self.heads, self.dim).transpose(1, 2).contiguous()
        self.key_mask = None if min(self.lengths) == self.max_seqlen else valid[:, None, None, :]

    def describe(self) -> dict:
        return {"batch": self.batch, "heads": self.heads, "head_dim": self.dim, "tokens": self.total,
                "len_min_mean_max": [min(self.lengths), self.total / self.batch, self.max_seqlen],
                "dtype": str(self.dtype).split(".")[-1]}


def packed_runner(case: Case, forward, mode: str):
    """``forward(qkv) -> [T, H, d]``; fwd mode runs it without grad, full mode adds the backward."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return forward(case.qkv)
        return run
    leaf = case.qkv.detach().clone().requires_grad_()

    def run():
        out = forward(leaf)
        torch.autograd.grad(out, (leaf,), case.dout)
        return out.detach()
    return run


def sdpa_runner(case: Case, backend_name: str, mode: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend_name]
    q, k, v = (t.detach().clone().requires_grad_(mode == "full") for t in case.padded)

    def forward():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=case.key_mask)

    def unpadded(out):  # [B, H, L, d] -> packed [T, H, d], only to check the result
        return out.transpose(1, 2).reshape(-1, case.heads, case.dim).index_select(0, case.unpad)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return unpadded(forward()) if run.check else forward()
    else:
        def run():
            out = forward()
            torch.autograd.grad(out, (q, k, v), case.padded_dout)
            return unpadded(out.detach()) if run.check else out
    run.check = False
    return run


def make_runner(provider: str, case: Case, mode: str):
    """A callable running one provider on ``case`` (raises ImportError/RuntimeError where it cannot)."""
    cu, max_seqlen = case.cu_seqlens, case.max_seqlen
    if provider == "triton":
        return packed_runner(case, lambda x: varlen_attention_qkvpacked(x, cu, max_seqlen, backend="triton"), mode)
    if provider == "reference":
        return packed_runner(case, lambda x: varlen_attention(*x.unbind(1), cu, max_seqlen, backend="sdpa"), mode)
    if provider.startswith("sdpa_"):
        return sdpa_runner(case, provider[len("sdpa_"):], mode)
    if provider == "varlen_attn":
        from torch.nn.attention.varlen import varlen_attn

        # (query, key, value, cu_seq_q, cu_seq_k, max_q, max_k): the same positions in torch 2.10-2.13
        return packed_runner(case, lambda x: varlen_attn(*x.unbind(1), cu, cu, max_seqlen, max_seqlen), mode)
    if provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        document = torch.repeat_interleave(torch.arange(case.batch, device=case.device),
                                           torch.tensor(case.lengths, device=case.device))

        def same_document(b, h, q_idx, kv_idx):
            return document[q_idx] == document[kv_idx]

        block_mask = create_block_mask(same_document, None, None, case.total, case.total, device=case.device)
        flex = torch.compile(flex_attention, dynamic=False)

        def forward(x):
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in x.unbind(1))  # [1, H, T, d]
            return flex(q, k, v, block_mask=block_mask)[0].transpose(0, 1)
        return packed_runner(case, forward, mode)
    if provider == "flash_attn":
        from flash_attn import flash_attn_varlen_qkvpacked_func

        return packed_runner(case, lambda x: flash_attn_varlen_qkvpacked_func(x, cu, max_seqlen), mode)
    if provider == "xformers":
        import xformers.ops as xops
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask

        bias = BlockDiagonalMask.from_seqlens(case.lengths)

        def forward(x):
            q, k, v = (t.unsqueeze(0) for t in x.unbind(1))  # [1, T, H, d]
            return xops.memory_efficient_attention(q, k, v, attn_bias=bias)[0]
        return packed_runner(case, forward, mode)
    raise ValueError(provider)


@functools.cache
def reference_output(shape: str, device_type: str):
    case = get_case(shape, device_type)
    with torch.no_grad():
        return varlen_attention(*case.qkv.unbind(1), case.cu_seqlens, case.max_seqlen, backend="sdpa").float()


@functools.cache
def get_case(shape: str, device_type: str) -> Case:
    return Case(shape, torch.device(device_type), torch.bfloat16 if device_type == "cuda" else torch.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_varlen_attention(benchmark, bench_tools, shape, provider, mode):
    if shape == "cpu-small" and CUDA:
        pytest.skip("cpu-small is the CPU stand-in for the I-JEPA shapes")
    if shape != "cpu-small" and not CUDA:
        pytest.skip("I-JEPA shapes need CUDA")
    if not CUDA and provider != "reference":
        pytest.skip(f"{provider}: CUDA only (on CPU only the SDPA reference is timed)")
    benchmark.group = f"attention-{shape}-{mode}"
    device_type = "cuda" if CUDA else "cpu"
    case = get_case(shape, device_type)
    device = case.device
    try:
        run = make_runner(provider, case, mode)
        if hasattr(run, "check"):
            run.check = True
        out = run()  # warm-up: compiles and shows the provider can run this shape at all
        if hasattr(run, "check"):
            run.check = False
    except ImportError as err:
        pytest.skip(f"{provider} not installed ({err})")
    except Exception as err:  # a peer without a kernel for this mask / head dim / device; ours must run
        if provider in ("triton", "reference"):
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        pytest.skip(f"{provider} cannot run {shape}: {type(err).__name__}: {msg[:200]}")
    ref = reference_output(shape, device_type)
    err = float((out.float() - ref).norm() / ref.norm())
    assert err < 2e-2, f"{provider} disagrees with the SDPA reference: relative error {err:.3e}"

    mean = bench_tools.per_call_seconds(benchmark, run, device, stat="mean")
    flops = forward_flops(case.lengths, case.heads, case.dim) * (1.0 if mode == "fwd" else 1.0 + BACKWARD_FACTOR)
    peak, peak_kind = gemm_peak(bench_tools, device)
    info = bench_tools.describe(device)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if provider == "triton":
        config = attn.launch_config(case.qkv[:, 0])
        info["config"] = {name: getattr(config, name).label for name in attn.KERNELS}
    info.update(case.describe(), shape=shape, provider=provider, mode=mode, seconds=mean,
                tflops=flops / mean / 1e12, peak_tflops=peak, peak_kind=peak_kind,
                fraction_of_peak=flops / mean / 1e12 / peak, relative_error_vs_reference=err,
                flops_convention="fwd 4*sum(len^2)*H*d; bwd 2.5x fwd; full = 3.5x fwd; real tokens only")
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("candidate", [0, 1, 2])
@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
@pytest.mark.parametrize("shape", ["context", "predictor"])
def test_attention_config_candidates(benchmark, bench_tools, shape, kernel, candidate):
    """One kernel in one candidate configuration, the others as the table has them (A/B for the table)."""
    if not CUDA:
        pytest.skip("configurations are timed on CUDA only")
    case = get_case(shape, "cuda")
    config = attn.CANDIDATES[kernel][candidate]
    benchmark.group = f"attention-config-{shape}-{kernel}"
    mode = "fwd" if kernel == "fwd" else "full"
    with attn.override_configs(**{kernel: config}):
        run = packed_runner(case, lambda x: varlen_attention_qkvpacked(x, case.cu_seqlens, case.max_seqlen,
                                                                       backend="triton"), mode)
        out = run()
        err = float((out.float() - reference_output(shape, "cuda")).norm() / reference_output(shape, "cuda").norm())
        assert err < 2e-2, f"{kernel} {config}: relative error {err:.3e}"
        mean = bench_tools.per_call_seconds(benchmark, run, case.device, stat="mean")
        ran = attn.launch_config(case.qkv[:, 0])
    flops = forward_flops(case.lengths, case.heads, case.dim) * (1.0 if mode == "fwd" else 1.0 + BACKWARD_FACTOR)
    info = bench_tools.describe(case.device)
    info.update(case.describe(), shape=shape, provider="triton", mode=mode, kernel=kernel, candidate=candidate,
                config={name: getattr(ran, name).label for name in attn.KERNELS},
                table_default=getattr(attn.DEFAULT_16BIT, kernel) == config, seconds=mean,
                tflops=flops / mean / 1e12, relative_error_vs_reference=err)
    benchmark.extra_info.update(info)
