"""fastjepa.eval: kNN and linear probe against independent references, feature extraction and its cache,
and both command lines on a generated image folder.

- knn_scores vs scikit-learn's brute-force cosine NearestNeighbors and a numpy vote (DINO's recipe);
- probe_accuracy vs a scikit-learn StandardScaler + LogisticRegression fit here, top-5 counted by hand;
- pooled_features' last-4-block concatenation vs forward hooks on the blocks;
- extraction is independent of the batch size; the cache is hit for the same encoder and images and
  missed when either changes;
- ``python -m fastjepa.eval.linear_probe`` / ``knn`` on train/ and val/ folders give the numbers the
  references give on features computed image by image; bad arguments exit with code 2.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fastjepa.eval import features as F
from fastjepa.eval import knn, linear_probe

torch.set_num_threads(1)


def clustered(n_train=240, n_test=60, dim=16, classes=8, seed=0, dtype=np.float64):
    """Gaussian clusters around random class centres: far from chance, far from perfect."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    ytr, yte = rng.integers(0, classes, n_train), rng.integers(0, classes, n_test)
    xtr = centres[ytr] + 1.2 * rng.normal(size=(n_train, dim))
    xte = centres[yte] + 1.2 * rng.normal(size=(n_test, dim))
    return xtr.astype(dtype), ytr, xte.astype(dtype), yte


# ---- kNN ----------------------------------------------------------------------------------------------
def reference_knn_votes(xtr, ytr, xte, classes, k, temperature):
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(xtr))
    dist, idx = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(xtr).kneighbors(xte)
    votes = np.zeros((len(xte), classes))
    for row in range(len(xte)):
        for d, j in zip(dist[row], idx[row]):
            votes[row, ytr[j]] += np.exp((1.0 - d) / temperature)
    return votes


def ranked_hits(votes, labels, k):
    """Share of rows whose label is among the k highest-voted classes, by a plain loop."""
    hits = 0
    for row, label in zip(votes, labels):
        hits += label in sorted(range(len(row)), key=lambda c: -row[c])[:k]
    return 100.0 * hits / len(labels)


@pytest.mark.parametrize("k,temperature", [(20, 0.07), (5, 0.5), (500, 0.07)])
def test_knn_matches_sklearn_neighbours(k, temperature):
    xtr, ytr, xte, yte = clustered()
    votes = knn.knn_scores(xtr, ytr, xte, num_classes=8, k=k, temperature=temperature, chunk=7)
    expected = reference_knn_votes(xtr, ytr, xte, 8, k, temperature)
    np.testing.assert_allclose(votes, expected, rtol=1e-9, atol=0)
    acc = knn.knn_accuracy(xtr, ytr, xte, yte, k=k, temperature=temperature)
    assert acc["top1"] == pytest.approx(ranked_hits(expected, yte, 1))
    assert acc["top5"] == pytest.approx(ranked_hits(expected, yte, 5))
    assert 20 < acc["top1"] < 100  # neither chance (12.5 %) nor trivial: the test can tell


def test_knn_float32_features():
    xtr, ytr, xte, yte = clustered(dtype=np.float32)
    votes = knn.knn_scores(xtr, ytr, xte, num_classes=8)
    assert votes.dtype == np.float32
    np.testing.assert_allclose(votes, reference_knn_votes(xtr, ytr, xte, 8, 20, 0.07), rtol=2e-4)


# ---- probe --------------------------------------------------------------------------------------------
def test_probe_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xtr, ytr, xte, yte = clustered(seed=1)
    keep = ytr != 3  # a class absent from training: probe columns are not class ids any more
    xtr, ytr = xtr[keep], ytr[keep]
    acc = linear_probe.probe_accuracy(xtr, ytr, xte, yte, C=0.5, max_iter=500)

    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(C=0.5, max_iter=500).fit(scaler.transform(xtr), ytr)
    top1 = 100.0 * np.mean(clf.predict(scaler.transform(xte)) == yte)
    proba = clf.predict_proba(scaler.transform(xte))
    top5 = 100.0 * np.mean([label in clf.classes_[np.argsort(-p)[:5]] for p, label in zip(proba, yte)])
    assert acc["top1"] == pytest.approx(top1) and acc["top5"] == pytest.approx(top5)
    assert 30 < top1 < 100 and top5 > top1


def _sklearn_top1(xtr, ytr, xte, yte, C=1.0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(C=C, max_iter=2000).fit(scaler.transform(xtr), ytr)
    return 100.0 * np.mean(clf.predict(scaler.transform(xte)) == yte)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_probe_as_good_as_sklearn(seed):
    """The torch probe (grid over lr, chosen on a held-out 10 %) reaches scikit-learn's L-BFGS top-1 on
    clustered data (within one test image in 100), with top-5 above top-1."""
    xtr, ytr, xte, yte = clustered(n_train=1200, n_test=400, dim=24, classes=8, seed=seed, dtype=np.float32)
    acc = linear_probe.torch_probe(xtr, ytr, xte, yte, {"all": slice(None)}, epochs=30, batch_size=64, seed=seed)
    assert acc["top1"] >= _sklearn_top1(xtr, ytr, xte, yte) - 1.0, acc
    assert acc["top5"] > acc["top1"] and acc["lr"] in linear_probe.LEARNING_RATES and acc["features"] == "all"


def test_torch_probe_chooses_the_informative_features_on_held_out_data():
    """Two feature sets: only the first carries the class. The held-out split must pick it (and a labels
    set that is not 0..C-1 comes back as the test labels)."""
    xtr, ytr, xte, yte = clustered(n_train=800, n_test=200, dim=12, classes=4, seed=3, dtype=np.float32)
    rng = np.random.default_rng(0)
    noise_tr, noise_te = rng.normal(size=(len(xtr), 12)), rng.normal(size=(len(xte), 12))
    train = np.concatenate([xtr, noise_tr], 1).astype(np.float32)
    test = np.concatenate([xte, noise_te], 1).astype(np.float32)
    sets = {"noise": slice(12, None), "signal": slice(0, 12)}
    acc = linear_probe.torch_probe(train, ytr + 10, test, yte + 10, sets, epochs=20, batch_size=64)
    assert acc["features"] == "signal", acc
    # the lr is chosen on 80 held-out rows here: within 3 points of L-BFGS on the signal alone
    assert acc["top1"] >= _sklearn_top1(xtr, ytr, xte, yte) - 3.0
    assert acc["held_out_top1"] > 50  # chance is 25


def test_topk_accuracy_by_hand():
    scores = np.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    labels = np.array([2, 0, 0])
    assert F.topk_accuracy(scores, labels, ks=(1, 2)) == pytest.approx({"top1": 100 / 3, "top2": 200 / 3})
    assert F.topk_accuracy(scores, labels)["top5"] is None  # 3 classes: top-5 says nothing
    # columns that name classes 7, 8, 9
    assert F.topk_accuracy(scores, labels + 7, column_labels=[7, 8, 9], ks=(1,))["top1"] == pytest.approx(100 / 3)


# ---- features -------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_cfg(helpers):
    from fastjepa.config import build_config

    return build_config(helpers.tiny_config_dict(model={"depth": 4}))


@pytest.fixture
def encoder(tiny_cfg):
    from fastjepa.models import build_encoder

    torch.manual_seed(0)
    enc = build_encoder(tiny_cfg.model).eval()
    with torch.no_grad():  # affine final norm, so applying it or not shows
        enc.norm.weight.uniform_(0.5, 1.5)
        enc.norm.bias.uniform_(-0.5, 0.5)
    return enc


def test_last_layers_concatenation_matches_block_hooks(encoder):
    images = torch.randn(3, 3, 16, 16)
    outputs = []
    hooks = [b.register_forward_hook(lambda m, args, out: outputs.append(out)) for b in encoder.blocks]
    with torch.no_grad():
        final = encoder(images)  # [3, 16, 32]
        for h in hooks:
            h.remove()
        expected = torch.cat([encoder.norm(out).view(3, 16, 32).mean(1) for out in outputs[-4:]], dim=1)
        got4 = F.pooled_features(encoder, images, layers=4)
        got2 = F.pooled_features(encoder, images, layers=2)
        got1 = F.pooled_features(encoder, images, layers=1)
    torch.testing.assert_close(got4, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got2, expected[:, 64:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got1, final.mean(1))
    with pytest.raises(ValueError, match="1..4"):
        F.pooled_features(encoder, images, layers=5)


def test_extraction_batches_and_cache(encoder, image_tree, tmp_path, monkeypatch):
    from fastjepa.data.sources import ImageFolder
    from fastjepa.data.transforms import ImageTransform

    source, transform = ImageFolder(image_tree), ImageTransform(16, 3)
    by_image = np.stack([encoder(transform(source.load(i))[None]).mean(1)[0].detach().numpy()
                         for i in range(len(source))])
    for batch in (3, 64):
        got = F.extract_features(encoder, source, transform, batch_size=batch, progress=False)
        np.testing.assert_allclose(got, by_image, atol=1e-5, rtol=1e-5)

    cache = tmp_path / "cache"
    first, labels = F.cached_features(encoder, source, transform, cache, limit=10, progress=False)
    assert len(list(cache.glob("*.npz"))) == 1 and first.shape == (10, 32)
    np.testing.assert_array_equal(labels, source.labels[:10])

    def no_extraction(*a, **k):
        raise AssertionError("the cache should have answered")

    real_extract = F.extract_features_kept
    monkeypatch.setattr(F, "extract_features_kept", no_extraction)
    again, _ = F.cached_features(encoder, source, transform, cache, limit=10, progress=False)
    np.testing.assert_array_equal(again, first)

    calls = []
    monkeypatch.setattr(F, "extract_features_kept", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    F.cached_features(encoder, source, transform, cache, limit=10, layers=2, progress=False)  # other options
    with torch.no_grad():
        # other weights (random: a constant added to the residual stream would vanish in every LayerNorm)
        fc2 = encoder.blocks[0].mlp.fc2.weight
        fc2.add_(0.1 * torch.randn(fc2.shape, generator=torch.Generator().manual_seed(0)))
    changed, _ = F.cached_features(encoder, source, transform, cache, limit=10, progress=False)
    os.utime(source.files[3], ns=(0, 0))  # an image file changed
    F.cached_features(encoder, source, transform, cache, limit=10, progress=False)
    assert len(calls) == 3 and not np.allclose(changed, first)


def test_val_labels_follow_train_classes(tmp_path, helpers):
    helpers.make_image_tree(tmp_path / "data" / "train", per_class=2, classes=("ant", "bee", "cat"))
    helpers.make_image_tree(tmp_path / "data" / "val", per_class=2, classes=("cat",))
    train, val = F.folder_splits(tmp_path / "data")
    assert list(train.labels) == [0, 0, 1, 1, 2, 2] and list(val.labels) == [2, 2]
    helpers.make_image_tree(tmp_path / "data" / "val", per_class=1, classes=("dog",))
    with pytest.raises(ValueError, match="dog"):
        F.folder_splits(tmp_path / "data")


# ---- the command lines ---------------------------------------------------------------------------------
@pytest.fixture
def run_and_data(tmp_path, tiny_cfg, encoder, helpers):
    """A run directory holding ``encoder`` as target_encoder.safetensors, and a train/val image folder."""
    from fastjepa.io.files import export_safetensors

    run = tmp_path / "run"
    export_safetensors(run / "target_encoder.safetensors", encoder.state_dict(),
                       metadata={"config": json.dumps(tiny_cfg.to_dict())})
    data = tmp_path / "data"
    classes = ("a", "b", "c", "d", "e", "f")
    helpers.make_image_tree(data / "train", per_class=6, classes=classes)
    for c, name in enumerate(classes):  # val: other seeds than train
        for i in range(2):
            helpers.make_image(data / "val" / name / f"v{i}.png", (20, 20), "RGB", seed=1000 + 10 * c + i)
    return run, data


def _features_by_hand(encoder, root):
    from fastjepa.data.transforms import EvalTransform

    transform = EvalTransform(16, 3)
    classes = sorted(p.name for p in root.iterdir())
    xs, ys = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            from PIL import Image

            with Image.open(path) as img:
                xs.append(encoder(transform(img)[None]).mean(1)[0].detach().numpy())
            ys.append(label)
    return np.stack(xs), np.array(ys)


def _last_json(capsys):
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_cli_probe_and_knn_on_image_folder(run_and_data, encoder, tmp_path, capsys):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    run, data = run_and_data
    xtr, ytr = _features_by_hand(encoder, data / "train")
    xte, yte = _features_by_hand(encoder, data / "val")
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=1000).fit(scaler.transform(xtr), ytr)
    probe_top1 = 100.0 * np.mean(clf.predict(scaler.transform(xte)) == yte)

    out = tmp_path / "probe.json"
    assert linear_probe.main(["--checkpoint", str(run), "--data-root", str(data), "--output", str(out),
                              "--batch-size", "5", "--no-progress", "--backend", "sklearn"]) == 0
    result, err = _last_json(capsys)
    assert result["top1"] == pytest.approx(probe_top1, abs=0.01) and result["top5"] is not None
    assert result["train_images"] == 36 and result["test_images"] == 12 and result["feature_dim"] == 32
    assert json.loads(out.read_text()) == result
    assert "cached" not in err and list((run / "eval_cache").glob("*.npz"))

    votes = reference_knn_votes(xtr, ytr, xte, 6, 20, 0.07)
    assert knn.main(["--checkpoint", str(run), "--data-root", str(data), "--no-progress"]) == 0
    result, err = _last_json(capsys)
    assert "cached features" in err  # the probe's extraction is reused
    assert result["top1"] == pytest.approx(ranked_hits(votes, yte, 1), abs=0.01)
    assert result["top5"] == pytest.approx(ranked_hits(votes, yte, 5), abs=0.01)
    assert result["k"] == 20 and result["temperature"] == 0.07

    assert knn.main(["--checkpoint", str(run), "--data-root", str(data), "--layers", "4", "--k", "3",
                     "--no-cache", "--no-progress", "--train-limit", "10"]) == 0
    result, _ = _last_json(capsys)
    assert result["feature_dim"] == 128 and result["train_images"] == 10


def test_cli_random_init_from_config_only(tmp_path, tiny_cfg, helpers, capsys):
    """A run directory with only config.json (no checkpoint yet) can be probed at initialisation; its
    own data config (synthetic here) supplies the images."""
    run = tmp_path / "run"
    run.mkdir()
    raw = tiny_cfg.to_dict()
    raw["data"]["synthetic_size"] = 40
    (run / "config.json").write_text(json.dumps(raw))
    assert linear_probe.main(["--checkpoint", str(run), "--random-init", "--no-progress", "--no-cache"]) == 0
    result, _ = _last_json(capsys)
    assert result["encoder"] == "random-init" and result["train_images"] == 40 and result["top5"] is not None
    assert linear_probe.main(["--checkpoint", str(run), "--no-progress"]) == 2  # no weights yet
    assert "neither target_encoder.safetensors nor checkpoints" in capsys.readouterr().err


def test_cli_errors(run_and_data, tmp_path, capsys):
    run, data = run_and_data
    for tool in (linear_probe, knn):
        assert tool.main(["--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
        assert "does not exist" in capsys.readouterr().err
        assert tool.main(["--checkpoint", str(run), "--data-root", str(data / "train")]) == 2
        assert "needs train/ and val/" in capsys.readouterr().err
        assert tool.main(["--checkpoint", str(run), "--data-root", str(data), "--layers", "9", "--no-cache"]) == 2
        assert "layers must be in 1..4" in capsys.readouterr().err
    assert knn.main(["--checkpoint", str(run), "--data-root", str(data), "--k", "0"]) == 2
    assert "--k must be >= 1" in capsys.readouterr().err


def test_forward_intermediates_are_the_blocks_outputs(encoder):
    images = torch.randn(2, 3, 16, 16)
    outputs = []
    hooks = [b.register_forward_hook(lambda m, args, out: outputs.append(out)) for b in encoder.blocks]
    with torch.no_grad():
        final = encoder(images)
        for h in hooks:
            h.remove()
        got = encoder.forward_intermediates(images, 3)
    assert len(got) == 3
    for g, out in zip(got, outputs[-3:]):
        torch.testing.assert_close(g, encoder.norm(out).view(2, 16, 32))
    torch.testing.assert_close(got[-1], final)
    with pytest.raises(ValueError, match="1..4"):
        encoder.forward_intermediates(images, 0)


def test_eval_transform_resizes_the_short_side_then_centre_crops():
    """A horizontal ramp of 90 x 60 pixels: the short side goes to 16 * 256 / 224 = 18 px (the long one to
    27), and the centre 16 x 16 crop keeps columns 5.5 .. 21.5 of 27, i.e. x from 18.3 to 71.7 of 90."""
    from PIL import Image

    from fastjepa.data.transforms import EvalTransform, channel_stats

    width, height = 90, 60
    ramp = np.tile(np.linspace(0, 255, width), (height, 1)).astype(np.uint8)
    out = EvalTransform(16, 1)(Image.fromarray(ramp, "L"))
    assert out.shape == (1, 16, 16)
    mean, std = channel_stats(1)
    pixels = (out[0] * std[0] + mean[0]) * 255  # back to 0..255
    scale = 18 / 60
    left = round((round(width * scale) - 16) / 2)  # the crop's first column in the resized image
    for col in (0, 8, 15):
        x = (left + col + 0.5) / scale - 0.5  # that column's centre in the original
        expected = 255 * x / (width - 1)
        assert abs(float(pixels[:, col].mean()) - expected) < 4, (col, float(pixels[:, col].mean()), expected)
    assert torch.allclose(pixels[0], pixels[-1], atol=1)  # rows alike: no vertical distortion


def test_cli_unreadable_images_skipped_and_counted(run_and_data, capsys):
    run, data = run_and_data
    (data / "train" / "a" / "broken.png").write_bytes(b"not an image at all")
    (data / "val" / "b" / "cut.png").write_bytes(next((data / "val" / "b").glob("v0.png")).read_bytes()[:40])
    for tool, extra in ((linear_probe, ["--epochs", "2"]), (knn, [])):
        assert tool.main(["--checkpoint", str(run), "--data-root", str(data), "--no-progress", "--no-cache",
                          *extra]) == 0
        result, err = _last_json(capsys)
        assert result["train_images"] == 36 and result["test_images"] == 12 and result["skipped_images"] == 2
        assert "skipped 1 unreadable image(s)" in err and "broken.png" in err


def test_cli_one_class_is_one_line(tmp_path, run_and_data, helpers, capsys):
    run, _ = run_and_data
    data = tmp_path / "one"
    helpers.make_image_tree(data / "train", per_class=3, classes=("only",))
    helpers.make_image_tree(data / "val", per_class=1, classes=("only",))
    for tool in (linear_probe, knn):
        assert tool.main(["--checkpoint", str(run), "--data-root", str(data), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "1 class(es)" in err and "at least 2" in err, err


def test_cli_torch_probe_reports_the_chosen_setting(run_and_data, capsys):
    run, data = run_and_data
    assert linear_probe.main(["--checkpoint", str(run), "--data-root", str(data), "--no-progress",
                              "--epochs", "5"]) == 0
    result, _ = _last_json(capsys)
    assert result["backend"] == "torch" and result["layers"] == 4 and result["feature_dim"] == 128
    assert result["chosen"]["layers"] in (1, 4) and result["chosen"]["lr"] in linear_probe.LEARNING_RATES
    assert 0 <= result["top1"] <= 100


def test_extraction_shared_by_two_ranks_under_torchrun(run_and_data, tmp_path, capsys, helpers):
    """``torchrun --nproc_per_node 2`` (gloo, CPU): each rank extracts every other image, rank 0 gathers
    them back in order and alone reports; the kNN result equals one process's."""
    import socket
    import subprocess
    import sys

    run, data = run_and_data
    (data / "train" / "c" / "broken.png").write_bytes(b"garbage")  # skipped on whichever rank reads it
    args = ["--checkpoint", str(run), "--data-root", str(data), "--no-progress", "--no-cache", "--device", "cpu",
            "--layers", "2", "--k", "5"]
    assert knn.main(args) == 0
    alone, _ = _last_json(capsys)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = helpers.subprocess_env()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), "-m", "fastjepa.eval.knn", *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 alone reports
    shared = json.loads(lines[0])
    assert shared == alone
    assert shared["skipped_images"] == 1 and "2 ranks" in proc.stderr
