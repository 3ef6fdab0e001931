"""The configuration model: loading, overrides, "did you mean" errors, the range of every key (each bad
value an error naming its key, before anything is built), the packaged presets, and the start-up batch
line and global-batch warning.

The ranges are written out again here from the issue's rules (positive lr, rates in [0, 1], sizes >= 1,
workers >= 0, ...), independently of the model's own ``Field`` constraints.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastjepa.config import (
    ARCHS,
    SECTIONS,
    Config,
    ConfigError,
    apply_overrides,
    batch_summary,
    build_config,
    global_batch_warning,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, unknown, wanted", [
    ("optim.lrr=0.1", "optim.lrr", "optim.lr"),
    ("trian.seed=1", "trian", "train"),  # an unknown section is named as such
    ("model.embed_dims=64", "model.embed_dims", "model.embed_dim"),
    ("mask.num_target=2", "mask.num_target", "mask.num_targets"),
    ("train.batchsize=8", "train.batchsize", "train.batch_size"),
])
def test_unknown_key_names_closest(override, unknown, wanted):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert f"'{unknown}'" in msg
    assert f"did you mean '{wanted}'" in msg


def test_overrides_parse_json():
    cfg = load_config(None, [
        "optim.lr=5e-4", "train.batch_size=16", "mask.target_scale=[0.1, 0.2]", "mask.allow_overlap=true",
        "data.root=/data/in1k", "model.arch=base", "optim.clip_grad=null", 'train.precision="fp32"',
    ])
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.batch_size == 16
    assert tuple(cfg.mask.target_scale) == (0.1, 0.2)
    assert cfg.mask.allow_overlap is True
    assert cfg.data.root == "/data/in1k"
    assert cfg.model.arch == "base"
    assert cfg.optim.clip_grad is None
    assert cfg.train.precision == "fp32"
    raw = apply_overrides({"train": {"seed": 3}}, ["train.max_steps=7"])
    assert raw == {"train": {"seed": 3, "max_steps": 7}}


@pytest.mark.parametrize("override, key", [
    ("train.batch_size=0", "batch_size"),
    ("mask.target_scale=[0.3, 0.2]", "target_scale"),
    ("model.arch=\"hughe\"", "arch"),
    ("optim.ema_momentum=[0.9, 1.2]", "ema_momentum"),
    ("deepspeed.zero_stage=4", "zero_stage"),
    ("train.precision=fp16", "precision"),
    ("model.img_size=225", "model"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value)


def test_malformed_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError):
        load_config(None, ["train.seed.x=1"])
    with pytest.raises(ConfigError):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "bad.json" in str(err.value)
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"optim": {"lr": 1e-3, "warmup": 5}}))
    with pytest.raises(ConfigError) as err:
        load_config(nested)
    assert "optim.warmup" in str(err.value) and "optim.warmup_steps" in str(err.value)


def test_defaults_are_the_official_recipe():
    c = Config()
    assert (c.optim.lr, c.optim.start_lr, c.optim.final_lr) == (1e-3, 2e-4, 1e-6)
    assert (c.optim.weight_decay, c.optim.final_weight_decay) == (0.04, 0.4)
    assert tuple(c.optim.ema_momentum) == (0.996, 1.0)
    assert tuple(c.optim.betas) == (0.9, 0.999) and c.optim.clip_grad is None
    assert (c.model.arch, c.model.patch_size, c.model.img_size, c.model.pred_depth, c.model.pred_embed_dim) == (
        "huge", 14, 224, 12, 384)
    m = c.mask
    assert (m.num_targets, tuple(m.target_scale), tuple(m.target_aspect), tuple(m.context_scale), m.min_keep,
            m.allow_overlap) == (4, (0.15, 0.2), (0.75, 1.5), (0.85, 1.0), 10, False)
    assert tuple(c.data.crop_scale) == (0.3, 1.0) and c.train.batch_size == 128


CONFIG_FILES = sorted((REPO / "src" / "fastjepa" / "configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_config_files_load(path):
    cfg = load_config(path)
    raw = json.loads(path.read_text())
    # every value in the file made it into the typed config ("_" keys are documented comments)
    dumped = cfg.to_dict()
    for section, values in raw.items():
        if section.startswith("_"):
            continue
        for key, value in values.items():
            if key.startswith("_"):
                continue
            got = dumped[section][key]
            assert (list(got) if isinstance(got, (list, tuple)) else got) == value, f"{section}.{key}"
    # and survives a round trip
    assert build_config(json.loads(json.dumps(dumped))) == cfg


def test_underscore_keys_are_comments_but_typos_are_not():
    cfg = build_config({"_comment": "x", "optim": {"_why": "y", "lr": 3e-4}})
    assert cfg.optim.lr == 3e-4
    with pytest.raises(ConfigError):
        build_config({"optim": {"lr_": 3e-4}})


def test_vith14_config_is_the_official_recipe():
    """configs/vith14.json vs in1k_vith14_ep300.yaml: 300 epochs, 40 warmup, batch 128 x 16 GPUs."""
    path = REPO / "src" / "fastjepa" / "configs" / "vith14.json"
    cfg = load_config(path)
    ipe = 1_281_167 // (128 * 16)  # the official loader drops the last partial batch
    assert ipe == 625
    assert cfg.train.max_steps == 300 * ipe and cfg.optim.warmup_steps == 40 * ipe
    assert cfg.train.batch_size == 128 and cfg.train.precision == "bf16" and cfg.train.loss == "smooth_l1"
    assert (cfg.model.arch, cfg.model.patch_size, cfg.model.img_size) == ("huge", 14, 224)
    assert (cfg.model.pred_depth, cfg.model.pred_embed_dim, cfg.model.pred_num_heads or 16) == (12, 384, 16)
    assert cfg.mask == Config().mask and cfg.optim.clip_grad is None
    assert (cfg.optim.lr, cfg.optim.start_lr, cfg.optim.final_lr) == (1e-3, 2e-4, 1e-6)
    assert (cfg.optim.weight_decay, cfg.optim.final_weight_decay, tuple(cfg.optim.ema_momentum)) == (0.04, 0.4, (0.996, 1.0))
    assert tuple(cfg.data.crop_scale) == (0.3, 1.0)


def test_some_config_file_exists():
    assert CONFIG_FILES, "configs/*.json should hold at least the demo config"


# ---------------------------------------------------------------------------------------------------
# ranges: every bad value is an error that names its key
# ---------------------------------------------------------------------------------------------------
# (override, the key the error must name): the list first, then the rule for every other key
OUT_OF_RANGE = [
    ("optim.lr=-1", "optim.lr"), ("optim.lr=0", "optim.lr"), ("optim.lr=NaN", "optim.lr"),
    ("model.embed_dim=0", "model.embed_dim"), ("model.depth=0", "model.depth"),
    ("model.patch_size=0", "model.patch_size"), ("data.num_workers=-1", "data.num_workers"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps"),
    # an explicit 0 is an error, never "the preset's value"
    ("model.num_heads=0", "model.num_heads"), ("model.mlp_ratio=0", "model.mlp_ratio"),
    ("model.pred_num_heads=0", "model.pred_num_heads"), ("train.schedule_steps=0", "train.schedule_steps"),
    # sizes >= 1
    ("model.img_size=0", "model.img_size"), ("model.pred_depth=0", "model.pred_depth"),
    ("model.pred_embed_dim=0", "model.pred_embed_dim"), ("mask.num_targets=0", "mask.num_targets"),
    ("mask.min_keep=0", "mask.min_keep"), ("data.synthetic_size=0", "data.synthetic_size"),
    ("train.max_steps=0", "train.max_steps"), ("train.batch_size=0", "train.batch_size"),
    ("train.grad_accum_steps=0", "train.grad_accum_steps"), ("train.log_every=0", "train.log_every"),
    ("train.checkpoint_every=0", "train.checkpoint_every"), ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.reference_global_batch=0", "train.reference_global_batch"),
    ("deepspeed.reduce_bucket_size=0", "deepspeed.reduce_bucket_size"),
    ("deepspeed.stage3_param_persistence_threshold=-5", "deepspeed.stage3_param_persistence_threshold"),
    # non-negative counts and rates
    ("train.seed=-1", "train.seed"), ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.start_lr=-1e-4", "optim.start_lr"), ("optim.final_lr=-1e-6", "optim.final_lr"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"), ("optim.final_weight_decay=-0.1", "optim.final_weight_decay"),
    ("optim.eps=0", "optim.eps"), ("optim.clip_grad=-1", "optim.clip_grad"),
    # rates in [0, 1]
    ("optim.betas=[0.9, 1.0]", "optim.betas"), ("optim.betas=[-0.1, 0.9]", "optim.betas"),
    ("optim.ema_momentum=[0.9, 1.1]", "optim.ema_momentum"), ("optim.ema_momentum=[1.0, 0.9]", "optim.ema_momentum"),
    ("mask.target_scale=[0, 0.2]", "mask.target_scale"), ("mask.context_scale=[0.85, 1.5]", "mask.context_scale"),
    ("mask.target_aspect=[0, 1]", "mask.target_aspect"), ("data.crop_scale=[0.5, 0.4]", "data.crop_scale"),
    # shapes that cannot be built
    ("model.img_size=225", "model.img_size"), ("model.num_heads=7", "model.num_heads"),
    ("model.embed_dim=130", "model.embed_dim"), ("model.pred_num_heads=5", "model.pred_num_heads"),
    ("model.in_chans=2", "model.in_chans"), ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ('optim.lr="fast"', "optim.lr"),
]


@pytest.mark.parametrize("override, key", OUT_OF_RANGE)
def test_out_of_range_values_are_errors_that_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert msg.startswith(f"config key '{key}"), msg
    assert "\n" not in msg


@pytest.mark.parametrize("override", [
    "optim.lr=1e-9", "optim.start_lr=0", "optim.final_lr=0", "optim.warmup_steps=0", "optim.weight_decay=0",
    "optim.clip_grad=0", "optim.betas=[0, 0.999]", "optim.ema_momentum=[1, 1]", "optim.ema_momentum=[0, 0]",
    "data.num_workers=0", "train.seed=0", "train.keep_checkpoints=1", "train.max_nonfinite_steps=1",
    "mask.target_scale=[1, 1]", "data.crop_scale=[1, 1]", "model.patch_size=1", "model.img_size=14",
    "train.reference_global_batch=null", "deepspeed.reduce_bucket_size=1",
])
def test_values_on_the_boundary_are_accepted(override):
    load_config(None, [override])


def _float_keys():
    """Every float-valued key (plain, optional or a pair), read off the model."""
    keys = []
    for section, schema in SECTIONS.items():
        for name, field in schema.model_fields.items():
            text = str(field.annotation)
            if "float" in text:
                keys.append((f"{section}.{name}", "tuple" in text or "[float" in text))
    return keys


@pytest.mark.parametrize("key, pair", _float_keys())
@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "1e999", '"inf"', '"nan"'])
def test_non_finite_floats_are_errors(key, pair, bad):
    value = f"[0.5, {bad}]" if pair else bad
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}={value}"])
    assert f"config key '{key}" in str(err.value)


def test_float_keys_found():
    assert {"optim.lr", "optim.betas", "model.mlp_ratio", "mask.target_scale"} <= {k for k, _ in _float_keys()}


@settings(max_examples=60, deadline=None)
@given(arch=st.sampled_from(sorted(ARCHS)), heads=st.integers(1, 40), pred_heads=st.one_of(st.none(), st.integers(1, 40)),
       width=st.one_of(st.none(), st.integers(1, 300).map(lambda w: 4 * w)))
def test_heads_must_divide_the_widths_the_preset_fills_in(arch, heads, pred_heads, width):
    """Divisibility is checked on the widths the model gets: the arch's when the key is null."""
    overrides = [f"model.arch={arch}", f"model.num_heads={heads}", f"model.pred_num_heads={json.dumps(pred_heads)}",
                 f"model.embed_dim={json.dumps(width)}"]
    real_width = ARCHS[arch][0] if width is None else width
    real_pred_heads = heads if pred_heads is None else pred_heads
    fits = real_width % heads == 0 and 384 % real_pred_heads == 0
    if fits:
        assert load_config(None, overrides).model.shape()[:3:2] == (real_width, heads)
    else:
        with pytest.raises(ConfigError, match=r"config key 'model\.(pred_)?num_heads'"):
            load_config(None, overrides)


def test_arch_table_is_the_models_table():
    from fastjepa.models import PRESETS

    assert ARCHS == PRESETS


def test_an_explicit_value_is_kept_and_recorded():
    """The value set is the value built and the value written to config.json (no `or preset`)."""
    cfg = load_config(None, ["model.arch=tiny", "model.embed_dim=64", "model.depth=1", "model.num_heads=1",
                             "model.mlp_ratio=1.5"])
    assert cfg.model.shape() == (64, 1, 1, 1.5)
    recorded = cfg.to_dict()["model"]
    assert (recorded["embed_dim"], recorded["depth"], recorded["num_heads"], recorded["mlp_ratio"]) == (64, 1, 1, 1.5)
    from fastjepa.models import build_encoder

    enc = build_encoder(cfg.model)
    assert (enc.embed_dim, len(enc.blocks), enc.num_heads) == (64, 1, 1)


def test_union_and_tuple_errors_read_well():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["deepspeed.reduce_bucket_size=big"])
    assert str(err.value).startswith("config key 'deepspeed.reduce_bucket_size': ") and "'auto'" in str(err.value)
    assert '(got "big")' in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.betas=[0.9, 1.0]"])
    assert str(err.value).startswith("config key 'optim.betas[1]': ") and "(got 1.0)" in str(err.value)


# ---------------------------------------------------------------------------------------------------
# the start-up batch line and the global-batch warning
# ---------------------------------------------------------------------------------------------------
def _numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", line)]


@settings(max_examples=200, deadline=None)
@given(world=st.integers(1, 64), batch=st.integers(1, 256), accum=st.integers(1, 8), micro=st.integers(0, 20_000))
def test_batch_summary_states_the_numbers(world, batch, accum, micro):
    cfg = load_config(None, [f"train.batch_size={batch}", f"train.grad_accum_steps={accum}"])
    line = batch_summary(cfg, world, micro)
    assert "\n" not in line
    assert _numbers(line) == pytest.approx([world, batch, accum, world * batch * accum, round(micro / accum, 2)])


@settings(max_examples=300, deadline=None)
@given(world=st.integers(1, 64), batch=st.integers(1, 256), accum=st.integers(1, 8), ref=st.integers(1, 4096))
def test_global_batch_warning_names_the_accumulation_that_restores_it(world, batch, accum, ref):
    cfg = load_config(None, [f"train.batch_size={batch}", f"train.grad_accum_steps={accum}",
                             f"train.reference_global_batch={ref}"])
    warning = global_batch_warning(cfg, world)
    if world * batch * accum == ref:
        assert warning is None
        return
    assert warning is not None and "\n" not in warning
    assert str(world * batch * accum) in warning and str(ref) in warning
    exact = [k for k in range(1, ref + 1) if k * world * batch == ref]  # brute force, not ref // (world * batch)
    named = re.search(r"train\.grad_accum_steps=(\d+) (restores|gives)", warning)
    assert named
    k = int(named.group(1))
    if exact:
        assert k == exact[0] and named.group(2) == "restores"
    else:
        assert "no train.grad_accum_steps" in warning
        assert all(abs(k * world * batch - ref) <= abs(j * world * batch - ref) for j in range(1, 2 * ref // (world * batch) + 3))


def test_vith14_on_8_gpus_warns_and_16_do_not():
    """The recipe's 2048 = 16 GPUs x 128: on 8 GPUs the warning asks for 2 accumulation steps."""
    cfg = load_config("vith14")
    assert global_batch_warning(cfg, 16) is None
    warning = global_batch_warning(cfg, 8)
    assert "1024" in warning and "2048" in warning and "train.grad_accum_steps=2 restores it" in warning
    fixed = load_config("vith14", ["train.grad_accum_steps=2"])
    assert global_batch_warning(fixed, 8) is None
    assert global_batch_warning(load_config("vith14", ["train.reference_global_batch=null"]), 3) is None


def test_every_preset_is_silent_on_the_setup_it_was_tuned_for():
    """vit*: 16 ranks x 128 (the official recipe); demo: one CPU process x 64."""
    for name, world in [("vith14", 16), ("vitl16", 16), ("vitb16", 16), ("vits16", 16), ("demo", 1)]:
        assert global_batch_warning(load_config(name), world) is None, name
    assert math.prod([16, 128]) == load_config("vith14").train.reference_global_batch
