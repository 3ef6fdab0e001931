"""Schedules vs the formulas of facebookresearch/ijepa ``src/utils/schedulers.py`` and ``train.py``
(re-derived below) and AdamW parameter groups (the configuration loader: tests/test_config.py).

The official schedulers count ``_step`` from 1 on their first ``step()`` call; fastjepa's schedule at
step ``s`` is the official value after ``s`` calls (so step 0 is the start value). ipe_scale is 1.0 in
the ViT-H/14 config, so T_max = the run length.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastjepa import schedules
from fastjepa.config import OptimConfig
from fastjepa.optim import build_optimizer, param_groups, set_hyperparameters


# ---------------------------------------------------------------------------------------------------
# official formulas, written out again
# ---------------------------------------------------------------------------------------------------
def official_lr(step, start_lr, ref_lr, final_lr, warmup, t_max):
    """WarmupCosineSchedule.step() after ``step`` calls."""
    if step < warmup:
        return start_lr + (step / max(1, warmup)) * (ref_lr - start_lr)
    progress = (step - warmup) / max(1, t_max - warmup)
    return max(final_lr, final_lr + (ref_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def official_wd(step, ref_wd, final_wd, t_max):
    """CosineWDSchedule.step() after ``step`` calls (with its clamp towards final_wd)."""
    progress = step / t_max
    wd = final_wd + (ref_wd - final_wd) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(final_wd, wd) if final_wd <= ref_wd else min(final_wd, wd)


def official_momentum(step, ema, total):
    """The ``momentum_scheduler`` generator of train.py: ema0 + i (ema1 - ema0) / total, i = 0..total."""
    return ema[0] + step * (ema[1] - ema[0]) / total


CFG = OptimConfig()  # lr 1e-3, start 2e-4, final 1e-6, wd 0.04 -> 0.4, ema 0.996 -> 1.0
TOTAL = 300 * 625  # 300 epochs x 625 iterations (ImageNet at batch 2048)
WARMUP = 40 * 625


def cfg_h14():
    return CFG.model_copy(update={"warmup_steps": WARMUP})


@settings(max_examples=200, deadline=None, derandomize=True)
@given(step=st.integers(0, TOTAL))
def test_schedules_match_official_everywhere(step):
    cfg = cfg_h14()
    assert schedules.learning_rate(step, cfg, TOTAL) == pytest.approx(
        official_lr(step, 2e-4, 1e-3, 1e-6, WARMUP, TOTAL), rel=1e-12, abs=1e-15)
    assert schedules.weight_decay(step, cfg, TOTAL) == pytest.approx(official_wd(step, 0.04, 0.4, TOTAL), rel=1e-12)
    assert schedules.ema_momentum(step, cfg, TOTAL) == pytest.approx(
        official_momentum(step, (0.996, 1.0), TOTAL), rel=1e-12)


def test_lr_endpoints_and_midpoints():
    cfg = cfg_h14()
    lr = lambda s: schedules.learning_rate(s, cfg, TOTAL)  # noqa: E731
    assert lr(0) == pytest.approx(2e-4)
    assert lr(WARMUP // 2) == pytest.approx((2e-4 + 1e-3) / 2)
    assert lr(WARMUP) == pytest.approx(1e-3)
    assert lr(WARMUP + (TOTAL - WARMUP) // 2) == pytest.approx((1e-3 + 1e-6) / 2)
    assert lr(TOTAL) == pytest.approx(1e-6)
    assert lr(TOTAL + 5000) == pytest.approx(1e-6)  # stays at final_lr past the end
    warm = [lr(s) for s in range(0, WARMUP + 1, 97)]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    decay = [lr(s) for s in range(WARMUP, TOTAL + 1, 997)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    # continuous at the end of warmup: one step before is one warmup increment below the peak
    assert lr(WARMUP) - lr(WARMUP - 1) == pytest.approx((1e-3 - 2e-4) / WARMUP)


def test_lr_small_run_without_warmup_room():
    cfg = CFG.model_copy(update={"warmup_steps": 10})
    vals = [schedules.learning_rate(s, cfg, 10) for s in range(12)]
    assert vals[0] == pytest.approx(2e-4) and vals[10] == pytest.approx(1e-3)  # total == warmup: no decay room
    assert all(math.isfinite(v) for v in vals)


def test_weight_decay_cosine():
    wd = lambda s: schedules.weight_decay(s, CFG, TOTAL)  # noqa: E731
    assert wd(0) == pytest.approx(0.04)
    assert wd(TOTAL // 2) == pytest.approx(0.22)
    assert wd(TOTAL // 4) == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert wd(TOTAL) == pytest.approx(0.4)
    assert wd(2 * TOTAL) == pytest.approx(0.4)
    vals = [wd(s) for s in range(0, TOTAL + 1, 1009)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))


def test_ema_momentum_linear():
    m = lambda s: schedules.ema_momentum(s, CFG, TOTAL)  # noqa: E731
    assert m(0) == pytest.approx(0.996)
    assert m(TOTAL // 2) == pytest.approx(0.998)
    assert m(TOTAL) == pytest.approx(1.0)
    assert m(TOTAL + 10) == pytest.approx(1.0)
    vals = [m(s) for s in range(0, TOTAL + 1, 1013)]
    diffs = [b - a for a, b in zip(vals, vals[1:])]
    assert all(d == pytest.approx(diffs[0], rel=1e-6) for d in diffs)  # linear: equal increments


# ---------------------------------------------------------------------------------------------------
# parameter groups
# ---------------------------------------------------------------------------------------------------
class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.conv = torch.nn.Conv2d(3, 6, 2)
        self.token = torch.nn.Parameter(torch.zeros(1, 6))  # like the mask token: 2-D, decayed officially
        self.scale = torch.nn.Parameter(torch.ones(6))  # a 1-D parameter without "bias" in its name
        self.frozen = torch.nn.Parameter(torch.ones(3, 3), requires_grad=False)


def test_param_groups_split():
    model = Toy()
    groups = param_groups(model)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    names = dict(model.named_parameters())
    # independent rule (official init_opt): decay iff "bias" not in name and ndim != 1
    for name, p in names.items():
        if not p.requires_grad:
            assert id(p) not in decay | no_decay
            continue
        expect_decay = ("bias" not in name) and p.ndim != 1
        assert (id(p) in decay) == expect_decay, name
        assert (id(p) in no_decay) == (not expect_decay), name
    assert not decay & no_decay
    assert groups[1]["weight_decay"] == 0.0


def test_set_hyperparameters_never_decays_no_decay_group():
    model = Toy()
    opt = build_optimizer(model, CFG)
    for step in [0, 1000, TOTAL // 2, TOTAL]:
        lr, wd = schedules.learning_rate(step, cfg_h14(), TOTAL), schedules.weight_decay(step, CFG, TOTAL)
        set_hyperparameters(opt, lr, wd)
        assert opt.param_groups[0]["weight_decay"] == wd
        assert opt.param_groups[1]["weight_decay"] == 0.0
        assert all(g["lr"] == lr for g in opt.param_groups)


def test_no_decay_params_are_not_shrunk():
    """One AdamW step with zero gradients: decayed matrices shrink by lr*wd, biases/LN do not move."""
    model = Toy()
    opt = build_optimizer(model, CFG)
    set_hyperparameters(opt, 0.1, 0.4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "bias" in name or p.ndim == 1:
            assert torch.equal(p.detach(), before[name]), name
        else:
            torch.testing.assert_close(p.detach(), before[name] * (1 - 0.1 * 0.4), atol=1e-7, rtol=1e-6)
