"""The official I-JEPA code (facebookresearch/ijepa) as the oracle of the parity test and the speed peer.

Where it is: ``FASTJEPA_OFFICIAL_SRC``, else ``../shared/peers/ijepa`` beside the checkout. It is never
copied into this repository (its licence is CC BY-NC 4.0): it is imported from there, its folder on
``sys.path`` (its top-level package is a namespace package called ``src``). Its models, masks, tensor
utilities, optimizer set-up and gradient logger import with torch and numpy alone; ``src/train.py``
needs yaml and its data code, so its ``train_step`` is re-stated here (``official_loss``,
``OfficialStep``) line by line, with the official calls.

Also here: the official collator's masks packed for fastjepa (``pack_official``) and official models of
the same sizes as a fastjepa model (``official_models_like``).
"""
from __future__ import annotations

import copy
import importlib
import os
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
BESIDE_CHECKOUT = REPO.parent / "shared" / "peers" / "ijepa"
MODULES = {  # our name: the official module (and, after the colon, the one attribute taken from it)
    "vit": "src.models.vision_transformer",
    "MaskCollator": "src.masks.multiblock:MaskCollator",
    "apply_masks": "src.masks.utils:apply_masks",
    "repeat_interleave_batch": "src.utils.tensors:repeat_interleave_batch",
    "init_opt": "src.helper:init_opt",
    "grad_logger": "src.utils.logging:grad_logger",
    "schedulers": "src.utils.schedulers",
}


def source() -> Path | None:
    """The official checkout: ``FASTJEPA_OFFICIAL_SRC`` if set (and a folder), else the shared copy beside
    the checkout; ``None`` when neither holds ``src/models/vision_transformer.py``."""
    given = os.environ.get("FASTJEPA_OFFICIAL_SRC")
    path = Path(given) if given else BESIDE_CHECKOUT
    return path if (path / "src" / "models" / "vision_transformer.py").is_file() else None


def why_absent() -> str:
    given = os.environ.get("FASTJEPA_OFFICIAL_SRC")
    if given:
        return f"FASTJEPA_OFFICIAL_SRC={given} holds no src/models/vision_transformer.py (a facebookresearch/ijepa checkout)"
    return (f"the official I-JEPA code is absent: set FASTJEPA_OFFICIAL_SRC to a facebookresearch/ijepa checkout "
            f"(or place one at {BESIDE_CHECKOUT})")


_LOADED: dict = {}


def load() -> types.SimpleNamespace:
    """The official modules and functions named in ``MODULES``, plus ``root`` (the checkout)."""
    root = source()
    if root is None:
        raise FileNotFoundError(why_absent())
    if root in _LOADED:
        return _LOADED[root]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    out = {"root": root}
    for name, spec in MODULES.items():
        module_name, _, attr = spec.partition(":")
        module = importlib.import_module(module_name)
        if not Path(module.__file__).resolve().is_relative_to(root.resolve()):
            raise ImportError(f"{module_name} was imported from {module.__file__}, not from {root}: another "
                              "package named 'src' is on sys.path first")
        out[name] = getattr(module, attr) if attr else module
    _LOADED[root] = types.SimpleNamespace(**out)
    return _LOADED[root]


# ---- models and masks ---------------------------------------------------------------------------------
def official_models_like(off, model) -> tuple[nn.Module, nn.Module]:
    """Official ``(encoder, predictor)`` of the sizes of a fastjepa ``IJEPA`` model (``.encoder``,
    ``.predictor``), built as ``src/helper.py`` ``init_model`` builds them: the ``vit_*`` constructors'
    settings (qkv bias, LayerNorm eps 1e-6) with any width, and ``vit_predictor`` with the encoder's
    head count. Their own initialisation; the caller loads weights or does not care (timing)."""
    enc, pred = model.encoder, model.predictor
    width = enc.embed_dim
    encoder = off.vit.VisionTransformer(
        img_size=[enc.grid[0] * enc.patch_size], patch_size=enc.patch_size, in_chans=enc.in_chans,
        embed_dim=width, depth=len(enc.blocks), num_heads=enc.num_heads,
        mlp_ratio=enc.blocks[0].mlp.fc1.out_features / width, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6))
    predictor = off.vit.vit_predictor(
        num_patches=encoder.patch_embed.num_patches, embed_dim=width,
        predictor_embed_dim=pred.predictor_embed.out_features, depth=len(pred.blocks), num_heads=encoder.num_heads)
    return encoder, predictor


def official_collator(off, cfg):
    """The official ``MaskCollator`` with a fastjepa config's mask section (one context block, as every
    official config; its context aspect ratio is always 1)."""
    m, model = cfg.mask, cfg.model
    return off.MaskCollator(
        input_size=model.img_size, patch_size=model.patch_size, enc_mask_scale=tuple(m.context_scale),
        pred_mask_scale=tuple(m.target_scale), aspect_ratio=tuple(m.target_aspect), nenc=1,
        npred=m.num_targets, allow_overlap=m.allow_overlap, min_keep=m.min_keep)


def collate_masks(collator, batch_size: int, seed: int | None = None):
    """One batch of official masks ``(masks_enc, masks_pred)``: lists (1 and ``npred`` long) of int64
    ``[B, K]`` patch indices. Block positions come from torch's global generator in the official code:
    with ``seed`` it is seeded (and restored afterwards)."""
    items = [0] * batch_size  # the collator also collates the images; it never looks at them
    if seed is None:
        _, masks_enc, masks_pred = collator(items)
        return masks_enc, masks_pred
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, masks_enc, masks_pred = collator(items)
    return masks_enc, masks_pred


def pack_official(masks_enc, masks_pred, num_patches: int):
    """The official masks as fastjepa ``PackedMasks`` (one context set per image; targets in the
    official block order). fastjepa orders predictions (image, block), the official code (block,
    image): the pairing of each prediction with its target is the same."""
    from fastjepa.masks import pack_masks

    if len(masks_enc) != 1:
        raise ValueError(f"fastjepa has one context block per image; the official masks have {len(masks_enc)}")
    batch = masks_enc[0].shape[0]
    contexts = [np.asarray(masks_enc[0][b]) for b in range(batch)]
    targets = [[np.asarray(m[b]) for m in masks_pred] for b in range(batch)]
    return pack_masks(contexts, targets, num_patches)


# ---- the official step (src/train.py, main() -> train_step) ----------------------------------------------
def official_loss(off, encoder, predictor, target_encoder, imgs, masks_enc, masks_pred):
    """``forward_target``, ``forward_context`` and ``loss_fn`` of the official ``train_step``: targets are
    the target encoder's features layer-normed with torch's default eps, picked by ``apply_masks`` and
    repeated per context block; predictions are the predictor's on the context encoder's features;
    smooth-L1 (beta 1) averaged over elements. (Its ``AllReduce`` is the identity at world size 1.)"""
    with torch.no_grad():
        h = target_encoder(imgs)
        h = F.layer_norm(h, (h.size(-1),))
        batch = len(h)
        h = off.apply_masks(h, masks_pred)
        h = off.repeat_interleave_batch(h, batch, repeat=len(masks_enc))
    z = predictor(encoder(imgs, masks_enc), masks_enc, masks_pred)
    return F.smooth_l1_loss(z, h)


def momentum_schedule(ema, total_steps: int):
    """The official EMA momentum generator: linear from ``ema[0]`` to ``ema[1]`` over the run."""
    return (ema[0] + i * (ema[1] - ema[0]) / total_steps for i in range(total_steps + 1))


class OfficialStep:
    """The official training step, as ``src/train.py`` runs it on one GPU (no DDP wrapper at world size
    1): lr and wd schedulers stepped, bf16 autocast, a ``GradScaler`` under bf16, the official AdamW
    (``init_opt``'s four parameter groups), ``grad_logger`` over the encoder (one ``float(norm)`` per
    weight), ``zero_grad``, the per-parameter EMA loop, ``float(loss)``. ``__call__(images, masks_enc,
    masks_pred)`` includes the batch's copy to the device (``load_imgs``); the collator runs outside it,
    as in the official loader workers.

    ``model``: a fastjepa model whose sizes the official models take, or ``(encoder, predictor,
    target_encoder)`` official modules to train. Schedules: ``cfg.optim`` over ``train.schedule_steps``
    (or ``max_steps``), one "epoch" per step."""

    def __init__(self, off, model, cfg, device: torch.device):
        self.off, self.device = off, device
        self.bf16 = cfg.train.precision == "bf16"
        if isinstance(model, tuple):
            encoder, predictor, self.target_encoder = model
        else:
            encoder, predictor = official_models_like(off, model)
            self.target_encoder = copy.deepcopy(encoder)
        self.encoder, self.predictor = encoder.to(device), predictor.to(device)
        self.target_encoder.to(device)
        for p in self.target_encoder.parameters():
            p.requires_grad = False
        o, total = cfg.optim, cfg.train.schedule_steps or cfg.train.max_steps
        # one "epoch" per step: init_opt's warmup and T_max are epochs x iterations per epoch
        use_scaler = self.bf16 and device.type == "cuda"  # torch.cuda.amp.GradScaler is CUDA-only
        self.optimizer, self.scaler, self.scheduler, self.wd_scheduler = off.init_opt(
            encoder=self.encoder, predictor=self.predictor, wd=o.weight_decay, final_wd=o.final_weight_decay,
            start_lr=o.start_lr, ref_lr=o.lr, final_lr=o.final_lr, iterations_per_epoch=1,
            warmup=o.warmup_steps, num_epochs=total, ipe_scale=1.0, use_bfloat16=use_scaler)
        self.momentum = momentum_schedule(o.ema_momentum, total)

    def __call__(self, images, masks_enc, masks_pred) -> float:
        imgs = images.to(self.device, non_blocking=True)
        masks_enc = [u.to(self.device, non_blocking=True) for u in masks_enc]
        masks_pred = [u.to(self.device, non_blocking=True) for u in masks_pred]
        self.scheduler.step()
        self.wd_scheduler.step()
        # torch.cuda.amp.autocast there: bf16 on a GPU, a no-op for CPU tensors
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16 and self.device.type == "cuda"):
            loss = official_loss(self.off, self.encoder, self.predictor, self.target_encoder, imgs,
                                 masks_enc, masks_pred)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.off.grad_logger(self.encoder.named_parameters())
        self.optimizer.zero_grad()
        with torch.no_grad():
            m = next(self.momentum)
            for param_q, param_k in zip(self.encoder.parameters(), self.target_encoder.parameters()):
                param_k.data.mul_(m).add_((1.0 - m) * param_q.detach().data)
        return float(loss.detach())


# ---- weights: official -> fastjepa through fastjepa's converter ------------------------------------------
def official_state(encoder, predictor, target_encoder) -> dict:
    """An official checkpoint's model entries (``src/train.py`` ``save_checkpoint``, world size 1: no
    ``module.`` prefix)."""
    return {"encoder": encoder.state_dict(), "predictor": predictor.state_dict(),
            "target_encoder": target_encoder.state_dict()}
