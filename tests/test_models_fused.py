"""The fused block path (attention_backend="triton": fused add+LayerNorm, bias+GELU, carried residual)
against the reference module chain of the same weights.

On CPU the kernels run in Triton's interpreter (tests/conftest.py). The truth is the reference path
(``attention_backend="sdpa"``, the plain ``x + attn(norm1(x))`` chain) run on a float64 copy of the
model; the fused path runs in fp32 (no autocast) or under bf16 autocast with the residual stream in
fp32 or bf16, and every output and parameter gradient is compared with that truth.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

from fastjepa.config import ConfigError, MaskConfig, ModelConfig, load_config  # noqa: E402
from fastjepa.masks import MaskSampler  # noqa: E402
from fastjepa.models import Predictor, VisionTransformer, build_encoder, build_predictor  # noqa: E402
from fastjepa.models.vit import Block, fused_path, run_blocks  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMG, PATCH = 32, 4
GRID = (IMG // PATCH, IMG // PATCH)
MASKS = MaskConfig(num_targets=3, min_keep=2)
# fp32 fused path vs float64: fp32 rounding through 2 blocks (relative Frobenius error)
FP32_TOL = 1e-5
# bf16 autocast: the fused path's error vs float64 may be at most this times the reference path's
# (the same autocast run through the plain module chain), plus a floor of half a bf16 ulp. Gradient
# errors are all a few bf16 ulps (4e-3 to 2e-2 here), so per parameter they are held to twice the
# reference's worst one, and on average to twice its average.
BF16_FACTOR, BF16_FLOOR = 2.0, 2e-3


def randomize_(module, seed=5):
    """Move every parameter away from its init (zero biases, unit LN), so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3 * (p.std() if p.numel() > 1 and p.std() > 0 else 0.1))
    return module


def encoder(backend, residual_dtype="fp32", seed=0):
    torch.manual_seed(seed)
    enc = VisionTransformer(img_size=IMG, patch_size=PATCH, in_chans=3, embed_dim=48, depth=2, num_heads=3,
                            attention_backend=backend, residual_dtype=residual_dtype)
    return randomize_(enc).to(DEVICE)


def predictor(backend, residual_dtype="fp32", seed=1):
    torch.manual_seed(seed)
    pred = Predictor(GRID, embed_dim=48, pred_dim=32, depth=2, num_heads=4, attention_backend=backend,
                     residual_dtype=residual_dtype)
    return randomize_(pred, seed=9).to(DEVICE)


def batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, IMG, IMG, generator=g).to(DEVICE)
    return images, MaskSampler(MASKS, GRID)(b, seed=seed, step=seed).to(DEVICE)


def rel(a, ref) -> float:
    return float((a.detach().double() - ref.detach().double()).norm() / ref.detach().double().norm().clamp_min(1e-30))


def assert_grads_within_reference_error(grads, ref_grads, truth_grads):
    errs = {n: rel(grads[n], g) for n, g in truth_grads.items()}
    ref_errs = {n: rel(ref_grads[n], g) for n, g in truth_grads.items()}
    worst = max(ref_errs.values())
    bad = {n: f"{e:.2e}" for n, e in errs.items() if e > BF16_FACTOR * worst}
    assert not bad, f"gradients beyond {BF16_FACTOR} x the reference's worst error {worst:.2e}: {bad}"
    mean, ref_mean = sum(errs.values()) / len(errs), sum(ref_errs.values()) / len(errs)
    assert mean <= BF16_FACTOR * ref_mean, (mean, ref_mean)


def same_weights(model, backend, residual_dtype="fp32"):
    """A copy of ``model`` whose blocks run on ``backend`` (the attribute the path choice reads)."""
    other = copy.deepcopy(model)
    other.attention_backend = backend
    other.ops_backend = "reference" if backend == "sdpa" else backend
    for blk in other.blocks:
        blk.backend = blk.attn.backend = backend
        blk.residual_dtype = residual_dtype
    return other


def encoder_run(enc, images, masks, up, autocast=False):
    """Packed context-encoder output and every parameter's gradient of ``sum(out * up)``."""
    enc.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        out = enc(images.to(next(enc.parameters()).dtype), masks.ctx_index, masks.ctx_cu_seqlens,
                  masks.ctx_max_seqlen)
    (out.double() * up).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in enc.named_parameters()}


def predictor_run(pred, context, masks, up, autocast=False):
    pred.zero_grad(set_to_none=True)
    ctx = context.to(next(pred.parameters()).dtype).requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        out = pred(ctx, masks)
    (out.double() * up).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in pred.named_parameters()}
    grads["<context>"] = ctx.grad.detach().clone()
    return out.detach(), grads


def test_path_choice():
    cpu = torch.zeros(2, 8)
    assert not fused_path("sdpa", cpu) and fused_path("triton", cpu)
    assert fused_path("auto", cpu) is False  # auto on CPU: the reference module chain
    assert not fused_path("auto", cpu.double())


def test_state_dict_keys_unchanged_and_interchangeable():
    fused, ref = encoder("triton"), encoder("sdpa", seed=3)
    assert list(fused.state_dict()) == list(ref.state_dict())
    names = {k.split(".", 2)[2] for k in fused.state_dict() if k.startswith("blocks.0.")}
    assert names == {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                     "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                     "mlp.fc2.weight", "mlp.fc2.bias"}
    fused.load_state_dict(ref.state_dict(), strict=True)
    p_fused, p_ref = predictor("triton", "bf16"), predictor("sdpa")
    assert list(p_fused.state_dict()) == list(p_ref.state_dict())


def test_encoder_fp32_fused_matches_float64_reference():
    enc = encoder("triton")
    images, masks = batch(3, seed=1)
    up = torch.randn(masks.ctx_index.numel(), 48, generator=torch.Generator().manual_seed(2)).double().to(DEVICE)
    out, grads = encoder_run(enc, images, masks, up)
    truth, truth_grads = encoder_run(same_weights(enc, "sdpa").double(), images, masks, up)
    ref32, ref32_grads = encoder_run(same_weights(enc, "sdpa"), images, masks, up)
    assert out.dtype == torch.float32
    assert rel(out, truth) < FP32_TOL, rel(out, truth)
    assert rel(ref32, truth) < FP32_TOL  # the fp32 reference path is as close: the bound is not loose
    for name, g in truth_grads.items():
        assert rel(grads[name], g) < 10 * FP32_TOL, (name, rel(grads[name], g), rel(ref32_grads[name], g))


def test_residual_dtype_bf16_without_autocast_is_the_fp32_stream():
    """Outside autocast the tokens are fp32, so "bf16" (the tokens' dtype) carries the same stream."""
    enc = encoder("triton")
    images, masks = batch(2, seed=3)
    up = torch.randn(masks.ctx_index.numel(), 48, generator=torch.Generator().manual_seed(4)).double().to(DEVICE)
    a, ga = encoder_run(enc, images, masks, up)
    b, gb = encoder_run(same_weights(enc, "triton", "bf16"), images, masks, up)
    assert torch.equal(a, b)
    assert all(torch.equal(ga[n], gb[n]) for n in ga)


@pytest.mark.parametrize("residual_dtype", ["fp32", "bf16"])
def test_encoder_bf16_autocast_fused_within_the_reference_error(residual_dtype):
    enc = encoder("triton", residual_dtype)
    images, masks = batch(3, seed=5)
    up = torch.randn(masks.ctx_index.numel(), 48, generator=torch.Generator().manual_seed(6)).double().to(DEVICE)
    out, grads = encoder_run(enc, images, masks, up, autocast=True)
    ref, ref_grads = encoder_run(same_weights(enc, "sdpa"), images, masks, up, autocast=True)
    truth, truth_grads = encoder_run(same_weights(enc, "sdpa").double(), images, masks, up)
    assert out.dtype == torch.float32  # the final norm in fp32, as CUDA's autocast runs F.layer_norm
    assert rel(ref, truth) > 1e-4, "autocast should have run the reference in bf16"
    assert rel(out, truth) <= BF16_FACTOR * rel(ref, truth) + BF16_FLOOR, (rel(out, truth), rel(ref, truth))
    assert_grads_within_reference_error(grads, ref_grads, truth_grads)


@pytest.mark.parametrize("residual_dtype,autocast", [("fp32", False), ("fp32", True), ("bf16", True)])
def test_predictor_fused_matches_float64_reference(residual_dtype, autocast):
    """fp32 (both stream dtypes are fp32 there) and bf16 autocast with either stream."""
    enc, pred = encoder("sdpa"), predictor("triton", residual_dtype)
    images, masks = batch(2, seed=7)
    with torch.no_grad():
        context = enc(images, masks.ctx_index, masks.ctx_cu_seqlens, masks.ctx_max_seqlen)
    up = torch.randn(masks.tgt_index.numel(), 48, generator=torch.Generator().manual_seed(8)).double().to(DEVICE)
    truth, truth_grads = predictor_run(same_weights(pred, "sdpa").double(), context.double(), masks, up)
    out, grads = predictor_run(pred, context, masks, up, autocast=autocast)
    if not autocast:
        assert rel(out, truth) < FP32_TOL
        for name, g in truth_grads.items():
            assert rel(grads[name], g) < 10 * FP32_TOL, (name, rel(grads[name], g))
        return
    ref, ref_grads = predictor_run(same_weights(pred, "sdpa"), context, masks, up, autocast=True)
    assert rel(ref, truth) > 1e-4, "autocast should have run the reference in bf16"
    assert rel(out, truth) <= BF16_FACTOR * rel(ref, truth) + BF16_FLOOR, (rel(out, truth), rel(ref, truth))
    assert_grads_within_reference_error(grads, ref_grads, truth_grads)


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_activation_checkpointing_with_carried_residual(mode):
    """Recomputing the tuple-carrying blocks changes memory, not maths: the same bits (deterministic
    kernels, no atomics)."""
    enc = encoder("triton")
    images, masks = batch(2, seed=9)
    up = torch.randn(masks.ctx_index.numel(), 48, generator=torch.Generator().manual_seed(10)).double().to(DEVICE)
    out, grads = encoder_run(enc, images, masks, up, autocast=True)
    enc.checkpointing = mode
    out_ck, grads_ck = encoder_run(enc, images, masks, up, autocast=True)
    assert torch.equal(out, out_ck)
    for name in grads:
        assert torch.equal(grads[name], grads_ck[name]), name


def test_plain_block_call_on_the_fused_path_returns_the_stream():
    """``block(x, cu, n)`` (what feature extraction and run_blocks without carry call) gives the stream,
    the same as carrying and adding at the end."""
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(Block(32, 2, 4.0, "triton") for _ in range(2)).to(DEVICE)
    randomize_(blocks)
    x = torch.randn(21, 32, device=DEVICE)
    cu = torch.tensor([0, 9, 21], dtype=torch.int32, device=DEVICE)
    plain = run_blocks(blocks, x, cu, 12)
    hidden, residual = run_blocks(blocks, x, cu, 12, carry=True)
    ref = copy.deepcopy(blocks).double()
    for blk in ref:
        blk.backend = blk.attn.backend = "sdpa"
    chain = run_blocks(ref, x.double(), cu, 12)
    torch.testing.assert_close((hidden + residual).double(), chain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain.double(), chain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_block_compiles_without_graph_breaks(autocast):
    """``train.compile`` compiles each Block regionally: the fused path (carrying and plain) traces into
    one graph with dynamic token counts (inductor on CUDA, aot_eager on CPU: no C++ build)."""
    torch.manual_seed(1)
    blk = randomize_(Block(32, 2, 4.0, "triton")).to(DEVICE)
    compiled = torch.compile(blk, fullgraph=True, dynamic=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    cu = torch.tensor([0, 9, 21], dtype=torch.int32, device=DEVICE)
    x = torch.randn(21, 32, device=DEVICE, requires_grad=True)
    res = torch.randn(21, 32, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        got = compiled(x, cu, 12, res, True)
        want = blk(x, cu, 12, res, True)
        plain_got, plain_want = compiled(x, cu, 12), blk(x, cu, 12)
    for a, b in zip(got + (plain_got,), want + (plain_want,)):
        torch.testing.assert_close(a, b)
    g_got = torch.autograd.grad(sum(t.float().sum() for t in got), (x, res))
    g_want = torch.autograd.grad(sum(t.float().sum() for t in want), (x, res))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_residual_dtype_config_key(tmp_path, helpers):
    cfg = ModelConfig(arch="tiny", residual_dtype="bf16", attention_backend="triton")
    enc = build_encoder(cfg)
    pred = build_predictor(cfg, enc)
    assert {b.residual_dtype for b in list(enc.blocks) + list(pred.blocks)} == {"bf16"}
    assert ModelConfig().residual_dtype == "fp32"
    with pytest.raises(ConfigError, match="residual_dtype"):
        load_config(helpers.CONFIGS / "demo.json", ["model.residual_dtype=fp16"])


def test_fused_path_uses_each_parameter_inside_its_own_module_call():
    """DeepSpeed ZeRO-3 gathers a module's parameters in its forward pre-hook and frees them after:
    emulate that (every parameter empty outside its module's call) and the fused encoder and predictor
    still compute the same outputs, so no parameter is read from outside its module."""
    enc, pred = encoder("triton"), predictor("triton")
    images, masks = batch(2, seed=11)
    with torch.no_grad():
        want_ctx = enc(images, masks.ctx_index, masks.ctx_cu_seqlens, masks.ctx_max_seqlen)
        want = pred(want_ctx, masks)
    full = {}
    for model in (enc, pred):
        for module in model.modules():
            params = list(module.parameters(recurse=False))
            if not params:
                continue
            for p in params:
                full[p] = p.data
                p.data = p.data.new_empty(0)
            module.register_forward_pre_hook(lambda m, args: [setattr(p, "data", full[p])
                                                              for p in m.parameters(recurse=False)] and None)
            module.register_forward_hook(lambda m, args, out: [setattr(p, "data", p.data.new_empty(0))
                                                               for p in m.parameters(recurse=False)] and None)
    with torch.no_grad():
        ctx = enc(images, masks.ctx_index, masks.ctx_cu_seqlens, masks.ctx_max_seqlen)
        got = pred(ctx, masks)
    assert all(p.numel() == 0 for p in full)
    assert torch.equal(ctx, want_ctx) and torch.equal(got, want)
