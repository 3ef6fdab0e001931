"""Monitoring: the RankMe collapse measure, the online linear probe, TensorBoard's default and W&B.

- RankMe against a float64 numpy reference on random matrices of known rank, and the logged
  ``target_rankme`` against the reference on the very features of the logged step (computed on logging
  steps only);
- the online probe: a step's encoder and predictor gradients (and the weights after it) are bitwise those
  of a run without the probe; it learns separable data; ``online_probe_top1`` is logged per window; its
  state comes back on ``--resume``;
- TensorBoard: off without a word when not installed and not asked for; asked for and missing, exit 2;
- W&B: with the real package in offline mode when it is installed (calls spied on), and always with a fake
  module that records the calls (project, config, steps, resume of the same run); asked for and missing,
  exit 2.
"""
from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import numpy as np
import pytest
import torch

from fastjepa.cli import train_main
from fastjepa.config import load_config
from fastjepa.train import Trainer
from fastjepa.train import metrics as metrics_mod
from fastjepa.train import step as step_mod
from fastjepa.train.metrics import RANKME_EPS, rankme
from fastjepa.train.online_probe import PROBE_FILE, OnlineProbe, count_classes


def rankme_reference(z: np.ndarray, eps: float = RANKME_EPS) -> float:
    """Garrido et al. 2023, eq. 1, in float64: p_k = sigma_k / ||sigma||_1 + eps, exp(-sum p_k log p_k)."""
    sigma = np.linalg.svd(z.astype(np.float64), compute_uv=False)
    p = sigma / sigma.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def matrix_of_rank(n: int, d: int, rank: int, rng, spectrum=None) -> np.ndarray:
    u, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((d, rank)))
    s = rng.uniform(0.5, 5.0, rank) if spectrum is None else np.asarray(spectrum, dtype=np.float64)
    return (u * s) @ v.T


# ---- RankMe -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, d, rank", [(64, 32, 32), (128, 96, 7), (40, 200, 40), (256, 64, 1), (33, 17, 5)])
def test_rankme_matches_float64_reference(n, d, rank):
    rng = np.random.default_rng(n * d + rank)
    z = matrix_of_rank(n, d, rank, rng)
    got = rankme(torch.from_numpy(z).float())
    assert got.dtype == torch.float32 and got.dim() == 0
    ref = rankme_reference(z)
    assert float(got) == pytest.approx(ref, rel=2e-4)
    assert ref <= rank + 0.01  # rank r matrices measure at most r (the eps terms add < 1e-4 here)


@pytest.mark.parametrize("rank", [1, 3, 10, 32])
def test_rankme_of_a_flat_spectrum_is_the_rank(rank):
    """Equal singular values: p_k = 1/r on r of them, RankMe = exp(log r) = r (up to the eps terms)."""
    z = matrix_of_rank(100, 48, rank, np.random.default_rng(rank), spectrum=[2.0] * rank)
    assert float(rankme(torch.from_numpy(z).float())) == pytest.approx(rank, rel=1e-3)


def test_rankme_of_degenerate_features():
    z = torch.randn(16, 8)
    z[3, 2] = float("nan")
    assert torch.isnan(rankme(z))
    assert float(rankme(torch.zeros(16, 8))) == pytest.approx(1.0, abs=1e-4)  # total collapse
    assert float(rankme(torch.ones(16, 8))) == pytest.approx(1.0, abs=1e-4)  # every row the same


def test_logged_rankme_is_the_logged_steps_pooled_target_features(tiny, tmp_path, monkeypatch, helpers):
    """target_rankme in metrics.jsonl = the float64 reference on h.mean(1) of the logged step's target
    forward; RankMe runs on logging steps only (2 of 6 steps at log_every=3)."""
    captured, calls = [], []
    original_rankme = step_mod.rankme
    monkeypatch.setattr(step_mod, "rankme", lambda z: calls.append(1) or original_rankme(z))
    trainer = Trainer(load_config(None, tiny + ["train.max_steps=6", "train.log_every=3"]), tmp_path / "run")
    forward = trainer.backend.target_forward
    trainer.backend.target_forward = lambda images: captured.append(forward(images)) or captured[-1]
    assert trainer.train() == 0
    assert len(calls) == 2
    records = helpers.read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [3, 6]
    for record, h in zip(records, (captured[2], captured[5])):
        ref = rankme_reference(h.double().mean(1).numpy())
        assert record["target_rankme"] == pytest.approx(ref, rel=1e-4)
        assert 1.0 <= record["target_rankme"] <= h.shape[0]


# ---- the online probe ---------------------------------------------------------------------------

def grads_of_one_step(cfg, folder):
    """(encoder + predictor gradients of step 1, weights after it, the trainer) of a fresh run."""
    trainer = Trainer(cfg, folder)
    batch = trainer.batches[(0, 0)]
    seen = {}
    update = trainer.backend.update

    def snapshot_then_update(found_inf):
        seen.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return update(found_inf)

    trainer.backend.update = snapshot_then_update
    trainer.train_step([batch], want_stats=True)
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    weights.update({"target." + n: p.detach().clone() for n, p in trainer.target.named_parameters()})
    return seen, weights, trainer


def test_probe_leaves_the_encoder_gradients_unchanged(tiny, tmp_path):
    """Bitwise on CPU fp32: the probe's own graph on detached features does not touch the run's."""
    off, w_off, _ = grads_of_one_step(load_config(None, tiny), tmp_path / "off")
    on, w_on, trainer = grads_of_one_step(load_config(None, tiny + ["train.online_probe=true"]), tmp_path / "on")
    assert trainer.probe is not None and trainer.probe.head.weight.abs().sum() > 0  # the probe did train
    assert on.keys() == off.keys() and any(k.startswith("encoder.") for k in on) and any(
        k.startswith("predictor.") for k in on)
    assert [k for k in on if not torch.equal(on[k], off[k])] == []
    assert [k for k in w_on if not torch.equal(w_on[k], w_off[k])] == []


def separable(means: np.ndarray, rng, batch=32, tokens=5):
    """Features [B, N, D] of Gaussian clusters around ``means`` [C, D] (every token of an image near its
    class mean), and their labels [B]."""
    labels = rng.integers(0, len(means), batch)
    h = means[labels][:, None, :] + rng.standard_normal((batch, tokens, means.shape[1]))
    return torch.from_numpy(h).float(), torch.from_numpy(labels)


def test_probe_learns_separable_data_and_counts_its_hits():
    """The probe reaches > 95 % on separable clusters; the window's hits are those of the head's logits
    before each update, recomputed here in float64 (batch-standardised features, then the linear layer)."""
    rng = np.random.default_rng(0)
    means = rng.standard_normal((4, 16)) * 3.0
    probe = OnlineProbe(16, 4)  # the default lr, 1e-2
    windows = []
    for size in (1, 50, 50, 50):  # the first window: one batch on the zero head
        expected = 0
        for _ in range(size):
            h, labels = separable(means, rng)
            w, b = probe.head.weight.detach().double(), probe.head.bias.detach().double()
            f = h.double().mean(1)
            f = (f - f.mean(0)) / (f.var(0, unbiased=False) + probe.norm.eps).sqrt()  # batch statistics
            expected += int(((f @ w.T + b).argmax(1) == labels).sum())
            probe.update(h, labels)
        correct, loss_sum, seen = probe.take_window()
        assert int(correct) == expected and seen == size * 32
        windows.append((int(correct) / seen, float(loss_sum) / seen))
    assert windows[0][1] == pytest.approx(np.log(4), rel=1e-6)  # uniform logits: cross-entropy log C
    assert windows[0][0] < 0.5 and windows[-1][0] > 0.95, windows
    assert windows[-1][1] < windows[0][1] / 10, windows
    assert probe.take_window()[2] == 0  # a fresh window


def test_probe_top1_is_logged_per_window(tiny, tmp_path, helpers):
    """online_probe_every=2: the probe trains on steps 1, 3 (of 1-4); a window without a probe step logs null."""
    args = tiny + ["train.max_steps=4", "train.online_probe=true", "train.online_probe_every=2"]
    assert train_main(["--output-dir", str(tmp_path / "run")] + args) == 0
    records = helpers.read_metrics(tmp_path / "run")
    top1 = [r["online_probe_top1"] for r in records]
    assert top1[1] is None and top1[3] is None
    assert all(0.0 <= v <= 1.0 for v in (top1[0], top1[2]))
    assert records[0]["online_probe_loss"] == pytest.approx(np.log(10), rel=1e-5)  # zero head: uniform over 10


def test_probe_state_comes_back_on_resume(tiny, tmp_path):
    cfg = load_config(None, tiny + ["train.max_steps=3", "train.online_probe=true"])
    first = Trainer(cfg, tmp_path / "run")
    assert first.train() == 0
    saved = torch.load(tmp_path / "run" / "checkpoints" / PROBE_FILE, weights_only=True)
    assert saved["step"] == 3
    assert torch.equal(saved["head"]["weight"], first.probe.head.weight.detach())
    again = Trainer(load_config(None, tiny + ["train.max_steps=5", "train.online_probe=true"]), tmp_path / "run",
                    resume=True)
    assert again.step == 3
    assert torch.equal(again.probe.head.weight, first.probe.head.weight)
    assert again.probe.optimizer.state_dict()["state"][0]["step"] == 3


def test_probe_needs_labels(tiny, tmp_path, helpers, image_tree, capsys):
    assert count_classes(load_config(None, tiny)) == 10  # synthetic: label = index mod 10
    assert count_classes(load_config(None, tiny + ["data.dataset=folder", f"data.root={image_tree}"])) == 2
    assert count_classes(load_config(None, tiny + ["data.dataset=fashion-mnist"])) == 10
    flat = tmp_path / "flat"
    for i in range(8):
        helpers.make_image(flat / f"{i}.png", (20, 20), "RGB", seed=i)
    cfg = load_config(None, tiny + ["data.dataset=folder", f"data.root={flat}", "data.loader=torch",
                                    "train.online_probe=true"])
    assert Trainer(cfg, tmp_path / "run").probe is None
    assert "the online probe is off" in capsys.readouterr().err


# ---- TensorBoard and W&B --------------------------------------------------------------------------

def pretend_missing(monkeypatch, *names):
    real = metrics_mod.importlib.util.find_spec
    monkeypatch.setattr(metrics_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name in names else real(name, *a))


def test_tensorboard_default_is_silent_when_not_installed(tiny, tmp_path, monkeypatch, capsys):
    pretend_missing(monkeypatch, "tensorboard")
    args = [a for a in tiny if not a.startswith("train.tensorboard")] + ["train.max_steps=1"]
    assert train_main(["--output-dir", str(tmp_path / "run")] + args) == 0
    assert "tensorboard" not in capsys.readouterr().err.lower()
    assert not (tmp_path / "run" / "tensorboard").exists()


@pytest.mark.parametrize("key, package", [("train.tensorboard=true", "tensorboard"),
                                          ('train.wandb={"project":"p","mode":"offline"}', "wandb")])
def test_asked_for_but_not_installed_exits_2(tiny, tmp_path, monkeypatch, capsys, key, package):
    pretend_missing(monkeypatch, package)
    assert train_main(["--output-dir", str(tmp_path / "run")] + tiny + [key]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fastjepa: error: {key.split('=')[0]}=") and package in err[0], err


def test_tensorboard_writes_events_when_installed(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    args = [a for a in tiny if not a.startswith("train.tensorboard")] + ["train.max_steps=2"]
    assert train_main(["--output-dir", str(tmp_path / "run")] + args) == 0
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


class FakeRun:
    def __init__(self, calls, run_id):
        self.calls, self.id = calls, run_id

    def log(self, data, step=None):
        self.calls.append(("log", step, dict(data)))

    def finish(self):
        self.calls.append(("finish",))


def fake_wandb(calls):
    """A stand-in ``wandb`` module that records init/log/finish."""
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun(calls, kwargs.get("id") or "fake1234")

    module.init = init
    return module


def test_wandb_logs_the_config_and_every_record(tiny, tmp_path, monkeypatch, helpers):
    """With a fake module: rank 0 opens one run with the resolved config, logs each record at its step,
    finishes; ``--resume`` continues the same run id."""
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    out = tmp_path / "run"
    args = tiny + ['train.wandb={"project":"jepa","entity":"lab","mode":"offline"}', "train.checkpoint_every=2"]
    assert train_main(["--output-dir", str(out)] + args + ["train.max_steps=3"]) == 0
    init = calls[0][1]
    assert calls[0][0] == "init" and calls[-1] == ("finish",)
    assert (init["project"], init["entity"], init["mode"], init["name"], init["dir"]) == (
        "jepa", "lab", "offline", "run", str(out))
    assert init["config"] == json.loads((out / "config.json").read_text())
    logs = [c for c in calls if c[0] == "log"]
    records = helpers.read_metrics(out)
    assert [c[1] for c in logs] == [r["step"] for r in records] == [1, 2, 3]
    assert [c[2]["loss"] for c in logs] == [r["loss"] for r in records]
    assert "target_rankme" in logs[0][2] and "step" not in logs[0][2]
    assert (out / "wandb_run_id").read_text().strip() == "fake1234"

    calls.clear()
    assert train_main(["--output-dir", str(out), "--resume"] + args + ["train.max_steps=4"]) == 0
    assert calls[0][1]["id"] == "fake1234" and calls[0][1]["resume"] == "allow"
    assert [c[1] for c in calls if c[0] == "log"] == [4]


def test_wandb_offline_with_the_real_package(tiny, tmp_path, monkeypatch, helpers):
    """The installed wandb, offline (no network): the run's files land under OUTPUT/wandb; init and log
    are spied on to check what went in."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    seen = {"init": [], "log": []}
    real_init = wandb.init

    def spy_init(**kwargs):
        run = real_init(**kwargs)
        seen["init"].append(kwargs)
        real_log = run.log
        run.log = lambda data, step=None: seen["log"].append(step) or real_log(data, step=step)
        return run

    monkeypatch.setattr(wandb, "init", spy_init)
    out = tmp_path / "run"
    assert train_main(["--output-dir", str(out)] + tiny + ["train.max_steps=2", "train.wandb=fastjepa-test"]) == 0
    assert seen["log"] == [1, 2]
    assert seen["init"][0]["config"]["train"]["wandb"]["project"] == "fastjepa-test"
    run_id = (out / "wandb_run_id").read_text().strip()
    assert list((out / "wandb").glob(f"offline-run-*-{run_id}"))
