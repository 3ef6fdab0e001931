"""One ViT-H/14 transformer block, forward + backward, at the context encoder's packed shape.

Shape: 128 images x ~110 context tokens (lengths uniform in 90..130, seed 0: 14 k packed rows),
width 1280, 16 heads (head dim 80), MLP 5120; bf16 autocast with fp32 parameters, as the trainer runs.
Every provider uses the same Triton varlen attention; only the code around it differs:

- ``reference``: the plain module chain (``x + attn(norm1(x))``, ``x + mlp(norm2(x))``), eager; the
  stream in bf16 (what the patch embedding hands it under autocast).
- ``reference_compiled``: that block through ``torch.compile(dynamic=True)``, as ``train.compile``
  compiles each block (``compile_blocks`` in src/fastjepa/trainer.py).
- ``fused``: the fused path (``fused_add_layer_norm`` at both norms, ``bias_gelu``), the block called
  the way ``run_blocks`` carries it: ``(hidden bf16, residual fp32) -> (hidden, residual)``.
- ``fused_bf16``: the same with ``model.residual_dtype=bf16`` (the residual in bf16).
- ``fused_compiled``: the fused block through ``torch.compile`` (``train.compile`` with the fused path).

Reports ms per forward+backward and ``speedup_vs_reference`` (the eager reference's time over this
provider's, both measured in the same session). GPU only: on CPU it skips (the interpreter is no speed).
These figures decide ``fastjepa.models.vit.FUSED_BLOCKS_UNDER_AUTO``.

Run: ``pytest benchmarks/test_block.py --benchmark-only``.
"""
from __future__ import annotations

import pytest
import torch

import fastjepa.models.vit as vit

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = ("reference", "reference_compiled", "fused", "fused_bf16", "fused_compiled")
WIDTH, HEADS, RATIO = 1280, 16, 4.0
_SECONDS: dict = {}


def context_lengths() -> list[int]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(90, 131, (128,), generator=g).tolist()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_vith_block_fwd_bwd(benchmark, bench_tools, monkeypatch, provider):
    if DEVICE.type != "cuda":
        pytest.skip("GPU only: the block benchmark times compiled kernels (on CPU they run interpreted)")
    fused = provider.startswith("fused")
    # the reference providers run the plain chain with the same (auto -> Triton) attention
    monkeypatch.setattr(vit, "FUSED_BLOCKS_UNDER_AUTO", fused)
    torch.manual_seed(0)
    block = vit.Block(WIDTH, HEADS, RATIO, "auto", "bf16" if provider == "fused_bf16" else "fp32").to(DEVICE)
    run = torch.compile(block, dynamic=True) if provider.endswith("compiled") else block
    lengths = context_lengths()
    tokens = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    max_len = max(lengths)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    hidden = torch.randn(tokens, WIDTH, device=DEVICE, generator=g).bfloat16().requires_grad_()
    stream = torch.float32 if provider in ("fused", "fused_compiled") else torch.bfloat16
    residual = torch.randn(tokens, WIDTH, device=DEVICE, generator=g).to(stream).requires_grad_()
    d_hidden = torch.randn(tokens, WIDTH, device=DEVICE, generator=g).bfloat16()
    d_residual = torch.randn(tokens, WIDTH, device=DEVICE, generator=g).to(stream)
    params = list(block.parameters())

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if fused:
                outs = run(hidden, cu, max_len, residual, True)
                ups = (d_hidden, d_residual)
            else:
                outs, ups = (run(residual, cu, max_len),), (d_residual,)
        torch.autograd.grad(outs, [hidden, residual] + params if fused else [residual] + params, ups)

    for _ in range(3):  # warm-up: compiles and autotunes
        step()
    seconds = bench_tools.per_call_seconds(benchmark, step, DEVICE)
    _SECONDS[provider] = seconds
    info = dict(op="vit_block", provider=provider, mode="full", shape=dict(tokens=tokens, width=WIDTH, heads=HEADS,
                mlp=int(WIDTH * RATIO), sequences=len(lengths)), stream_dtype=str(stream), ms=seconds * 1e3)
    if provider != "reference":
        if "reference" not in _SECONDS:  # this provider alone was selected: time the eager chain too
            monkeypatch.setattr(vit, "FUSED_BLOCKS_UNDER_AUTO", False)
            x = residual.detach().bfloat16().requires_grad_()

            def reference():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = block(x, cu, max_len)
                torch.autograd.grad(out, [x] + params, d_residual.bfloat16())

            _SECONDS["reference"] = bench_tools.time_call(lambda: [reference() for _ in range(10)], DEVICE) / 10
        info["speedup_vs_reference"] = _SECONDS["reference"] / seconds
    benchmark.extra_info.update(bench_tools.describe(DEVICE))
    benchmark.extra_info.update(info)
