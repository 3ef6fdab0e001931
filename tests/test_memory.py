"""The analytic memory model (fastjepa.memory) against what autograd actually keeps for the backward.

Every tensor a block saves for the backward pass passes through ``saved_tensors_hooks``; their bytes
(each storage once) must equal ``block_bytes_per_token * tokens * depth`` exactly, with and without
activation checkpointing. The model-state formulas are checked against the tensors a real optimizer
step allocates.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fastjepa.memory import block_bytes_per_token, model_state_bytes
from fastjepa.models.vit import Block, run_blocks

torch.set_num_threads(1)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernels run compiled or interpreted


def saved_bytes(fn, tokens: int) -> int:
    """Bytes of the distinct storages saved for backward while ``fn`` runs that hold per-token data
    (a dimension of size ``tokens``; weight casts and sequence offsets are left out)."""
    seen = {}

    def pack(t):
        if tokens in t.shape:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("width,heads,ratio,lens", [(64, 2, 4.0, [7, 13, 5]), (48, 3, 2.0, [1, 30]),
                                                      (96, 4, 3.0, [11])])
@pytest.mark.parametrize("checkpointing", ["off", "reentrant"])
def test_block_activation_bytes_match_what_autograd_saves(width, heads, ratio, lens, checkpointing):
    torch.manual_seed(0)
    depth, tokens = 2, sum(lens)
    blocks = nn.ModuleList(Block(width, heads, ratio, "triton") for _ in range(depth)).to(DEVICE)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    # the residual stream is bf16 under autocast
    x = torch.randn(tokens, width, device=DEVICE).bfloat16().requires_grad_()

    def forward():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            return run_blocks(blocks, x, cu, max(lens), checkpointing)

    got, out = saved_bytes(forward, tokens)
    # backend "triton" runs the fused block path on every device; its LayerNorms keep their input as the
    # fp32 residual stream (model.residual_dtype default), the 4D bytes CUDA's autocast keeps, and each
    # block hands the next the stream in fp32: checkpointed, block 0 keeps x (bf16), the others 4D
    if checkpointing == "reentrant":
        assert got == (2 + 4 * (depth - 1)) * width * tokens
    else:
        assert got == depth * block_bytes_per_token(width, ratio, heads, "cuda") * tokens
    out.float().square().sum().backward()  # the saved set was sufficient: the backward runs
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_model_states_follow_the_paper(stage):
    # ZeRO paper (Rajbhandari et al. 2020) Fig. 1: Psi = 7.5B, K = 12, N_d = 64 -> 120 GB, 31.4 GB,
    # 16.6 GB, 1.9 GB for DDP / P_os / P_os+g / P_os+g+p (our target encoder is an extra 4 Psi_enc)
    expected = {1: 31.4e9, 2: 16.6e9, 3: 1.875e9}[stage]
    assert model_state_bytes(7.5e9, 0.0, stage, 64) == pytest.approx(expected, rel=0.01)


def test_stage0_model_states_match_a_real_step():
    """Single-process trainer: fp32 weights + grads + two Adam moments + fp32 target, counted tensor
    by tensor after a step (the autocast bf16 copies live only inside the step: 2 Psi on top)."""
    from fastjepa.config import OptimConfig
    from fastjepa.optim import build_optimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))
    target = nn.Sequential(nn.Linear(16, 32))
    for p in target.parameters():
        p.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig())
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    held = sum(p.numel() * 4 for p in model.parameters()) + sum(p.grad.numel() * 4 for p in model.parameters())
    held += sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    held += sum(p.numel() * 4 for p in target.parameters())
    psi, psi_enc = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in target.parameters())
    assert model_state_bytes(psi, psi_enc, 0) == held + 2 * psi
