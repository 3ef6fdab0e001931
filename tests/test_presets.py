"""The packaged ImageNet presets are the official I-JEPA recipes, read field by field from the official YAML
configs (facebookresearch/ijepa ``configs/``) when the official code is there.

Steps: ``epochs x images // (per-GPU batch x GPUs)`` with the official global batch of 2048; IN-1K has
1,281,167 training images; for IN-22K the preset assumes the 14,197,122-image fall 2011 release.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastjepa.config import load_config

yaml = pytest.importorskip("yaml")

OFFICIAL = Path(os.environ.get("FASTJEPA_OFFICIAL_SRC", Path(__file__).resolve().parents[2] / "shared" / "peers" / "ijepa"))
GLOBAL_BATCH = 2048
# preset -> (official config file, images per epoch of its data set)
RECIPES = {
    "vith14": ("in1k_vith14_ep300.yaml", 1_281_167),
    "vith16_448": ("in1k_vith16-448_ep300.yaml", 1_281_167),
    "vitg16_in22k": ("in22k_vitg16_ep44.yaml", 14_197_122),
}
ARCH = {"vit_huge": "huge", "vit_giant": "giant", "vit_large": "large", "vit_base": "base"}


@pytest.mark.parametrize("preset", sorted(RECIPES))
def test_preset_is_the_official_recipe(preset):
    name, images = RECIPES[preset]
    path = OFFICIAL / "configs" / name
    if not path.is_file():
        pytest.skip(f"the official I-JEPA code is not at {OFFICIAL} (set FASTJEPA_OFFICIAL_SRC)")
    official = yaml.safe_load(path.read_text())
    cfg = load_config(preset)
    data, mask, meta, opt = official["data"], official["mask"], official["meta"], official["optimization"]
    steps_per_epoch = images // GLOBAL_BATCH  # the official loader drops the last partial batch
    assert (cfg.model.arch, cfg.model.patch_size, cfg.model.img_size) == (ARCH[meta["model_name"]], mask["patch_size"],
                                                                          data["crop_size"])
    assert (cfg.model.pred_depth, cfg.model.pred_embed_dim) == (meta["pred_depth"], meta["pred_emb_dim"])
    assert cfg.train.batch_size == data["batch_size"] and cfg.train.precision == ("bf16" if meta["use_bfloat16"] else "fp32")
    assert cfg.train.max_steps == opt["epochs"] * steps_per_epoch
    assert cfg.optim.warmup_steps == opt["warmup"] * steps_per_epoch
    assert opt["ipe_scale"] == 1.0 and cfg.train.schedule_steps is None  # the schedules end with the run
    assert (cfg.optim.lr, cfg.optim.start_lr, cfg.optim.final_lr) == (opt["lr"], opt["start_lr"], opt["final_lr"])
    assert (cfg.optim.weight_decay, cfg.optim.final_weight_decay) == (opt["weight_decay"], opt["final_weight_decay"])
    assert list(cfg.optim.ema_momentum) == opt["ema"] and cfg.optim.clip_grad is None
    assert list(cfg.data.crop_scale) == data["crop_scale"]
    assert cfg.mask.num_targets == mask["num_pred_masks"] and mask["num_enc_masks"] == 1
    assert list(cfg.mask.target_scale) == mask["pred_mask_scale"] and list(cfg.mask.context_scale) == mask["enc_mask_scale"]
    assert list(cfg.mask.target_aspect) == mask["aspect_ratio"] and list(cfg.mask.context_aspect) == [1.0, 1.0]
    assert (cfg.mask.min_keep, cfg.mask.allow_overlap) == (mask["min_keep"], mask["allow_overlap"])
