"""Training-step throughput (images/s), achieved TFLOP/s and analytic MFU, and packed vs padded execution.

- ``test_train_step[demo-cpu]``: configs/demo.json (batch 32 instead of 128, to stay quick) on CPU.
- ``test_train_step[vith14-cuda]``: configs/vith14.json on CUDA; skipped without CUDA or the config.
- ``test_train_step[vith14-cuda-compile]``: the same with ``train.compile=true`` (compiled blocks; the
  compilation happens in the warm-up rounds, outside the timing).
- ``test_packed_vs_padded[packed|padded]``: the same masks and weights, forward + backward of the step's
  model part (target encoder, context encoder, predictor, loss). Padded = every context set and every
  predictor sequence padded to the batch maximum with a key-padding mask, as a rectangular-batch
  trainer would run it. Both are checked to give the same predictions before they are timed.

FLOPs come from ``fastjepa.flops.step_flops`` with the step's actual token counts; MFU divides by the
datasheet dense bf16 peak (``fastjepa.flops.peak_tflops``) where the device is known, and on other
devices by a measured square-GEMM rate (reported as such).

Run: ``pytest benchmarks/ --benchmark-only`` (CPU: < 2 min).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pydantic", reason="the trainer's config needs pydantic (scripts/fetch_device_wheels.sh)")

from fastjepa.flops import peak_tflops, step_flops  # noqa: E402
from fastjepa_kernels import jepa_target_loss  # noqa: E402

# the demo trains on Fashion-MNIST; where it is not installed the step is timed on synthetic images
_DEMO_DATA = ([] if os.path.isfile("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
              else ["data.dataset=synthetic"])
_VITH = ["train.device=cuda", "train.precision=bf16", "data.dataset=synthetic", "data.synthetic_size=4096",
         f"train.batch_size={os.environ.get('FASTJEPA_BENCH_VITH_BATCH', 64)}"]
CASES = {
    "demo-cpu": ("demo.json", "cpu", ["train.device=cpu", "train.batch_size=32"] + _DEMO_DATA),
    "vith14-cuda": ("vith14.json", "cuda", _VITH),
    "vith14-cuda-compile": ("vith14.json", "cuda", _VITH + ["train.compile=true"]),
}


def _skip_unless(config, device, tools):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: the ViT-H/14 step benchmark needs a GPU")


def _record(benchmark, tools, device, flops_per_step, images_per_step, extra):
    mean = benchmark.stats.stats.mean
    achieved = flops_per_step / mean / 1e12
    info = tools.describe(device)
    peak = peak_tflops(info["device"]) if device.type == "cuda" else None
    if peak is None:
        peak_kind = "measured fp32 GEMM" if device.type == "cpu" else "measured bf16 GEMM"
        peak = tools.measured_gemm_tflops(device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    else:
        peak_kind = "datasheet dense bf16"
    info.update(images_per_s=images_per_step / mean, step_s=mean, tflops=achieved,
                gflop_per_image=flops_per_step / images_per_step / 1e9, peak_tflops=peak, peak_kind=peak_kind,
                mfu=achieved / peak, **extra)
    benchmark.extra_info.update(info)
    return info


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_step(benchmark, bench_tools, tmp_path, case):
    config, device_type, overrides = CASES[case]
    _skip_unless(config, device_type, bench_tools)
    trainer = bench_tools.build_trainer(bench_tools.CONFIGS / config, tmp_path, overrides)
    device = trainer.device
    batches = [trainer.batches[(0, s)] for s in range(3)]  # decoded up front: the step alone is timed
    batch_size = len(batches[0].masks.ctx_lens)
    calls = iter(range(10**9))

    def step():
        out = trainer.train_step([batches[next(calls) % len(batches)]])
        bench_tools.synchronize(device)
        return out

    rounds = 5 if device.type == "cpu" else 10
    out = benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=3)  # every batch seen once
    assert torch.isfinite(out["loss"]).item()
    flops = float(np.mean([step_flops(trainer.model, b.masks, batch_size) for b in batches]))
    cfg = trainer.cfg
    info = _record(benchmark, bench_tools, device, flops, batch_size, {
        "config": config, "data": cfg.data.dataset, "batch_size": batch_size, "precision": cfg.train.precision,
        "img_size": cfg.model.img_size, "patch_size": cfg.model.patch_size,
        "embed_dim": trainer.model.encoder.embed_dim, "depth": len(trainer.model.encoder.blocks),
        "pred_dim": trainer.model.predictor.predictor_embed.out_features,
        "pred_depth": len(trainer.model.predictor.blocks), "compile": cfg.train.compile,
        "context_tokens_per_image": float(np.mean([np.mean(b.masks.ctx_lens) for b in batches])),
        "target_tokens_per_image": float(np.mean([sum(b.masks.tgt_lens) / batch_size for b in batches])),
    })
    assert info["images_per_s"] > 0 and info["tflops"] > 0


# ---- packed vs padded ---------------------------------------------------------------------------

def pad_layout(lengths, device):
    """For sequences of ``lengths`` packed back to back: ``gather [S, L]`` (packed row feeding each padded
    slot; padding repeats the sequence's first row), ``mask [S, 1, 1, L]`` (True = a real key) and
    ``unpad [T]`` (flat padded slot of each packed row). Host-side, like a collator would build it."""
    longest, starts = max(lengths), np.concatenate([[0], np.cumsum(lengths)[:-1]])
    cols = np.arange(longest)
    valid = cols[None, :] < np.asarray(lengths)[:, None]
    gather = np.where(valid, starts[:, None] + cols[None, :], starts[:, None])
    unpad = np.flatnonzero(valid.reshape(-1))
    as_t = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dt)  # noqa: E731
    return as_t(gather, torch.long), as_t(valid, torch.bool)[:, None, None, :], as_t(unpad, torch.long)


def padded_block(blk, x, mask):
    """``fastjepa.models.vit.Block`` on a padded ``[S, L, D]`` batch, keys masked by ``mask``."""
    s, length, dim = x.shape
    attn = blk.attn
    qkv = attn.qkv(blk.norm1(x)).view(s, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
    x = x + attn.proj(out.transpose(1, 2).reshape(s, length, dim))
    return x + blk.mlp(blk.norm2(x))


def padded_predictions(model, images, masks, ctx_layout, pred_layout):
    """IJEPA.forward with every transformer block run on padded batches (same weights, same maths)."""
    enc, pred = model.encoder, model.predictor
    x = enc.patchify(images)
    batch, n, dim = x.shape
    flat = (x + enc.pos_embed.to(x.dtype)).reshape(batch * n, dim)
    gather, mask, unpad = ctx_layout
    rows = flat.index_select(0, masks.ctx_index.long())  # packed context rows, then padded
    tokens = rows.index_select(0, gather.reshape(-1)).view(*gather.shape, dim)
    for blk in enc.blocks:
        tokens = padded_block(blk, tokens, mask)
    context = enc.norm(tokens).reshape(-1, dim).index_select(0, unpad)

    y = pred.predictor_embed(context)
    table = torch.cat([y, pred.mask_token.to(y.dtype)], dim=0)
    y = table.index_select(0, masks.pred_src.long()) + pred.pos_embed.to(y.dtype).index_select(0, masks.pred_pos.long())
    gather, mask, unpad = pred_layout
    width = y.shape[-1]
    y = y.index_select(0, gather.reshape(-1)).view(*gather.shape, width)
    for blk in pred.blocks:
        y = padded_block(blk, y, mask)
    y = y.reshape(-1, width).index_select(0, unpad).index_select(0, masks.pred_out.long())
    return pred.predictor_proj(pred.norm(y))


def _packed_vs_padded_setup(tools, tmp_path):
    if torch.cuda.is_available() and (tools.CONFIGS / "vith14.json").is_file():
        config, overrides = "vith14.json", ["train.device=cuda", "train.precision=bf16", "data.dataset=synthetic",
                                            "train.batch_size=32"]
    else:
        config, overrides = "demo.json", ["train.device=cpu", "train.batch_size=32"] + _DEMO_DATA
    trainer = tools.build_trainer(tools.CONFIGS / config, tmp_path, overrides)
    return config, trainer


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_packed_vs_padded(benchmark, bench_tools, tmp_path, mode):
    benchmark.group = "packed-vs-padded"
    config, trainer = _packed_vs_padded_setup(bench_tools, tmp_path)
    device, model, target = trainer.device, trainer.model, trainer.target
    batch = trainer.batches[(0, 0)]
    images, masks = batch.images.to(device), batch.masks.to(device)
    ctx_layout = pad_layout(masks.ctx_lens, device)
    pred_layout = pad_layout(masks.pred_lens, device)

    def predictions(which):
        if which == "packed":
            return model(images, masks)
        return padded_predictions(model, images, masks, ctx_layout, pred_layout)

    with torch.no_grad(), trainer.autocast:  # same weights, same masks -> same predictions
        ref, got = predictions("packed").float(), predictions("padded").float()
    if trainer.cfg.train.precision == "fp32":
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    else:  # bf16: different kernels round differently; compare the error relative to the whole tensor
        assert ((got - ref).norm() / ref.norm()).item() < 2e-2

    def step():
        with torch.no_grad(), trainer.autocast:
            h = target(images)
        with trainer.autocast:
            loss = jepa_target_loss(predictions(mode), h, masks.tgt_index)
        loss.backward()
        model.zero_grad(set_to_none=True)
        bench_tools.synchronize(device)
        return loss

    rounds = 5 if device.type == "cpu" else 10
    loss = benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=2)
    assert torch.isfinite(loss).item()
    b = len(masks.ctx_lens)
    real = sum(masks.ctx_lens) * len(model.encoder.blocks) + sum(masks.pred_lens) * len(model.predictor.blocks)
    padded = (b * max(masks.ctx_lens) * len(model.encoder.blocks)
              + len(masks.pred_lens) * max(masks.pred_lens) * len(model.predictor.blocks))
    _record(benchmark, bench_tools, device, step_flops(model, masks, b), b, {
        "mode": mode, "provider": mode, "config": config, "batch_size": b, "precision": trainer.cfg.train.precision,
        "what": "target fwd + context encoder + predictor fwd/bwd (no optimizer, no EMA)",
        "context_lens_min_mean_max": [min(masks.ctx_lens), float(np.mean(masks.ctx_lens)), max(masks.ctx_lens)],
        "pred_lens_min_mean_max": [min(masks.pred_lens), float(np.mean(masks.pred_lens)), max(masks.pred_lens)],
        "block_tokens_real": real, "block_tokens_padded": padded,
        "block_tokens_run": real if mode == "packed" else padded,
        "flops_basis": "real (packed) tokens: padded slots count as waste, not as work",
    })
