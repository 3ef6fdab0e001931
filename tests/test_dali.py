"""The DALI loader (CPU pipelines, ``device_id=None``) against the torch loader on generated image trees:
shapes and value statistics, every file once per epoch over 2 shards, the same masks for a seed, exact
resume mid-epoch, bad files skipped and counted, and the choice between loaders."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (pip install nvidia-dali-cuda120)")

from fastjepa.config import load_config  # noqa: E402
from fastjepa.data import dali as dali_mod  # noqa: E402
from fastjepa.data.dali import DaliBatches, choose_loader, file_problem  # noqa: E402
from fastjepa.data.loader import build_batches  # noqa: E402

GRID = (4, 4)


def folder_config(helpers, root, *extra):
    return load_config(None, list(helpers.TINY) + [
        "data.dataset=folder", f"data.root={root}", "data.loader=dali", "data.num_workers=1", *extra])


def test_batches_match_the_torch_loader_in_shape_and_statistics(helpers, tmp_path):
    root = tmp_path / "tree"
    helpers.make_image_tree(root, per_class=16)
    cfg = folder_config(helpers, root)
    dali = DaliBatches(cfg, GRID)
    torch_batches = build_batches(cfg, GRID)
    got = [b.images for b in dali.iterate(0, 4)]
    want = [torch_batches[(0, s)].images for s in range(4)]
    assert all(g.shape == (8, 3, 16, 16) and g.dtype == torch.float32 and g.device.type == "cpu" for g in got)
    g, w = torch.cat(got), torch.cat(want)
    # different crops of the same images: per-channel statistics agree, not pixels
    assert (g.mean(dim=(0, 2, 3)) - w.mean(dim=(0, 2, 3))).abs().max() < 0.15
    assert ((g.std(dim=(0, 2, 3)) / w.std(dim=(0, 2, 3))) - 1).abs().max() < 0.15
    assert g.abs().max() < 3.0  # normalised with ImageNet statistics: [0, 1] maps into about [-2.2, 2.7]


def test_grayscale_models_get_one_channel(helpers, tmp_path):
    root = tmp_path / "tree"
    helpers.make_image_tree(root, per_class=8)
    cfg = folder_config(helpers, root, "model.in_chans=1")
    images = next(DaliBatches(cfg, GRID).iterate(0, 1)).images
    want = build_batches(cfg, GRID)[(0, 0)].images
    assert images.shape == want.shape == (8, 1, 16, 16)
    assert abs(float(images.mean() - want.mean())) < 0.2


def test_every_file_once_per_epoch_over_two_shards(helpers, tmp_path):
    root = helpers.one_file_per_class(tmp_path / "tree", 16)
    cfg = folder_config(helpers, root, "train.batch_size=4")
    shards = [DaliBatches(cfg, GRID, rank, 2) for rank in range(2)]
    assert [s.steps_per_epoch for s in shards] == [2, 2]
    epochs = []
    for epoch in range(2):
        labels = [b.labels for s in shards for b in s.iterate(epoch * 2, epoch * 2 + 2)]
        seen = torch.cat(labels).tolist()
        assert sorted(seen) == list(range(16)), seen
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new global shuffle every epoch


def test_same_masks_as_the_torch_loader(helpers, tmp_path):
    root = tmp_path / "tree"
    helpers.make_image_tree(root, per_class=16)
    cfg = folder_config(helpers, root, "train.batch_size=4")
    for rank in range(2):
        torch_batches = build_batches(cfg, GRID, rank, 2)
        for micro, batch in enumerate(DaliBatches(cfg, GRID, rank, 2).iterate(0, 5)):
            ref = torch_batches[divmod(micro, torch_batches.steps_per_epoch)].masks
            assert (batch.epoch, batch.step_in_epoch) == divmod(micro, torch_batches.steps_per_epoch)
            for field in ("ctx_index", "ctx_cu_seqlens", "tgt_index", "pred_src", "pred_pos"):
                assert torch.equal(getattr(batch.masks, field), getattr(ref, field)), (rank, micro, field)
            assert batch.masks.ctx_lens == ref.ctx_lens


def test_resume_mid_epoch_continues_with_the_same_batch(helpers, tmp_path):
    root = tmp_path / "tree"
    helpers.make_image_tree(root, per_class=16)
    cfg = folder_config(helpers, root, "train.batch_size=4")
    full = [b.images for b in DaliBatches(cfg, GRID).iterate(0, 6)]
    first = DaliBatches(cfg, GRID)
    for _ in first.iterate(0, 3):  # 3 of 8 batches of epoch 0
        pass
    state = first.state_dict()
    assert state["loader"] == "dali"
    again = [b.images for b in DaliBatches(cfg, GRID, state=state).iterate(3, 6)]
    for got, want in zip(again, full[3:]):
        assert torch.equal(got, want)
    assert not torch.equal(full[3], full[4])


def test_bad_files_are_decoded_or_skipped_and_counted(helpers, tmp_path):
    """Each README case: truncated JPEG and a text file named .jpg are skipped and counted; CMYK and
    grayscale JPEG, RGBA PNG, a tiny 8x8 and a large image decode; an empty class folder is harmless."""
    from PIL import Image

    root = tmp_path / "tree"
    helpers.make_image_tree(root, per_class=8)
    bad = root / "bad"
    good = helpers.make_image_tree(tmp_path / "src", per_class=1)[0]
    data = good.read_bytes()
    bad.mkdir()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (bad / "text.jpg").write_text("this is not an image")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 4), dtype=np.uint8), "CMYK").save(bad / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8), "L").save(bad / "gray.jpg")
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(bad / "tiny.png")
    Image.fromarray(rng.integers(0, 255, (30, 20, 4), dtype=np.uint8), "RGBA").save(bad / "rgba.png")
    Image.new("RGB", (3000, 2000), (120, 30, 200)).save(bad / "large.jpg")
    (root / "empty_class").mkdir()

    assert file_problem(bad / "truncated.jpg").startswith("truncated JPEG")
    assert file_problem(bad / "text.jpg").startswith("not a JPEG")
    for name in ("cmyk.jpg", "gray.jpg", "tiny.png", "rgba.png", "large.jpg"):
        assert file_problem(bad / name) is None, name

    cfg = folder_config(helpers, root, "train.batch_size=4")
    with pytest.warns(UserWarning, match="skipping 2 undecodable"):
        batches = DaliBatches(cfg, GRID)
    assert len(batches.files) == 16 + 5 and batches.steps_per_epoch == 5
    out = list(batches.iterate(0, 10))  # two epochs, every decodable file read
    assert sum(b.skipped for b in out) == 2  # counted once, in the first batch
    assert all(torch.isfinite(b.images).all() and b.images.shape == (4, 3, 16, 16) for b in out)


def test_a_batch_that_fails_to_decode_is_dropped_and_counted(helpers, tmp_path, monkeypatch):
    """A file that passes the cheap checks but still cannot be decoded (a JPEG whose middle is garbage)."""
    root = helpers.one_file_per_class(tmp_path / "tree", 8)
    target = next(root.glob("c01/*.jpg"))
    data = bytearray(target.read_bytes())
    data[20:-2] = b"\x00" * (len(data) - 22)  # header and end marker kept, entropy data destroyed
    target.write_bytes(bytes(data))
    cfg = folder_config(helpers, root, "train.batch_size=2")
    with pytest.warns(UserWarning, match="dropping an undecodable batch"):
        out = list(DaliBatches(cfg, GRID).iterate(0, 6))
    assert len(out) == 6 and sum(b.skipped for b in out) >= 2
    assert all(b.images.shape == (2, 3, 16, 16) for b in out)


def test_choose_loader(helpers, tmp_path, monkeypatch):
    root = tmp_path / "tree"
    helpers.make_image_tree(root)
    auto = load_config(None, ["data.dataset=folder", f"data.root={root}"])
    assert choose_loader(auto) == "dali"
    assert choose_loader(load_config(None, ["data.dataset=synthetic"])) == "torch"
    with pytest.raises(ValueError, match="DALI reads image folders"):
        choose_loader(load_config(None, ["data.dataset=synthetic", "data.loader=dali"]))
    monkeypatch.setattr(dali_mod, "DALI_AVAILABLE", False)
    assert choose_loader(auto) == "torch"
    with pytest.raises(ValueError, match="not installed"):
        choose_loader(load_config(None, ["data.dataset=folder", f"data.root={root}", "data.loader=dali"]))


def test_trainer_on_dali_resumes_exactly(helpers, tmp_path, capsys):
    """A 6-step run and a run resumed at step 3 log the same losses for steps 4-6 (the DALI pipeline
    state travels in the checkpoint)."""
    import shutil

    from fastjepa.train import Trainer

    root = tmp_path / "tree"
    helpers.make_image_tree(root, per_class=16)
    cfg = folder_config(helpers, root, "data.loader=auto", "train.max_steps=6", "train.checkpoint_every=3")
    full = tmp_path / "full"
    assert Trainer(cfg, full).train() == 0
    assert "data loader: NVIDIA DALI, decoding on the CPU" in capsys.readouterr().err
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    (resumed / "checkpoints" / "step_00000006.pt").unlink()
    (resumed / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (full / "metrics.jsonl").read_text().splitlines()[:3]))
    trainer = Trainer(cfg, resumed, resume=True)
    assert trainer.step == 3
    assert trainer.train() == 0
    want = [r["loss"] for r in helpers.read_metrics(full)]
    got = [r["loss"] for r in helpers.read_metrics(resumed)]
    assert got == pytest.approx(want, abs=1e-7) and len(got) == 6
    assert json.loads((full / "config.json").read_text())["data"]["loader"] == "auto"


def test_folder_of_only_undecodable_files_is_a_clear_error(helpers, tmp_path, capsys):
    from fastjepa.cli import train_main as main

    root = tmp_path / "broken"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            (root / c / f"{i:02d}.jpg").write_text("not an image\n")
    with pytest.warns(UserWarning, match="skipping 20 undecodable"):
        code = main(["--output-dir", str(tmp_path / "run")] + list(helpers.TINY)
                    + ["data.dataset=folder", f"data.root={root}", "data.loader=dali"])
    err = capsys.readouterr().err
    assert code == 2 and "0 decodable images" in err and "Traceback" not in err
