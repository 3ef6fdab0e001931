"""The ViT-H/14 step under DeepSpeed ZeRO-2 and ZeRO-3 on one GPU, beside the plain step.

- ``test_zero_step[plain|zero2|zero3]``: configs/vith14.json, batch ``FASTJEPA_BENCH_ZERO_BATCH``
  (default 128), one process: world size 1 through the environment (RANK 0, WORLD_SIZE 1, LOCAL_RANK 0,
  MASTER_ADDR 127.0.0.1, a free MASTER_PORT) and ``deepspeed.enabled=on``, ``deepspeed.zero_stage=2|3``,
  ``deepspeed.bf16=on`` (DeepSpeed's bf16 mode: bf16 weights and gradients, fp32 masters in the
  optimizer); ``plain`` is the trainer without DeepSpeed (bf16 autocast, fp32 weights). Reports images/s,
  ``torch.cuda.max_memory_allocated`` over the timed steps and the memory allocated before the trainer was
  built (what earlier cases left behind: DeepSpeed keeps some state per process).
- Without CUDA, with ``DS_ACCELERATOR=cpu`` (the device check's dry run): the same cases on a tiny model
  on CPU (fp32, DeepSpeed's bf16 mode off), so the wiring runs; otherwise skipped.

Skipped without DeepSpeed (``scripts/fetch_device_wheels.sh`` brings its wheels to the GPU machine).
"""
from __future__ import annotations

import gc
import os
import socket

import pytest
import torch

pytest.importorskip("pydantic", reason="the trainer's config needs pydantic (scripts/fetch_device_wheels.sh)")

BATCH = int(os.environ.get("FASTJEPA_BENCH_ZERO_BATCH", 128))
CASES = {"plain": [], "zero2": ["deepspeed.enabled=on", "deepspeed.zero_stage=2"],
         "zero3": ["deepspeed.enabled=on", "deepspeed.zero_stage=3"]}
TINY_CPU = ["model.arch=tiny", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.pred_depth=1",
            "model.pred_embed_dim=16", "model.pred_num_heads=2", "model.img_size=16", "model.patch_size=4",
            "mask.min_keep=1", "train.precision=fp32", "train.device=cpu", "train.batch_size=8",
            "data.synthetic_size=64", "deepspeed.bf16=off"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setting():
    """(config, overrides, device type) for this machine, or skip."""
    if torch.cuda.is_available():
        return "vith14.json", ["train.device=cuda", "train.precision=bf16", f"train.batch_size={BATCH}",
                               f"data.synthetic_size={BATCH * 6}"], "cuda"
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return "vith14.json", TINY_CPU, "cpu"
    pytest.skip("no CUDA device (set DS_ACCELERATOR=cpu for the tiny CPU run of the same cases)")


@pytest.mark.parametrize("case", list(CASES))
def test_zero_step(benchmark, bench_tools, tmp_path, monkeypatch, case):
    if case != "plain":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (scripts/fetch_device_wheels.sh)")
    config, overrides, device_type = _setting()
    benchmark.group = "zero-one-gpu"
    if case != "plain":
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())}.items():
            monkeypatch.setenv(key, value)
        if device_type == "cuda":
            overrides = overrides + ["deepspeed.bf16=on"]
    gc.collect()
    if device_type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 1e9 if device_type == "cuda" else None
    trainer = bench_tools.build_trainer(bench_tools.CONFIGS / config, tmp_path,
                                        overrides + ["data.dataset=synthetic"] + CASES[case])
    device = trainer.device
    batches = [trainer.batches[(0, s)] for s in range(3)]
    batch_size = len(batches[0].masks.ctx_lens)
    calls = iter(range(10**9))

    def step():
        out = trainer.train_step([batches[next(calls) % len(batches)]])
        bench_tools.synchronize(device)
        return out

    out = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)  # a ViT-H build per case: few rounds
    assert torch.isfinite(out["loss"]).item()
    info = bench_tools.describe(device)
    engine = getattr(trainer.backend, "engine", None)  # the DeepSpeed backend's engine
    info.update(case=case, config=config, batch_size=batch_size, precision=trainer.cfg.train.precision,
                deepspeed=engine is not None, zero_stage=trainer.cfg.deepspeed.zero_stage if engine is not None
                else None, deepspeed_bf16=bool(engine is not None and engine.bfloat16_enabled()),
                images_per_s=batch_size / benchmark.stats.stats.median, step_s=benchmark.stats.stats.median,
                peak_allocated_gb=torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
                allocated_before_gb=before)
    if engine is not None:
        import deepspeed

        info["deepspeed_version"] = deepspeed.__version__
    benchmark.extra_info.update(info)
    print(f"\n{case}: {info['images_per_s']:.1f} images/s, peak {info['peak_allocated_gb']} GB")
