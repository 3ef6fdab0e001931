"""``benchmarks/profile_step.py``: the per-category step profile.

- the command of the issue (demo config, CPU, batch 32, 3 steps) writes its JSON: every category, each
  with ms, % and a floor; the categories add up to the profiled step;
- the FLOPs behind the GEMM and attention floors equal what ``torch.utils.flop_counter`` counts in the
  same step (equal-length masks, so the CPU attention pads nothing);
- the busy-interval union against brute force, and the classification of typical op and kernel names.
"""
from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "profile_step.py"


@pytest.fixture(scope="module")
def profile_step():
    spec = importlib.util.spec_from_file_location("profile_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.subprocess
def test_demo_profile_on_cpu_adds_up(tmp_path, helpers):
    out = tmp_path / "profile.json"
    cmd = [sys.executable, str(SCRIPT), "--config", "demo", "--device", "cpu", "--batch", "32", "--steps", "3",
           "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=helpers.subprocess_env())
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("device", "torch", "config", "batch_size", "steps", "precision", "step_ms", "step_ms_unprofiled",
                "images_per_s", "busy_ms", "flops_per_step", "gemm_tflops_measured", "copy_gbps_measured",
                "floor_ms", "categories", "model", "context_tokens_per_image"):
        assert key in result, key
    assert result["batch_size"] == 32 and result["steps"] == 3 and result["device_type"] == "cpu"
    categories = result["categories"]
    assert list(categories) == ["GEMM", "attention", "norm/pointwise/cast", "gather/scatter", "target loss",
                                "optimizer", "EMA", "copies", "idle gaps", "other"]
    for name, row in categories.items():
        assert set(row) >= {"ms", "pct", "floor_ms", "floor_basis", "top"}, name
        assert row["ms"] >= 0 and (row["floor_ms"] is None or row["floor_ms"] >= 0), name
    total = sum(row["ms"] for row in categories.values())
    assert total == pytest.approx(result["step_ms"], rel=0.02)
    assert sum(row["pct"] for row in categories.values()) == pytest.approx(100, abs=2)
    # every phase of the step was seen (each has work on the CPU), and the table was printed
    for name in ("GEMM", "attention", "norm/pointwise/cast", "gather/scatter", "target loss", "optimizer", "EMA"):
        assert categories[name]["ms"] > 0, name
    assert categories["GEMM"]["floor_basis"] == "flops" and categories["EMA"]["floor_basis"] == "bytes"
    assert "idle gaps" in run.stdout and "GEMM" in run.stdout


def test_flops_match_torchs_flop_counter(profile_step, tiny, tmp_path):
    """GEMM FLOPs (``step_flops`` minus attention) and attention FLOPs of one step against torch's
    ``FlopCounterMode`` over the target forward and the model's forward + backward (attention through
    SDPA's math backend, whose matmuls it counts). The analytic count
    charges the patch embedding a backward for its input too (images need none): that term is added to
    the counted side."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from fastjepa.config import load_config
    from fastjepa.flops import step_flops
    from fastjepa.train import Trainer

    cfg = load_config(None, tiny + ["mask.truncate=true", "model.attention_backend=sdpa"])
    trainer = Trainer(cfg, tmp_path)
    batch = trainer.batches[(0, 0)]
    masks, b = batch.masks, len(batch.masks.ctx_lens)
    assert len(set(masks.ctx_lens)) == 1 and len(set(masks.pred_lens)) == 1  # no padding in the CPU attention
    counter = FlopCounterMode(display=False)
    # SDPA's math backend: attention as bmm calls, which the counter counts (the fused CPU kernel it skips)
    with counter, sdpa_kernel(SDPBackend.MATH):
        with torch.no_grad():
            trainer.target(batch.images)
        pred = trainer.model(batch.images, masks)
        pred.float().pow(2).mean().backward()
    counts = {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = counts.get("bmm", 0)  # the math backend's QK^T and PV (and their gradients)
    gemm = sum(n for op, n in counts.items() if op in ("mm", "addmm", "convolution", "convolution_backward"))
    enc = trainer.model.encoder
    patch_input_grad = 2 * enc.in_chans * enc.patch_size**2 * enc.embed_dim * enc.num_patches * b
    analytic_attention = profile_step.attention_flops(trainer.model, masks, b)
    assert analytic_attention == attention
    assert step_flops(trainer.model, masks, b) - analytic_attention == gemm + patch_input_grad


def test_union_length_matches_brute_force(profile_step):
    rng = random.Random(3)
    for _ in range(50):
        intervals = []
        for _ in range(rng.randint(0, 12)):
            start = rng.randint(0, 60)
            intervals.append((start, start + rng.randint(0, 15)))
        covered = {t for start, end in intervals for t in range(start, end)}
        assert profile_step.union_length(intervals) == len(covered)


@pytest.mark.parametrize("name, parents, expected", [
    ("aten::addmm", [], "GEMM"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_cublas", ["aten::mm"], "GEMM"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NNT", ["aten::mm"], "GEMM"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>", [], "GEMM"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", ["aten::_efficient_attention_forward"], "attention"),
    ("_attention_fwd_kernel", ["fastjepa_kernels::varlen_attention"], "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", [], "attention"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", ["aten::gelu"],
     "norm/pointwise/cast"),
    ("aten::native_layer_norm", [], "norm/pointwise/cast"),
    ("_gather_fwd_kernel", ["fastjepa_kernels::gather_tokens"], "gather/scatter"),
    ("aten::index_select", [], "gather/scatter"),
    ("Memcpy HtoD (Pageable -> Device)", ["aten::copy_", "aten::to"], "copies"),
    ("_target_loss_fwd_kernel", ["fastjepa_kernels::jepa_target_loss", "fastjepa::target_loss"], "target loss"),
    ("aten::index_select", ["aten::native_layer_norm", "fastjepa::target_loss"], "target loss"),
    ("aten::smooth_l1_loss_backward", ["SmoothL1LossBackward0",
                                       "autograd::engine::evaluate_function: SmoothL1LossBackward0"], "target loss"),
    ("aten::mul", ["GeneratedBackwardFor_fastjepa_kernels_jepa_target_loss_defaultBackward",
                   "autograd::engine::evaluate_function: GeneratedBackwardFor_fastjepa_kernels_jepa_target_loss_"
                   "defaultBackward"], "target loss"),  # the Triton loss's backward
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", ["aten::_fused_adamw_",
                                                                          "Optimizer.step#AdamW.step"], "optimizer"),
    ("_ema_fwd_kernel", ["fastjepa::ema"], "EMA"),
    ("aten::mul_", ["fastjepa::ema"], "EMA"),
    ("aten::t", ["aten::linear"], "GEMM"),  # a view inherits the op it serves
    ("aten::view", [], "other"),
])
def test_categories_of_typical_names(profile_step, name, parents, expected):
    parent = None
    for parent_name in reversed(parents):  # outermost last in the list
        parent = types.SimpleNamespace(name=parent_name, cpu_parent=parent)
    assert profile_step.category_of(types.SimpleNamespace(name=name, cpu_parent=None), parent) == expected


def test_device_kernels_are_paired_with_the_ops_that_launched_them(profile_step):
    """The CUDA path of ``classify`` on hand-made events: a kernel's linked id names its op (not the
    runtime call that shares the number), busy time is the union of the kernels' intervals."""
    from torch.autograd import DeviceType

    def event(name, device, id_, linked=0, start=0.0, end=0.0, parent=None):
        return types.SimpleNamespace(name=name, device_type=device, id=id_, linked_correlation_id=linked,
                                     time_range=types.SimpleNamespace(start=start, end=end), cpu_parent=parent,
                                     is_async=False, self_cpu_time_total=end - start)

    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    ema_scope = event("fastjepa::ema", cpu, 1)
    ema_op = event("fastjepa_kernels::ema_", cpu, 7, parent=ema_scope)
    mm_op = event("aten::mm", cpu, 5)
    events = [ema_scope, ema_op, mm_op,
              event("cudaLaunchKernel", cpu, 7, linked=5),  # a runtime call numbered like the EMA op
              event("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NNT", gpu, 900, linked=5, start=10, end=30),
              event("_ema_fwd_kernel", gpu, 901, linked=7, start=25, end=40),  # overlaps the GEMM by 5
              event("Memcpy HtoD (Pageable -> Device)", gpu, 902, linked=0, start=50, end=55)]
    per, busy, names = profile_step.classify(events, "cuda")
    assert per["GEMM"] == 20 and per["EMA"] == 15 and per["copies"] == 5
    assert sum(per.values()) == 40 and busy == 35
    assert names["EMA"] == {"_ema_fwd_kernel": 15}
