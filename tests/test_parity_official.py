"""Parity with the official I-JEPA step (facebookresearch/ijepa ``src/train.py`` ``train_step``), float64 on CPU.

Official models (``src/models/vision_transformer.py``, random weights away from their init) are converted
to fastjepa by fastjepa's own converter (``fastjepa.io.official.official_to_fastjepa``); the official
collator's masks (``src/masks/multiblock.py``, seeded; truncated to the batch minimum, which is what
``mask.truncate=true`` does in fastjepa) are packed with ``fastjepa.masks.pack_masks``. Then:

- predictions and normalised targets agree row for row (float64 throughout: 1e-10);
- the loss (fastjepa's ``jepa_target_loss``, reference backend, ``train.target_norm_eps``) and the
  gradient of every parameter, mapped by name through the converter's key names, agree at fp32 level
  (the reference loss computes in fp32);
- with the encoders' eps 1e-6 in the target LayerNorm instead of the official 1e-5 the loss is off by far
  more than that tolerance (the known deviation, so the test can tell);
- ``Trainer.train_step`` itself (fp32) returns the official loss for the same weights and masks.

Skipped with the reason when the official code is absent (``FASTJEPA_OFFICIAL_SRC`` or
``../shared/peers/ijepa``).
"""
from __future__ import annotations

import copy
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from fastjepa.config import load_config
from fastjepa.io import official as convert
from fastjepa.models import build_models
from fastjepa.train import Trainer
from fastjepa_kernels import jepa_target_loss

REPO = Path(__file__).resolve().parents[1]
BATCH, HEADS = 4, 4
# a 12 x 12 patch grid (ViT-H/14's 16 x 16 shrunk), the official ViT-H/14 mask section, two blocks each
SIZES = ["model.arch=tiny", "model.embed_dim=64", "model.depth=2", "model.num_heads=4", "model.mlp_ratio=4.0",
         "model.img_size=48", "model.patch_size=4", "model.in_chans=3", "model.pred_depth=2",
         "model.pred_embed_dim=32", "model.pred_num_heads=4", "model.attention_backend=sdpa",
         "mask.num_targets=4", "mask.target_scale=[0.15,0.2]", "mask.target_aspect=[0.75,1.5]",
         "mask.context_scale=[0.85,1.0]", "mask.min_keep=10", "mask.truncate=true"]
RUN = ["data.dataset=synthetic", "data.synthetic_size=16", "data.num_workers=0", "train.device=cpu",
       "train.precision=fp32", "train.progress=off", "train.tensorboard=false", f"train.batch_size={BATCH}"]
LOSS_RTOL = 1e-5  # fp32 level: the reference loss casts to fp32


@pytest.fixture(scope="module")
def official():
    """The official modules, through ``benchmarks/official.py`` (loaded by path, one module object)."""
    module = sys.modules.get("official")
    if module is None:
        spec = importlib.util.spec_from_file_location("official", REPO / "benchmarks" / "official.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["official"] = module
        spec.loader.exec_module(module)
    if module.source() is None:
        pytest.skip(module.why_absent())
    return types.SimpleNamespace(helper=module, off=module.load())


def _perturb_(module: torch.nn.Module, gen: torch.Generator, scale: float = 0.3) -> None:
    """Every trainable parameter moved off its init (zero biases, unit LayerNorms), so each one matters."""
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:  # not the frozen sin-cos tables
                spread = p.std() if p.numel() > 1 and p.std() > 0 else torch.tensor(0.1)
                p.add_(scale * spread * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def official_setup(official, seed: int):
    """Official float64 encoder, predictor and target encoder (a perturbed copy whose final LayerNorm
    is narrow, features of std ~0.05, where the target LayerNorm's eps shows), images, official masks."""
    helper, off = official.helper, official.off
    cfg = load_config(None, SIZES + RUN)
    with torch.device("meta"):  # only the sizes are read from it
        like, _ = build_models(cfg)
    encoder, predictor = helper.official_models_like(off, like)
    encoder, predictor = encoder.double(), predictor.double()
    gen = torch.Generator().manual_seed(seed)
    _perturb_(encoder, gen)
    _perturb_(predictor, gen)
    target = copy.deepcopy(encoder)
    _perturb_(target, gen, scale=0.1)
    with torch.no_grad():
        target.norm.weight.mul_(0.05)
        target.norm.bias.mul_(0.05)
    target.requires_grad_(False)
    images = torch.randn(BATCH, 3, 48, 48, generator=gen, dtype=torch.float64)
    masks_enc, masks_pred = helper.collate_masks(helper.official_collator(off, cfg), BATCH, seed=seed)
    return cfg, encoder, predictor, target, images, masks_enc, masks_pred


def converted(official, encoder, predictor, target, dtype=torch.float64):
    """fastjepa models with the official weights, through the converter (config read off the tensors)."""
    state = official.helper.official_state(encoder, predictor, target)
    cfg, states = convert.official_to_fastjepa(state, num_heads=HEADS, base={"model": {"attention_backend": "sdpa"}},
                                               sections=("encoder", "predictor", "target_encoder"))
    model, fast_target = build_models(cfg)
    model, fast_target = model.to(dtype), fast_target.to(dtype)
    model.encoder.load_state_dict(states["encoder"])
    model.predictor.load_state_dict(states["predictor"])
    fast_target.load_state_dict(states["target"])
    return cfg, model, fast_target


def official_name(section: str, name: str) -> str:
    """A fastjepa parameter name -> the official one, by the converter's key mapping."""
    if section == "encoder":
        return convert.official_encoder_name(name)
    return convert.official_predictor_name(name)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_every_gradient_match_the_official_step(official, seed):
    cfg, encoder, predictor, target, images, masks_enc, masks_pred = official_setup(official, seed)
    off_loss = official.helper.official_loss(official.off, encoder, predictor, target, images, masks_enc, masks_pred)
    off_loss.backward()

    _, model, fast_target = converted(official, encoder, predictor, target)
    masks = official.helper.pack_official(masks_enc, masks_pred, model.encoder.num_patches)
    assert len(set(masks.ctx_lens)) == 1 and len(set(masks.tgt_lens)) == 1  # the official cut to the minimum
    with torch.no_grad():
        h = fast_target(images)
    pred = model(images, masks)
    loss = jepa_target_loss(pred, h, masks.tgt_index, cfg.train.loss, backend="reference",
                            eps=load_config(None).train.target_norm_eps)  # the default: the official value
    loss.backward()

    # predictions and targets, row for row: official rows are (block, image, k), ours (image, block, k)
    blocks, k = len(masks_pred), masks.tgt_lens[0]
    with torch.no_grad():
        off_pred = predictor(encoder(images, masks_enc), masks_enc, masks_pred)
        off_pred = off_pred.view(blocks, BATCH, k, -1).transpose(0, 1).reshape(-1, off_pred.shape[-1])
        off_h = torch.nn.functional.layer_norm(target(images), (h.shape[-1],))
        off_rows = official.off.apply_masks(off_h, masks_pred)
        off_rows = off_rows.view(blocks, BATCH, k, -1).transpose(0, 1).reshape(-1, off_h.shape[-1])
        ours_rows = torch.nn.functional.layer_norm(h.reshape(-1, h.shape[-1])[masks.tgt_index.long()], (h.shape[-1],))
    torch.testing.assert_close(pred.detach(), off_pred, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_rows, off_rows, rtol=1e-10, atol=1e-12)

    assert loss.item() == pytest.approx(off_loss.item(), rel=LOSS_RTOL)
    official_params = {"encoder": dict(encoder.named_parameters()), "predictor": dict(predictor.named_parameters())}
    compared = 0
    for section, module in (("encoder", model.encoder), ("predictor", model.predictor)):
        for name, p in module.named_parameters():
            ref = official_params[section][official_name(section, name)].grad
            assert ref is not None and ref.abs().sum() > 0, f"official {section}.{name} got no gradient"
            got = p.grad.reshape(ref.shape)
            err = ((got - ref).norm() / ref.norm()).item()
            assert err < LOSS_RTOL, f"{section}.{name}: gradient off by {err:.2e} (relative) from the official one"
            compared += 1
    trainable = sum(p.requires_grad for p in list(encoder.parameters()) + list(predictor.parameters()))
    assert compared == trainable  # every official trainable parameter has its counterpart


def test_the_encoders_eps_in_the_target_norm_is_a_visible_deviation(official):
    """The known deviation: fastjepa's earlier eps 1e-6 moves the loss by ~1e-3 relative here, far beyond
    the tolerance above, so the default ``train.target_norm_eps`` (1e-5) is what makes the test pass."""
    cfg, encoder, predictor, target, images, masks_enc, masks_pred = official_setup(official, 0)
    with torch.no_grad():
        off_loss = official.helper.official_loss(official.off, encoder, predictor, target, images, masks_enc,
                                                 masks_pred).item()
        _, model, fast_target = converted(official, encoder, predictor, target)
        masks = official.helper.pack_official(masks_enc, masks_pred, model.encoder.num_patches)
        pred, h = model(images, masks), fast_target(images)
        losses = {eps: jepa_target_loss(pred, h, masks.tgt_index, backend="reference", eps=eps).item()
                  for eps in (1e-5, 1e-6)}
    assert load_config(None).train.target_norm_eps == 1e-5
    assert losses[1e-5] == pytest.approx(off_loss, rel=LOSS_RTOL)
    assert abs(losses[1e-6] / off_loss - 1) > 20 * LOSS_RTOL


def test_trainer_step_returns_the_official_loss(official, tmp_path):
    """``Trainer.train_step`` (fp32, the trainer's own loss call and eps) on the converted weights and the
    packed official masks returns the official float64 loss."""
    cfg, encoder, predictor, target, images, masks_enc, masks_pred = official_setup(official, 3)
    with torch.no_grad():
        off_loss = official.helper.official_loss(official.off, encoder, predictor, target, images, masks_enc,
                                                 masks_pred).item()
    trainer = Trainer(cfg, tmp_path)
    _, model, fast_target = converted(official, encoder, predictor, target, dtype=torch.float32)
    trainer.model.load_state_dict(model.state_dict())
    trainer.target.load_state_dict(fast_target.state_dict())
    masks = official.helper.pack_official(masks_enc, masks_pred, trainer.model.encoder.num_patches)
    out = trainer.train_step([types.SimpleNamespace(images=images.float(), masks=masks)])
    assert out["loss"].item() == pytest.approx(off_loss, rel=3 * LOSS_RTOL)  # fp32 forward vs float64


def test_one_optimizer_step_matches_the_official_step(official, tmp_path):
    """A whole step: the official ``train_step`` (its schedulers, ``init_opt``'s AdamW groups,
    the per-parameter EMA loop) against ``Trainer.train_step`` on the same weights and masks: the update
    of every encoder and predictor parameter and of the target encoder.

    The schedules are one step apart: the official ``train_step`` calls ``scheduler.step()`` first, so its
    first update uses the value after one call; fastjepa's step ``s`` uses the value after ``s`` calls
    (``fastjepa.schedules``). The trainer is put at step 1 here, with a constant EMA momentum (the
    official momentum generator starts at its first value). The official step runs in float64, the trainer
    in fp32 (its EMA keeps an fp32 target): updates agree to ~1e-5, a schedule one step off moves the
    first warm-up update by 40 %."""
    overrides = ["optim.warmup_steps=10", "optim.start_lr=2e-4", "optim.lr=1e-3", "optim.weight_decay=0.04",
                 "optim.final_weight_decay=0.4", "optim.ema_momentum=[0.99,0.99]", "train.max_steps=100"]
    cfg, encoder, predictor, target, images, masks_enc, masks_pred = official_setup(official, 4)
    cfg = load_config(None, SIZES + RUN + overrides)
    _, model, fast_target = converted(official, encoder, predictor, target)
    trainer = Trainer(cfg, tmp_path)
    trainer.model.load_state_dict(model.state_dict())
    trainer.target.load_state_dict(fast_target.state_dict())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    target_before = {k: v.clone() for k, v in trainer.target.state_dict().items()}

    step = official.helper.OfficialStep(official.off, (encoder, predictor, target), cfg, torch.device("cpu"))
    step(images, masks_enc, masks_pred)
    masks = official.helper.pack_official(masks_enc, masks_pred, trainer.model.encoder.num_patches)
    trainer.train_step([types.SimpleNamespace(images=images.float(), masks=masks)])

    official_params = {"encoder": dict(encoder.named_parameters()), "predictor": dict(predictor.named_parameters()),
                       "target": dict(target.named_parameters())}
    modules = (("encoder", "encoder", trainer.model.encoder), ("predictor", "predictor", trainer.model.predictor),
               ("target", "encoder", trainer.target))
    for section, names, module in modules:
        for name, p in module.named_parameters():
            key = ("encoder." if section == "encoder" else "predictor." if section == "predictor" else "") + name
            start = (before if section != "target" else target_before)[key]
            ref = official_params[section][official_name(names, name)].detach().reshape(p.shape) - start.double()
            got = (p.detach() - start).double()
            assert ref.norm() > 0, f"official {section}.{name} did not move"
            # fp32 parameters round each value to 2^-24 relative: the EMA's small moves see that
            rounding = 2.0**-22 * p.detach().double().norm()
            err = (got - ref).norm()
            assert err <= 1e-3 * ref.norm() + rounding, (
                f"{section}.{name}: update off by {(err / ref.norm()).item():.2e} (relative) from the official one")


def test_steps_use_the_official_learning_rate_weight_decay_and_momentum(official, tmp_path):
    """The official ``train_step`` steps its ``WarmupCosineSchedule`` and ``CosineWDSchedule`` before the update
    (its first update uses their values after one call) and takes the EMA momentum from a generator that yields
    step 0's value first; every fastjepa step uses the same three values."""
    cfg = load_config(None, SIZES + RUN + ["optim.warmup_steps=3", "train.max_steps=8",
                                           "optim.ema_momentum=[0.99,1.0]"])
    o, total = cfg.optim, cfg.train.max_steps
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [param]}])
    lr_schedule = official.off.schedulers.WarmupCosineSchedule(opt, warmup_steps=o.warmup_steps, start_lr=o.start_lr,
                                                               ref_lr=o.lr, final_lr=o.final_lr, T_max=total)
    wd_schedule = official.off.schedulers.CosineWDSchedule(opt, ref_wd=o.weight_decay, final_wd=o.final_weight_decay,
                                                           T_max=total)
    ema = o.ema_momentum  # official src/train.py momentum_scheduler, ipe * epochs * ipe_scale = total
    momentum = (ema[0] + i * (ema[1] - ema[0]) / total for i in range(total + 1))
    trainer = Trainer(cfg, tmp_path)
    for s in range(5):
        out = trainer.train_step([trainer.batches[(0, s % trainer.batches.steps_per_epoch)]])
        assert out["lr"] == pytest.approx(lr_schedule.step(), rel=1e-12), s
        assert out["wd"] == pytest.approx(wd_schedule.step(), rel=1e-12), s
        assert out["momentum"] == pytest.approx(next(momentum), rel=1e-12), s
