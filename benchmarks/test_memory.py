"""Peak memory per GPU of the ViT-H/14 training step (configs/vith14.json), with and without activation
checkpointing, measured on CUDA and estimated analytically (``fastjepa.memory``) everywhere.

- ``test_step_memory[off|non_reentrant]`` (CUDA): one GPU, batch ``FASTJEPA_BENCH_MEM_BATCH`` (default
  128, the recipe's per-GPU batch), bf16 autocast; reports ``torch.cuda.max_memory_allocated`` and
  ``max_memory_reserved`` over two steps, images/s, and the estimate beside it. One process holds the
  full model states (stage 0: fp32 weights, gradients, Adam moments, fp32 target).
- ``test_memory_estimate`` (any device): the analytic table for ZeRO stages 0-3 at 1 and 8 ranks, with
  and without checkpointing, batch 128 per GPU. Target (issue 4): <= 60 GB on one 80 GB GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pydantic", reason="the trainer's config needs pydantic (scripts/fetch_device_wheels.sh)")

from fastjepa.config import load_config  # noqa: E402
from fastjepa.masks import MaskSampler  # noqa: E402
from fastjepa.memory import GB, step_memory  # noqa: E402
from fastjepa.models import build_models  # noqa: E402

BATCH = int(os.environ.get("FASTJEPA_BENCH_MEM_BATCH", 128))
TARGET_GB = 60.0


def _estimates(cfg, model, batch, checkpointing, stages=(0, 1, 2, 3), ranks=(1, 8)):
    sampler = MaskSampler(cfg.mask, model.encoder.grid)
    masks = [sampler(batch, seed=cfg.train.seed, step=s) for s in range(4)]
    return {f"stage{st}_ranks{n}": round(step_memory(model, masks, batch, st, n, checkpointing)["total"] / GB, 2)
            for st in stages for n in ranks}


def test_memory_estimate(benchmark, bench_tools):
    benchmark.group = "memory"
    cfg = load_config(bench_tools.CONFIGS / "vith14.json", ["model.attention_backend=sdpa"])
    with torch.device("meta"):  # shapes only: no 2.5 GB of weights to allocate
        model, _ = build_models(cfg)
    table = benchmark.pedantic(lambda: {ck: _estimates(cfg, model, 128, ck) for ck in (False, True)},
                               rounds=1, iterations=1)
    benchmark.extra_info.update(
        config="vith14.json", batch_per_gpu=128, target_gb=TARGET_GB, unit="GB (1e9 bytes)",
        estimate_gb=table[False],
        estimate_checkpointed_gb=table[True])
    assert table[True]["stage0_ranks1"] < table[False]["stage0_ranks1"]


@pytest.mark.parametrize("checkpointing", ["off", "non_reentrant"])
def test_step_memory(benchmark, bench_tools, tmp_path, checkpointing):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: measured peak memory needs a GPU (the estimate runs everywhere)")
    benchmark.group = "memory"
    trainer = bench_tools.build_trainer(bench_tools.CONFIGS / "vith14.json", tmp_path, [
        "train.device=cuda", "train.precision=bf16", "data.dataset=synthetic", "data.synthetic_size=1024",
        f"train.batch_size={BATCH}", f"model.activation_checkpointing={checkpointing}"])
    device = trainer.device
    batches = [trainer.batches[(0, s)] for s in range(2)]
    calls = iter(range(10**9))

    def step():
        out = trainer.train_step([batches[next(calls) % 2]])
        torch.cuda.synchronize(device)
        return out

    step()  # first step: Adam state, autotuning, allocator warm-up
    torch.cuda.reset_peak_memory_stats(device)
    out = benchmark.pedantic(step, rounds=3, iterations=1)
    assert torch.isfinite(out["loss"]).item()
    peak = torch.cuda.max_memory_allocated(device) / GB
    estimate = step_memory(trainer.model, [b.masks for b in batches], BATCH, 0, 1,
                           checkpointing != "off")
    benchmark.extra_info.update(
        bench_tools.describe(device), config="vith14.json", batch_per_gpu=BATCH, checkpointing=checkpointing,
        peak_allocated_gb=peak, peak_reserved_gb=torch.cuda.max_memory_reserved(device) / GB,
        estimate_gb={k: v / GB for k, v in estimate.items()}, target_gb=TARGET_GB,
        images_per_s=BATCH / benchmark.stats.stats.mean, unit="GB (1e9 bytes)")
