"""fastjepa.io.convert and fastjepa.load_encoder.

The official I-JEPA layout is generated here from its key names (facebookresearch/ijepa
src/models/vision_transformer.py, src/train.py, src/helper.py), with random weights at ViT-tiny width
(192, 3 heads), and checked against a plain float64 forward written from the official module code:
- official -> fastjepa -> timm gives the same features as the official forward (float64, and fp32 between
  fastjepa and timm); official -> timm directly writes the same tensors;
- the converted predictor predicts what the official predictor does;
- the converted run resumes in the trainer at the given step with the official weights and AdamW moments,
  and trains a step;
- every accepted form of path loads the same encoder; ``import fastjepa`` stays light;
- broken files give one-line errors that name the keys (exit code 2 on the command line).
"""
from __future__ import annotations

import enum
import importlib.abc
import importlib.machinery
import json
import math
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from fastjepa.io import CheckpointError, convert
from fastjepa.io.encoder import load_encoder
from fastjepa.io.files import newest_checkpoint_file as latest_checkpoint
from fastjepa.io.files import read_weights
from fastjepa.io.timm import timm_model

torch.set_num_threads(1)

WIDTH, HEADS, DEPTH, PATCH, IMG = 192, 3, 2, 16, 48  # ViT-tiny width and heads; a 3x3 grid
PRED_WIDTH, PRED_DEPTH = 96, 2
BLOCK_KEYS = [f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
              for p in ("weight", "bias")]


def load_checkpoint(path) -> dict:
    return read_weights(path)[0]


# ---- the official layout, built from its key names ---------------------------------------------------
def official_sincos(dim: int, side: int) -> np.ndarray:
    """The official table: ``np.meshgrid(w, h)`` puts the column coordinate first; each half of the
    channels is [sin | cos] of coordinate x 1 / 10000^(2i / half)."""
    cols, rows = np.meshgrid(np.arange(side, dtype=float), np.arange(side, dtype=float))

    def one_axis(half, coords):
        omega = 1.0 / 10000 ** (np.arange(half // 2, dtype=float) / (half / 2.0))
        angles = np.outer(coords.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1)


def _block(gen, prefix: str, dim: int, hidden: int) -> dict:
    shapes = {"norm1": [dim], "attn.qkv": [3 * dim, dim], "attn.proj": [dim, dim], "norm2": [dim],
              "mlp.fc1": [hidden, dim], "mlp.fc2": [dim, hidden]}
    out = {}
    for module, shape in shapes.items():
        if module.startswith("norm"):  # affine LayerNorms away from (1, 0), so a dropped norm shows
            out[f"{prefix}{module}.weight"] = 1 + 0.2 * torch.randn(shape, generator=gen)
        else:
            out[f"{prefix}{module}.weight"] = 0.05 * torch.randn(shape, generator=gen)
        out[f"{prefix}{module}.bias"] = 0.05 * torch.randn(shape[:1], generator=gen)
    return out


def official_encoder(seed: int, depth: int = DEPTH, width: int = WIDTH, side: int = IMG // PATCH) -> dict:
    gen = torch.Generator().manual_seed(seed)
    sd = {"patch_embed.proj.weight": 0.05 * torch.randn(width, 3, PATCH, PATCH, generator=gen),
          "patch_embed.proj.bias": 0.05 * torch.randn(width, generator=gen),
          "pos_embed": torch.from_numpy(official_sincos(width, side)).float()[None]}
    for i in range(depth):
        sd.update(_block(gen, f"blocks.{i}.", width, 4 * width))
    sd["norm.weight"] = 1 + 0.2 * torch.randn(width, generator=gen)
    sd["norm.bias"] = 0.05 * torch.randn(width, generator=gen)
    return sd


def official_predictor(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    side = IMG // PATCH
    sd = {"predictor_embed.weight": 0.05 * torch.randn(PRED_WIDTH, WIDTH, generator=gen),
          "predictor_embed.bias": 0.05 * torch.randn(PRED_WIDTH, generator=gen),
          "mask_token": 0.5 * torch.randn(1, 1, PRED_WIDTH, generator=gen),
          "predictor_pos_embed": torch.from_numpy(official_sincos(PRED_WIDTH, side)).float()[None]}
    for i in range(PRED_DEPTH):
        sd.update(_block(gen, f"predictor_blocks.{i}.", PRED_WIDTH, 4 * PRED_WIDTH))
    sd["predictor_norm.weight"] = 1 + 0.2 * torch.randn(PRED_WIDTH, generator=gen)
    sd["predictor_norm.bias"] = 0.05 * torch.randn(PRED_WIDTH, generator=gen)
    sd["predictor_proj.weight"] = 0.05 * torch.randn(WIDTH, PRED_WIDTH, generator=gen)
    sd["predictor_proj.bias"] = 0.05 * torch.randn(WIDTH, generator=gen)
    return sd


def official_opt(encoder: dict, predictor: dict, seed: int = 7) -> dict:
    """AdamW state in official init_opt's four groups; every trainable parameter has moments."""
    gen = torch.Generator().manual_seed(seed)
    groups = [[n for n, t in encoder.items() if "bias" not in n and t.ndim != 1],
              [n for n, t in predictor.items() if "bias" not in n and t.ndim != 1],
              [n for n, t in encoder.items() if "bias" in n or t.ndim == 1],
              [n for n, t in predictor.items() if "bias" in n or t.ndim == 1]]
    sources = [encoder, predictor, encoder, predictor]
    state, param_groups, index = {}, [], 0
    for names, source in zip(groups, sources):
        ids = []
        for name in names:
            if "pos_embed" not in name:  # frozen: no gradient, no state
                t = source[name]
                state[index] = {"step": torch.tensor(123.0), "exp_avg": torch.randn(t.shape, generator=gen),
                                "exp_avg_sq": torch.rand(t.shape, generator=gen)}
            ids.append(index)
            index += 1
        param_groups.append({"lr": 1e-3, "weight_decay": 0.04, "params": ids})
    return {"state": state, "param_groups": param_groups}


def official_checkpoint(seed: int = 0, ddp: bool = True) -> dict:
    """src/train.py save_checkpoint's dict; DDP runs save ``module.``-prefixed keys."""
    encoder, predictor, target = official_encoder(seed), official_predictor(seed + 1), official_encoder(seed + 2)

    def wrap(sd):
        return {("module." if ddp else "") + k: v for k, v in sd.items()}

    return {"encoder": wrap(encoder), "predictor": wrap(predictor), "target_encoder": wrap(target),
            "opt": official_opt(encoder, predictor), "scaler": None, "epoch": 3, "loss": 0.25,
            "batch_size": 8, "world_size": 2, "lr": 1e-3}


def plain(sd: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in sd.items()}


# ---- the official forward, float64 --------------------------------------------------------------------
def _ln(x, w, b):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-6) * w + b


def _official_block(p: dict, prefix: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    """src/models/vision_transformer.py Block: pre-norm attention and MLP with residuals. x [B, N, D]."""
    B, N, D = x.shape
    h = _ln(x, p[prefix + "norm1.weight"], p[prefix + "norm1.bias"])
    qkv = (h @ p[prefix + "attn.qkv.weight"].T + p[prefix + "attn.qkv.bias"]).reshape(B, N, 3, heads, D // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(-1)
    y = (attn @ v).transpose(1, 2).reshape(B, N, D) @ p[prefix + "attn.proj.weight"].T + p[prefix + "attn.proj.bias"]
    x = x + y
    h = _ln(x, p[prefix + "norm2.weight"], p[prefix + "norm2.bias"])
    h = torch.nn.functional.gelu(h @ p[prefix + "mlp.fc1.weight"].T + p[prefix + "mlp.fc1.bias"])
    return x + h @ p[prefix + "mlp.fc2.weight"].T + p[prefix + "mlp.fc2.bias"]


def official_features(sd: dict, images: torch.Tensor, heads: int = HEADS) -> torch.Tensor:
    """VisionTransformer.forward (no masks) then the mean over tokens: ``[B, D]`` float64."""
    p = {k: v.double() for k, v in sd.items()}
    x = torch.nn.functional.conv2d(images.double(), p["patch_embed.proj.weight"], p["patch_embed.proj.bias"],
                                   stride=PATCH).flatten(2).transpose(1, 2)
    x = x + p["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in p if k.startswith("blocks."))
    for i in range(depth):
        x = _official_block(p, f"blocks.{i}.", x, heads)
    return _ln(x, p["norm.weight"], p["norm.bias"]).mean(1)


def official_prediction(sd: dict, context: torch.Tensor, ctx_pos, tgt_pos, heads: int = HEADS) -> torch.Tensor:
    """VisionTransformerPredictor.forward for one image and one target block: ``[len(tgt_pos), D]``."""
    p = {k: v.double() for k, v in sd.items()}
    pos = p["predictor_pos_embed"][0]
    x = context.double() @ p["predictor_embed.weight"].T + p["predictor_embed.bias"] + pos[ctx_pos]
    tokens = p["mask_token"][0] + pos[tgt_pos]
    x = torch.cat([x, tokens])[None]
    for i in range(PRED_DEPTH):
        x = _official_block(p, f"predictor_blocks.{i}.", x, heads)
    x = _ln(x, p["predictor_norm.weight"], p["predictor_norm.bias"])[0, len(ctx_pos):]
    return x @ p["predictor_proj.weight"].T + p["predictor_proj.bias"]


# ---- timm behind a torchvision stub (as tests/test_kernels_timm.py) ------------------------------------
class _StubTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``torchvision.*`` imports with inert placeholders: timm imports torchvision for names a
    ViT never uses, and the PyPI torchvision does not import beside this CPU torch."""

    class _Meta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return cls

    Any = _Meta("Any", (), {"__init__": lambda self, *a, **k: None})
    InterpolationMode = enum.Enum("InterpolationMode", [(n, n.lower()) for n in (
        "NEAREST", "NEAREST_EXACT", "BILINEAR", "BICUBIC", "BOX", "HAMMING", "LANCZOS")])

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        stub = self

        class Module(types.ModuleType):
            def __getattr__(self, name):
                if name.startswith("__"):
                    raise AttributeError(name)
                return stub.InterpolationMode if name == "InterpolationMode" else stub.Any

        return Module(spec.name)

    def exec_module(self, module):
        module.__path__ = []


@pytest.fixture(scope="module")
def timm():
    try:
        import timm as timm_mod
        return timm_mod
    except ImportError as exc:
        if "torchvision" not in str(exc) and "torchvision" not in repr(exc.__cause__) and "nms" not in str(exc):
            pytest.skip(f"timm not importable: {exc}")
    except RuntimeError as exc:  # a torchvision wheel built for another torch
        if "torchvision" not in str(exc):
            raise
    for name in [n for n in sys.modules if n.split(".")[0] in ("timm", "torchvision")]:
        del sys.modules[name]
    finder = _StubTorchvision()
    sys.meta_path.insert(0, finder)
    try:
        import timm as timm_mod
    except ImportError as exc:
        pytest.skip(f"timm not importable: {exc}")
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
    return timm_mod


# ---- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture
def run_config(tmp_path, helpers):
    """A tiny trainer config for the converted run (its model section is replaced by the checkpoint's)."""
    raw = helpers.tiny_config_dict(train={"batch_size": 2, "keep_checkpoints": 3})
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture
def converted(tmp_path, run_config, capsys):
    """(official checkpoint dict, its file, the converted run directory, the printed summary)."""
    ckpt = official_checkpoint()
    src = tmp_path / "IN1K-vit.t.16.pth.tar"
    torch.save(ckpt, src)
    out = tmp_path / "run"
    code = convert.main(["--from", "official", "--to", "fastjepa", str(src), str(out), "--num-heads", str(HEADS),
                         "--config", str(run_config), "--step", "5"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return ckpt, src, out, json.loads(captured.out.strip().splitlines()[-1])


def images(n=3, seed=0):
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


# ---- round trips ---------------------------------------------------------------------------------------------
def test_official_to_fastjepa_to_timm_same_features(converted, tmp_path, timm, capsys):
    ckpt, src, out, summary = converted
    assert summary["optimizer"] == "official AdamW moments" and summary["step"] == 5
    assert summary["model"]["embed_dim"] == WIDTH and summary["model"]["img_size"] == IMG
    x = images()
    reference = official_features(plain(ckpt["target_encoder"]), x)
    context_reference = official_features(plain(ckpt["encoder"]), x)
    assert (reference - context_reference).abs().max() > 1e-3  # the two encoders differ: a mix-up would show

    encoder = load_encoder(out)
    assert not encoder.training and encoder.num_heads == HEADS
    with torch.no_grad():
        ours = encoder.double()(x.double()).mean(1)
        torch.testing.assert_close(ours, reference, atol=1e-10, rtol=1e-10)
        ours32 = encoder.float()(x).mean(1)

    timm_file = tmp_path / "timm.safetensors"
    assert convert.main(["--from", "fastjepa", "--to", "timm", str(out), str(timm_file)]) == 0
    kwargs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["timm_kwargs"]
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**kwargs).eval()
    model.load_state_dict(load_file(timm_file), strict=True)
    with torch.no_grad():
        pooled32 = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(pooled32, ours32, atol=2e-5, rtol=1e-5)
        model.double()
        torch.testing.assert_close(model.forward_head(model.forward_features(x.double()), pre_logits=True),
                                   reference, atol=1e-10, rtol=1e-10)
        helper = timm_model(out).double()
        assert not helper.pos_embed.requires_grad
        torch.testing.assert_close(helper(x.double()), reference, atol=1e-10, rtol=1e-10)  # num_classes=0: pooled
        with_head = timm_model(encoder.float(), num_classes=5)
        assert with_head(x).shape == (3, 5)

    direct = tmp_path / "direct.pth"
    assert convert.main(["--from", "official", "--to", "timm", str(src), str(direct), "--num-heads", str(HEADS)]) == 0
    direct_sd, two_step = torch.load(direct, weights_only=True), load_file(timm_file)
    assert direct_sd.keys() == two_step.keys()
    for key in direct_sd:
        assert torch.equal(direct_sd[key], two_step[key]), key
    # the official encoder keys are timm's keys: the same tensors, position table included
    for key, value in plain(ckpt["target_encoder"]).items():
        torch.testing.assert_close(direct_sd[key], value, atol=1e-7, rtol=0)


def test_converted_predictor_matches_official(converted):
    from fastjepa.config import build_config
    from fastjepa.masks import pack_masks
    from fastjepa.models import build_models

    ckpt, _, out, _ = converted
    state = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    cfg = build_config(state["config"])
    model, _ = build_models(cfg)
    model.load_state_dict(state["model"])
    model.double()
    ctx_pos, tgt_pos = np.array([0, 2, 4, 5, 8]), np.array([1, 3, 6])
    masks = pack_masks([ctx_pos], [[tgt_pos]], num_patches=9)
    context = torch.randn(len(ctx_pos), WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.predictor(context, masks)
    reference = official_prediction(plain(ckpt["predictor"]), context, ctx_pos, tgt_pos)
    torch.testing.assert_close(ours, reference, atol=1e-10, rtol=1e-10)
    # and the context encoder is the official 'encoder', not the target
    x = images(2, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x.double()).mean(1), official_features(plain(ckpt["encoder"]), x),
                                   atol=1e-10, rtol=1e-10)


def _official_name(ours: str) -> str:
    section, key = ours.split(".", 1)
    if section == "encoder":
        return key.replace("patch_embed.", "patch_embed.proj.", 1)
    return "predictor_" + key if key.startswith(("blocks.", "norm.")) else key


def test_converted_run_resumes_and_trains(converted, helpers):
    from fastjepa.config import load_config
    from fastjepa.train import Trainer

    ckpt, _, out, _ = converted
    cfg = load_config(out / "config.json", ["train.max_steps=6"])
    trainer = Trainer(cfg, out, resume=True)
    assert trainer.step == 5
    official = {"encoder": plain(ckpt["encoder"]), "predictor": plain(ckpt["predictor"])}
    params = dict(trainer.model.named_parameters())
    assert len(params) == sum(len(v) for v in official.values()) - 2  # both position tables are buffers here
    for name, p in params.items():
        section = name.split(".", 1)[0]
        theirs = official[section][_official_name(name)]
        assert torch.equal(p.detach(), theirs.reshape(p.shape)), name
        moments = trainer.optimizer.state[p]  # official AdamW moments, under the right parameter
        index = _official_index(ckpt, section, _official_name(name))
        expected = ckpt["opt"]["state"][index]
        assert torch.equal(moments["exp_avg"], expected["exp_avg"].reshape(p.shape)), name
        assert torch.equal(moments["exp_avg_sq"], expected["exp_avg_sq"].reshape(p.shape)), name
        assert float(moments["step"]) == 123.0
    for name, t in trainer.target.state_dict().items():
        assert torch.equal(t, plain(ckpt["target_encoder"])[_official_name("encoder." + name)]), name
    before = {n: p.detach().clone() for n, p in params.items()}
    assert trainer.train() == 0
    record = helpers.read_metrics(out)[-1]
    assert record["step"] == 6 and math.isfinite(record["loss"])
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def _official_index(ckpt, section: str, key: str) -> int:
    """The official optimizer's index of a parameter, from the group lists official_opt wrote."""
    enc, pred = plain(ckpt["encoder"]), plain(ckpt["predictor"])
    order = ([("encoder", n) for n, t in enc.items() if "bias" not in n and t.ndim != 1]
             + [("predictor", n) for n, t in pred.items() if "bias" not in n and t.ndim != 1]
             + [("encoder", n) for n, t in enc.items() if "bias" in n or t.ndim == 1]
             + [("predictor", n) for n, t in pred.items() if "bias" in n or t.ndim == 1])
    return order.index((section, key))


def test_fresh_optimizer_and_mismatched_optimizer(tmp_path, run_config, capsys):
    ckpt = official_checkpoint(ddp=False)  # single-GPU official runs save keys without module.
    ckpt["opt"]["param_groups"] = ckpt["opt"]["param_groups"][:3]  # not the official layout: not carried
    src = tmp_path / "ckpt.pth.tar"
    torch.save(ckpt, src)
    cases = (([], tmp_path / "a", "parameter groups hold [10, 12, 19] parameters"),
             (["--fresh-optimizer"], tmp_path / "b", "--fresh-optimizer"))
    for flags, out, why in cases:
        code = convert.main(["--from", "official", "--to", "fastjepa", str(src), str(out), "--num-heads", "3",
                             "--config", str(run_config), *flags])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert json.loads(captured.out.strip().splitlines()[-1])["optimizer"] == "fresh AdamW"
        assert "optimizer starts fresh" in captured.err and why in captured.err
        state = load_checkpoint(latest_checkpoint(out / "checkpoints"))
        assert state["step"] == 0 and state["optimizer"]["state"] == {}


def test_heads_from_preset_and_encoder_only_output(tmp_path, capsys):
    """Width 192 x depth 12 is official vit_tiny: 3 heads without --num-heads. An encoder-only
    .safetensors output loads with load_encoder and matches the official forward."""
    target = official_encoder(5, depth=12)
    ckpt = {"encoder": official_encoder(6, depth=12), "target_encoder": target, "predictor": {}}
    src = tmp_path / "tiny12.pth.tar"
    torch.save(ckpt, src)
    out = tmp_path / "encoder.safetensors"
    assert convert.main(["--from", "official", "--to", "fastjepa", str(src), str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model"]["arch"] == "tiny" and summary["model"]["num_heads"] == 3
    x = images(2)
    for path in (out, src):  # the converted file, and the official file read directly
        encoder = load_encoder(path).double()
        with torch.no_grad():
            torch.testing.assert_close(encoder(x.double()).mean(1), official_features(target, x), atol=1e-10,
                                       rtol=1e-10)


def test_load_encoder_accepts_every_form(converted, tmp_path):
    import fastjepa

    ckpt, src, out, _ = converted
    x = images(2)
    target_ref = official_features(plain(ckpt["target_encoder"]), x)
    context_ref = official_features(plain(ckpt["encoder"]), x)
    bare = tmp_path / "bare.safetensors"  # no metadata: the architecture comes from config=
    from safetensors.torch import load_file, save_file
    save_file(load_file(out / "target_encoder.safetensors"), bare)
    forms = [
        (dict(path=out), target_ref),
        (dict(path=out / "target_encoder.safetensors"), target_ref),
        (dict(path=latest_checkpoint(out / "checkpoints")), target_ref),
        (dict(path=latest_checkpoint(out / "checkpoints"), weights="context"), context_ref),
        (dict(path=out, weights="context"), context_ref),
        (dict(path=src, num_heads=HEADS, weights="context"), context_ref),
        (dict(path=bare, config=out / "config.json"), target_ref),
    ]
    for kwargs, reference in forms:
        encoder = fastjepa.load_encoder(**kwargs).double()
        with torch.no_grad():
            torch.testing.assert_close(encoder(x.double()).mean(1), reference, atol=1e-10, rtol=1e-10, msg=str(kwargs))
    with pytest.raises(CheckpointError, match="no 'config' metadata"):
        load_encoder(bare)


def test_import_fastjepa_stays_light(helpers):
    code = ("import sys, fastjepa; assert 'torch' not in sys.modules; "
            "assert callable(fastjepa.load_encoder) and 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env=helpers.subprocess_env(), timeout=120)


# ---- broken files -----------------------------------------------------------------------------------------------
def _convert_error(capsys, src, out, *flags) -> str:
    code = convert.main(["--from", "official", "--to", "fastjepa", str(src), str(out), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err  # one line
    return err


def test_broken_official_files(tmp_path, capsys):
    out = tmp_path / "out"
    err = _convert_error(capsys, tmp_path / "nope.pth.tar", out)
    assert "does not exist" in err

    ckpt = official_checkpoint()
    del ckpt["target_encoder"]["module.blocks.1.mlp.fc2.bias"]
    ckpt["target_encoder"]["module.blocks.1.extra.weight"] = torch.zeros(3)
    torch.save(ckpt, tmp_path / "keys.pth.tar")
    err = _convert_error(capsys, tmp_path / "keys.pth.tar", out, "--num-heads", "3")
    assert "missing keys: blocks.1.mlp.fc2.bias" in err and "unexpected keys: blocks.1.extra.weight" in err
    assert "[target_encoder]" in err

    ckpt = official_checkpoint()
    ckpt["predictor"]["module.predictor_blocks.0.attn.proj.weight"] = torch.zeros(PRED_WIDTH, PRED_WIDTH + 1)
    torch.save(ckpt, tmp_path / "shape.pth.tar")
    err = _convert_error(capsys, tmp_path / "shape.pth.tar", out, "--num-heads", "3")
    assert "shape mismatches: predictor_blocks.0.attn.proj.weight [96, 97] (expected [96, 96])" in err

    ckpt = official_checkpoint()
    ckpt["target_encoder"]["module.pos_embed"] = ckpt["target_encoder"]["module.pos_embed"].flip(1)
    torch.save(ckpt, tmp_path / "pos.pth.tar")
    err = _convert_error(capsys, tmp_path / "pos.pth.tar", out, "--num-heads", "3")
    assert "not the fixed 2-D sin-cos table of a 3x3 grid" in err

    ckpt = official_checkpoint()
    ckpt["target_encoder"]["module.pos_embed"] = torch.zeros(1, 8, WIDTH)
    torch.save(ckpt, tmp_path / "grid.pth.tar")
    assert "not a square grid" in _convert_error(capsys, tmp_path / "grid.pth.tar", out, "--num-heads", "3")

    torch.save(official_checkpoint(), tmp_path / "heads.pth.tar")  # depth 2 at width 192: no preset
    assert "--num-heads" in _convert_error(capsys, tmp_path / "heads.pth.tar", out)

    ckpt = official_checkpoint()
    ckpt["args"] = types.SimpleNamespace(lr=1e-3)  # a pickled object weights_only refuses
    torch.save(ckpt, tmp_path / "pickle.pth.tar")
    err = _convert_error(capsys, tmp_path / "pickle.pth.tar", out, "--num-heads", "3")
    assert "weights_only=True" in err and "re-save" in err

    (tmp_path / "truncated.pth.tar").write_bytes((tmp_path / "heads.pth.tar").read_bytes()[:5000])
    assert "cannot be read" in _convert_error(capsys, tmp_path / "truncated.pth.tar", out)

    torch.save({"model": {}}, tmp_path / "foreign.pth")
    assert "not an official I-JEPA checkpoint" in _convert_error(capsys, tmp_path / "foreign.pth", out)
    assert not out.exists()


def test_broken_fastjepa_files(converted, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    _, _, out, _ = converted
    weights = load_file(out / "target_encoder.safetensors")
    metadata = {"config": (out / "config.json").read_text()}
    del weights["norm.bias"]
    weights["head.weight"] = torch.zeros(2, 2)
    save_file(weights, tmp_path / "keys.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match=r"missing keys: norm\.bias; unexpected keys: head\.weight"):
        load_encoder(tmp_path / "keys.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_encoder(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="neither target_encoder.safetensors nor checkpoints"):
        load_encoder(tmp_path)
    code = convert.main(["--from", "fastjepa", "--to", "timm", str(tmp_path / "keys.safetensors"),
                         str(tmp_path / "t.safetensors")])
    assert code == 2 and "missing keys: norm.bias" in capsys.readouterr().err
    # writing a run over an existing one is refused
    code = convert.main(["--from", "official", "--to", "fastjepa", str(out.parent / "IN1K-vit.t.16.pth.tar"),
                         str(out), "--num-heads", "3"])
    assert code == 2 and "already holds a run" in capsys.readouterr().err


@pytest.mark.subprocess
def test_cli_module_exit_code(tmp_path, helpers):
    result = subprocess.run([sys.executable, "-m", "fastjepa", "convert", "--from", "official", "--to", "timm",
                             str(tmp_path / "missing.pth"), str(tmp_path / "out.pth")],
                            capture_output=True, text=True, env=helpers.subprocess_env(), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"fastjepa-convert: error: '{tmp_path / 'missing.pth'}' does not exist"


def test_config_flag_takes_a_preset_name_or_a_file(tmp_path, capsys):
    """``--config vith14`` reads the packaged preset, as the trainer's ``--config`` does; a missing file is
    one line naming it."""
    from fastjepa.config import PRESET_DIR

    assert convert._base_config("vith14") == json.loads((PRESET_DIR / "vith14.json").read_text())
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"train": {"seed": 7}}))
    assert convert._base_config(str(own)) == {"train": {"seed": 7}}
    ckpt = tmp_path / "in.pth.tar"
    torch.save(official_checkpoint(), ckpt)
    err = _convert_error(capsys, ckpt, tmp_path / "out", "--config", str(tmp_path / "missing.json"))
    assert "missing.json" in err and "does not exist" in err
