"""fastjepa.zero without a DeepSpeed run: engine configs, and the ZeRO-3 target shard files re-cut
across world sizes (against the whole tensors they were cut from)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from fastjepa.config import load_config
from fastjepa.train.zero import (
    consolidate_target,
    engine_config,
    load_target_shard,
    save_target_shard,
    shard_name,
    target_engine_config,
)

SHAPES = {"patch.weight": (5, 3, 2, 2), "blocks.0.qkv.bias": (9,), "blocks.0.qkv.weight": (9, 7), "norm.weight": (1,)}


class Sharded(nn.Module):
    """Stand-in for a ZeRO-3 module on rank ``rank`` of ``world``: each parameter is an empty placeholder
    with ``ds_shape`` and its slice ``ds_tensor`` (``ceil(numel / world)`` elements, zero-padded)."""

    def __init__(self, whole: dict, rank: int, world: int):
        super().__init__()
        self.names = {}
        for i, (name, tensor) in enumerate(whole.items()):
            p = nn.Parameter(torch.empty(0), requires_grad=False)
            size = math.ceil(tensor.numel() / world)
            flat = torch.zeros(size * world)
            flat[: tensor.numel()] = tensor.reshape(-1)
            p.ds_tensor, p.ds_shape = flat[rank * size:(rank + 1) * size].clone(), tensor.shape
            self.register_parameter(f"p{i}", p)
            self.names[f"p{i}"] = name

    def named_parameters(self, *args, **kwargs):
        for key, p in super().named_parameters(*args, **kwargs):
            yield self.names[key], p


def whole_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}


def reassemble(modules) -> dict:
    out = {}
    for name, _ in modules[0].named_parameters():
        parts = [dict(m.named_parameters())[name].ds_tensor for m in modules]
        shape = dict(modules[0].named_parameters())[name].ds_shape
        out[name] = torch.cat(parts)[: math.prod(shape)].view(shape)
    return out


@pytest.mark.parametrize("saved_world", [1, 2, 3])
@pytest.mark.parametrize("load_world", [1, 2, 4])
def test_target_shards_recut_for_any_world_size(tmp_path, saved_world, load_world):
    weights = whole_weights()
    for rank in range(saved_world):
        save_target_shard(tmp_path, Sharded(weights, rank, saved_world), rank, saved_world)
    assert sorted(p.name for p in tmp_path.iterdir()) == [shard_name(r, saved_world) for r in range(saved_world)]
    for name, tensor in consolidate_target(tmp_path).items():
        assert torch.equal(tensor, weights[name]), name

    zeros = {name: torch.zeros_like(t) for name, t in weights.items()}
    loaded = [Sharded(zeros, rank, load_world) for rank in range(load_world)]
    for rank, module in enumerate(loaded):
        load_target_shard(tmp_path, module, rank, load_world)
    got = reassemble(loaded)
    for name in weights:
        assert torch.equal(got[name], weights[name]), name


def test_shard_file_errors_name_the_problem(tmp_path):
    weights = whole_weights()
    with pytest.raises(FileNotFoundError, match="no ZeRO-3 target shards"):
        consolidate_target(tmp_path)
    save_target_shard(tmp_path, Sharded(weights, 0, 2), 0, 2)
    with pytest.raises(FileNotFoundError, match=r"ranks \[1\]"):
        consolidate_target(tmp_path)
    save_target_shard(tmp_path, Sharded(weights, 0, 1), 0, 1)
    with pytest.raises(ValueError, match="several world sizes"):
        consolidate_target(tmp_path)
    (tmp_path / shard_name(0, 2)).unlink()
    other = dict(weights)
    other["norm.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match="norm.weight"):
        load_target_shard(tmp_path, Sharded(other, 0, 1), 0, 1)
    assert not list(tmp_path.glob(".tmp-*"))  # atomic writes leave no temporary files


def test_engine_configs_follow_the_run_config():
    cfg = load_config(None, ["deepspeed.zero_stage=3", "optim.clip_grad=1.5", "train.batch_size=16",
                             "train.grad_accum_steps=2", "deepspeed.reduce_bucket_size=12345"])
    ds = engine_config(cfg, width=1280, device_type="cpu")
    zero = ds["zero_optimization"]
    assert ds["gradient_clipping"] == 1.5 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 2 and "bf16" not in ds  # bf16 auto: CUDA only
    assert zero["stage"] == 3 and zero["overlap_comm"] is True
    assert zero["reduce_bucket_size"] == 12345 and zero["allgather_bucket_size"] == 1280 * 1280
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 1280 * 1280)
    assert zero["stage3_param_persistence_threshold"] == 12800
    assert engine_config(cfg, 1280, "cuda")["bf16"] == {"enabled": True}
    assert engine_config(load_config(None, ["deepspeed.zero_stage=1"]), 64, "cpu")["gradient_clipping"] == 0.0
    target = target_engine_config(cfg, 1280)["zero_optimization"]
    assert target["stage"] == 3 and target["stage3_param_persistence_threshold"] == 0
