"""The trainer end to end on a tiny model: exact resume, SIGTERM, skipped non-finite steps, metrics and
exports, gradient accumulation and clipping, and the errors a user sees for bad input."""
from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open

from fastjepa.cli import train_main as main
from fastjepa.cli import train_parser
from fastjepa.config import load_config
from fastjepa.data import loader as loader_mod
from fastjepa.io.files import newest_checkpoint_file as latest_checkpoint
from fastjepa.io.files import read_weights
from fastjepa.models import build_encoder
from fastjepa.train import Trainer

METRIC_KEYS = {"step", "epoch", "loss", "lr", "wd", "momentum", "grad_norm", "images_per_s", "data_wait_s",
               "context_tokens", "target_tokens", "skipped_images", "skipped_steps"}


def load_checkpoint(path) -> dict:
    return read_weights(path)[0]


def parse_args(argv):
    return train_parser().parse_args(argv)


def read_metrics(output_dir):
    """metrics.jsonl, parsed as strict JSON (NaN/Infinity are not JSON and fail here)."""
    def reject(constant):
        raise ValueError(f"non-JSON constant {constant} in metrics.jsonl")

    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=reject) for line in lines if line.strip()]


def reference_loss(pred, h, index):
    """I-JEPA loss re-derived: layer_norm (no affine, the official eps 1e-5) of the target rows, smooth-L1 (beta 1)."""
    rows = h.reshape(-1, h.shape[-1])[index.long()]
    return F.smooth_l1_loss(pred, F.layer_norm(rows, rows.shape[-1:], eps=1e-5), beta=1.0)


def micro_loss_and_grads(model, target, batch):
    """Loss and gradients of one micro-batch on copies of the models (the trainer's state is untouched)."""
    model, target = copy.deepcopy(model), copy.deepcopy(target)
    with torch.no_grad():
        h = target(batch.images)
    loss = reference_loss(model(batch.images, batch.masks), h, batch.masks.tgt_index)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def total_norm(tensors):
    return torch.linalg.vector_norm(torch.stack([t.norm() for t in tensors])).item()


class NaNBatches(torch.utils.data.Dataset):
    """Wraps the trainer's batch dataset: micro-steps in ``bad`` (or >= ``bad_from``) get NaN images.
    Records every key requested."""

    def __init__(self, inner, bad=(), bad_from=None):
        self.inner, self.bad, self.bad_from, self.keys = inner, set(bad), bad_from, []
        self.steps_per_epoch = inner.steps_per_epoch

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, key):
        self.keys.append(tuple(key))
        batch = self.inner[key]
        micro = key[0] * self.steps_per_epoch + key[1]
        if micro in self.bad or (self.bad_from is not None and micro >= self.bad_from):
            batch.images = torch.full_like(batch.images, float("nan"))
        return batch


def snapshot(trainer):
    """Copies of everything a skipped step must leave alone."""
    opt = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizer.state.items()}
    return ([p.detach().clone() for p in trainer.model.parameters()],
            [p.detach().clone() for p in trainer.target.parameters()], opt)


# ---- resume -------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [
    ["train.precision=fp32", "optim.warmup_steps=2"],
    ["train.precision=bf16", "train.grad_accum_steps=2", "optim.clip_grad=0.5"],
], ids=["fp32", "bf16-accum2-clip"])
def test_resume_continues_exactly(tmp_path, tiny, monkeypatch, capsys, extra):
    """2N steps in one go == N steps, stop (as on SIGTERM), ``--resume`` for N more: same per-step losses
    (1e-6), same final target encoder."""
    n = 3
    args = tiny + extra + [f"train.max_steps={2 * n}"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["--output-dir", str(full)] + args) == 0

    original = Trainer.train_step

    def stop_after_n(self, *a, **k):  # what the SIGTERM handler does, at a chosen step
        out = original(self, *a, **k)
        if self.step == n:
            self.stop.signal = signal.SIGTERM
        return out

    monkeypatch.setattr(Trainer, "train_step", stop_after_n)
    assert main(["--output-dir", str(split)] + args) == 0
    monkeypatch.setattr(Trainer, "train_step", original)
    assert latest_checkpoint(split / "checkpoints").name == f"step_{n:08d}.pt"
    assert [r["step"] for r in read_metrics(split)] == list(range(1, n + 1))

    capsys.readouterr()
    assert main(["--output-dir", str(split), "--resume"] + args) == 0
    assert f"at step {n}" in capsys.readouterr().err

    a, b = read_metrics(full), read_metrics(split)
    assert [r["step"] for r in b] == list(range(1, 2 * n + 1))
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6), ra["step"]
        assert (ra["lr"], ra["wd"], ra["momentum"]) == (rb["lr"], rb["wd"], rb["momentum"])
    ta = load_file(full / "target_encoder.safetensors")
    tb = load_file(split / "target_encoder.safetensors")
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-6)


def test_resume_without_checkpoint_starts_at_zero(tmp_path, tiny, capsys):
    assert main(["--output-dir", str(tmp_path), "--resume", "train.max_steps=1"] + tiny) == 0
    assert "found no checkpoint" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]


# ---- outputs ------------------------------------------------------------------------------------

def test_metrics_config_and_target_export(tmp_path, tiny):
    args = tiny + ["train.max_steps=3"]
    assert main(["--output-dir", str(tmp_path)] + args) == 0
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert METRIC_KEYS <= set(r), METRIC_KEYS - set(r)
        assert r["images_per_s"] > 0 and r["context_tokens"] > 0 and r["target_tokens"] > 0
        assert r["skipped_images"] == 0 and r["skipped_steps"] == 0

    cfg = load_config(None, args)
    assert json.loads((tmp_path / "config.json").read_text()) == cfg.to_dict()

    path = tmp_path / "target_encoder.safetensors"
    encoder = build_encoder(cfg.model)
    encoder.load_state_dict(load_file(path), strict=True)  # loads into a fresh encoder
    with safe_open(path, "pt") as f:
        assert f.metadata()["step"] == "3"
        assert json.loads(f.metadata()["config"]) == cfg.to_dict()
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))
    for k, v in encoder.state_dict().items():
        torch.testing.assert_close(v, ckpt["target"][k], rtol=0, atol=0)
    # and the exported encoder runs: [B, N, D] features
    with torch.no_grad():
        out = encoder(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 16, 32) and torch.isfinite(out).all()


def test_schedule_steps_stops_early_on_a_longer_runs_schedule(tmp_path, tiny):
    """max_steps=3 with schedule_steps=6 is the first half of a 6-step run: the same lr, wd, momentum
    and losses step by step; without schedule_steps the 3-step run anneals on its own, shorter schedule."""
    base = tiny + ["optim.warmup_steps=1", "train.log_every=1"]
    keys = ("lr", "wd", "momentum", "loss")
    assert main(["--output-dir", str(tmp_path / "long")] + base + ["train.max_steps=6"]) == 0
    assert main(["--output-dir", str(tmp_path / "early")] + base + ["train.max_steps=3", "train.schedule_steps=6"]) == 0
    assert main(["--output-dir", str(tmp_path / "short")] + base + ["train.max_steps=3"]) == 0
    long, early, short = (read_metrics(tmp_path / name) for name in ("long", "early", "short"))
    assert len(early) == 3
    for a, b in zip(long, early):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    assert short[-1]["lr"] < early[-1]["lr"] and short[-1]["momentum"] > early[-1]["momentum"]


# ---- non-finite steps ---------------------------------------------------------------------------

def test_nonfinite_step_is_skipped(tmp_path, tiny):
    """A NaN batch: nothing changes (weights, target, AdamW state), the step is counted, training goes on."""
    cfg = load_config(None, tiny + ["train.max_steps=5"])
    trainer = Trainer(cfg, tmp_path)
    trainer.data.batches = NaNBatches(trainer.data.batches, bad={2})
    snaps = {}
    original = trainer.train_step

    def recording(micro, want_stats=False):
        before = snapshot(trainer)
        out = original(micro, want_stats)
        snaps[trainer.step] = (before, snapshot(trainer))
        return out

    trainer.train_step = recording
    assert trainer.train() == 0

    (m0, t0, o0), (m1, t1, o1) = snaps[3]  # step 3 consumed micro-step 2
    assert all(torch.equal(a, b) for a, b in zip(m0, m1))
    assert all(torch.equal(a, b) for a, b in zip(t0, t1))
    for pid in o0:
        for k in o0[pid]:
            assert torch.equal(o0[pid][k], o1[pid][k]), k
    for step in (2, 4):  # good steps do change the weights and the target
        (m0, t0, _), (m1, t1, _) = snaps[step]
        assert not all(torch.equal(a, b) for a, b in zip(m0, m1))
        assert not all(torch.equal(a, b) for a, b in zip(t0, t1))
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()

    records = read_metrics(tmp_path)
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1]
    assert records[2]["loss"] is None or records[2]["loss"] != records[2]["loss"]  # not a number
    assert all(isinstance(r["loss"], float) for i, r in enumerate(records) if i != 2)


def test_window_with_a_skipped_step_logs_the_finite_mean(tmp_path, tiny):
    """log_every=4 with micro-step 1 NaN: the record's loss is the mean of the three finite steps."""
    cfg = load_config(None, tiny + ["train.max_steps=4", "train.log_every=4"])
    trainer = Trainer(cfg, tmp_path)
    trainer.data.batches = NaNBatches(trainer.data.batches, bad={1})
    losses = []
    original = trainer.train_step

    def recording(micro, want_stats=False):
        out = original(micro, want_stats)
        losses.append(float(out["loss"]))
        return out

    trainer.train_step = recording
    assert trainer.train() == 0
    (record,) = read_metrics(tmp_path)
    assert record["skipped_steps"] == 1 and losses[1] != losses[1]
    finite = [x for x in losses if x == x]
    assert len(finite) == 3 and record["loss"] == pytest.approx(sum(finite) / 3, rel=1e-6)


@pytest.mark.parametrize("log_every,k", [(1, 3), (4, 2)])
def test_nonfinite_run_stops_with_checkpoint(tmp_path, tiny, monkeypatch, capsys, log_every, k):
    """K non-finite steps in a row stop the run: exit code 3, a checkpoint equal to the last good state."""
    first_bad = 2  # micro-step 2 = step 3
    real = loader_mod.build_batches
    monkeypatch.setattr(loader_mod, "build_batches",
                        lambda *a, **kw: NaNBatches(real(*a, **kw), bad_from=first_bad))
    args = tiny + ["train.max_steps=30", "train.checkpoint_every=2", "train.keep_checkpoints=5", f"train.log_every={log_every}",
                   f"train.max_nonfinite_steps={k}"]
    assert main(["--output-dir", str(tmp_path)] + args) == 3
    err = capsys.readouterr()
    assert "max_nonfinite_steps" in err.out + err.err

    last = latest_checkpoint(tmp_path / "checkpoints")
    stopped = int(last.stem.split("_")[1])
    check_every = min(log_every, k)
    assert first_bad + k <= stopped < first_bad + k + check_every
    state = load_checkpoint(last)
    assert state["step"] == stopped and int(state["nonfinite_run"]) == stopped - first_bad
    assert int(state["skipped_steps"]) == stopped - first_bad
    good = load_checkpoint(tmp_path / "checkpoints" / "step_00000002.pt")  # the last good step
    for part in ("model", "target"):
        for key, value in good[part].items():
            assert torch.equal(value, state[part][key]), (part, key)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


# ---- accumulation and clipping ------------------------------------------------------------------

def capture_grads(trainer):
    """Patch the optimizer so each step records the gradients it was given."""
    seen = []
    step = trainer.optimizer.step

    def recording(*a, **k):
        seen.append([p.grad.clone() for p in trainer.backend.grad_params])
        return step(*a, **k)

    trainer.optimizer.step = recording
    return seen


def test_grad_accumulation(tmp_path, tiny):
    """accum=2: logged loss = mean of the two micro losses, gradient = mean of the two micro gradients,
    one optimizer step per two micro-batches."""
    cfg = load_config(None, tiny + ["train.grad_accum_steps=2", "train.max_steps=3"])
    trainer = Trainer(cfg, tmp_path)
    b0, b1 = trainer.batches[(0, 0)], trainer.batches[(0, 1)]
    (l0, g0), (l1, g1) = (micro_loss_and_grads(trainer.model, trainer.target, b) for b in (b0, b1))
    seen = capture_grads(trainer)
    out = trainer.train_step([b0, b1], want_stats=True)
    assert trainer.step == 1 and len(seen) == 1
    assert out["loss"].item() == pytest.approx((l0 + l1) / 2, abs=1e-6)
    for got, a, b in zip(seen[0], g0, g1):
        torch.testing.assert_close(got, (a + b) / 2, rtol=1e-5, atol=1e-8)
    assert out["grad_norm"].item() == pytest.approx(total_norm([(a + b) / 2 for a, b in zip(g0, g1)]), rel=1e-5)

    # the loop: 3 optimizer steps read micro-batches 0..5 in order (it resumes at micro-step 2 = step 1)
    trainer.data.batches = NaNBatches(trainer.data.batches)
    assert trainer.train() == 0
    assert trainer.data.batches.keys == [(0, m) for m in range(2, 6)]
    assert len(seen) == 3
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 3]


@pytest.mark.parametrize("checkpointing", ["off", "non_reentrant"])
def test_compiled_blocks_train_like_eager(tmp_path, tiny, checkpointing):
    """train.compile=true (torch.compile per block, inductor) and activation checkpointing change the
    speed, not the run: 3 steps give the eager losses and weights (fp32, inductor reorders sums: 1e-5)."""
    runs = {}
    for compiled in (False, True):
        cfg = load_config(None, tiny + ["train.precision=fp32", f"train.compile={str(compiled).lower()}",
                                        f"model.activation_checkpointing={checkpointing if compiled else 'off'}"])
        trainer = Trainer(cfg, tmp_path / str(compiled))
        losses = [trainer.train_step([trainer.batches[(0, s)]])["loss"].item() for s in range(3)]
        runs[compiled] = losses, [p.detach().clone() for p in trainer.model.parameters()]
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for got, want in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_grad_clipping(tmp_path, tiny):
    """optim.clip_grad: grad_norm reported is the pre-clip norm; the optimizer sees grads of norm clip."""
    clip = 1e-3
    cfg = load_config(None, tiny + [f"optim.clip_grad={clip}", "train.max_steps=100"])
    trainer = Trainer(cfg, tmp_path)
    batch = trainer.batches[(0, 0)]
    _, ref = micro_loss_and_grads(trainer.model, trainer.target, batch)
    ref_norm = total_norm(ref)
    assert ref_norm > 10 * clip
    seen = capture_grads(trainer)
    before = [p.detach().clone() for p in trainer.backend.grad_params]
    out = trainer.train_step([batch], want_stats=True)
    assert out["grad_norm"].item() == pytest.approx(ref_norm, rel=1e-5)  # pre-clip
    assert total_norm(seen[0]) == pytest.approx(clip, rel=1e-4)
    for got, r in zip(seen[0], ref):
        torch.testing.assert_close(got, r * (clip / ref_norm), rtol=1e-4, atol=1e-10)
    # AdamW's first step moves each weight by at most lr (plus decoupled weight decay)
    lr, wd = out["lr"], out["wd"]
    for p0, p1, group_wd in zip(before, trainer.backend.grad_params, _wd_per_param(trainer, wd)):
        step = (p1.detach() - p0 * (1 - lr * group_wd)).abs().max().item()
        assert step <= lr * (1 + 1e-3)


def _wd_per_param(trainer, wd):
    per = {}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            per[id(p)] = group["weight_decay"]
    return [per[id(p)] for p in trainer.backend.grad_params]


# ---- SIGTERM ------------------------------------------------------------------------------------

@pytest.mark.subprocess
def test_sigterm_checkpoints_and_exits_zero(tmp_path, tiny, helpers, capsys):
    out = tmp_path / "run"
    args = tiny + ["train.max_steps=100000", "data.num_workers=1"]
    proc = subprocess.Popen([sys.executable, "-m", "fastjepa.train", "--output-dir", str(out)] + args,
                            env=helpers.subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 60
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no metrics line within 60 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "signal 15" in stdout + stderr
    last = latest_checkpoint(out / "checkpoints")
    assert last is not None
    stopped = load_checkpoint(last)["step"]
    assert stopped >= 1 and read_metrics(out)[-1]["step"] == stopped

    capsys.readouterr()
    args[args.index("train.max_steps=100000")] = f"train.max_steps={stopped + 2}"
    assert main(["--output-dir", str(out), "--resume"] + args) == 0
    assert f"at step {stopped}" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(out)][-3:] == [stopped, stopped + 1, stopped + 2]


# ---- command line ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["--local_rank=1", "--config", "c.json", "--output-dir", "d", "train.max_steps=3", "optim.lr=1e-4"],
    ["--config", "c.json", "--output-dir", "d", "--local-rank", "1", "train.max_steps=3", "optim.lr=1e-4"],
])
def test_command_line_accepts_the_launchers_local_rank(argv):
    """The DeepSpeed launcher puts ``--local_rank=N`` first; torchrun-style launchers use ``--local-rank``."""
    args = parse_args(argv)
    assert (args.local_rank, args.config, args.output_dir) == (1, "c.json", "d")
    assert args.overrides == ["train.max_steps=3", "optim.lr=1e-4"] and not args.resume


# ---- bad input: clear errors, exit code 2 -------------------------------------------------------

def test_missing_data_root(tmp_path, tiny, capsys):
    missing = tmp_path / "no_such_folder"
    assert main(["--output-dir", str(tmp_path / "o")] + tiny + ["data.dataset=folder", f"data.root={missing}"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_empty_data_root(tmp_path, tiny, capsys):
    empty = tmp_path / "empty"
    (empty / "some_class").mkdir(parents=True)
    (empty / "some_class" / "notes.txt").write_text("not an image")
    assert main(["--output-dir", str(tmp_path / "o")] + tiny + ["data.dataset=folder", f"data.root={empty}"]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no images" in err


def test_folder_needs_root(tmp_path, tiny, capsys):
    assert main(["--output-dir", str(tmp_path / "o")] + tiny + ["data.dataset=folder"]) == 2
    assert "data.root" in capsys.readouterr().err


def test_unknown_key_names_the_closest(tmp_path, tiny, capsys):
    assert main(["--output-dir", str(tmp_path / "o")] + tiny + ["model.embd_dim=32"]) == 2
    err = capsys.readouterr().err
    assert "model.embd_dim" in err and "model.embed_dim" in err

    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"train": {"max_step": 3}}))
    assert main(["--config", str(config), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "train.max_step" in err and "train.max_steps" in err


def test_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert main(["--config", str(missing), "--output-dir", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_bad_value_names_the_key(tmp_path, tiny, capsys):
    assert main(["--output-dir", str(tmp_path / "o")] + tiny + ["train.batch_size=0"]) == 2
    assert "train" in capsys.readouterr().err
    assert main(["--output-dir", str(tmp_path / "o")] + tiny + ["model.img_size=18"]) == 2
    assert "img_size" in capsys.readouterr().err
