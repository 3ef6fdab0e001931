"""Data-parallel training through the DeepSpeed launcher: 2 CPU ranks (gloo), ZeRO stages 0, 1 and 2.

Each stage runs ``deepspeed --num_accelerators 2 fastjepa/train.py ...`` once (a module-scoped fixture,
~20 s each on 2 cores) through a small wrapper that, after ``Trainer.train``, dumps each rank's weights;
the tests then check:
- the losses are finite and fall; the two ranks hold bit-identical weights (model and target);
- step 1 matches an in-process reference: loss = mean of the two ranks' losses and grad_norm = the norm of
  the mean of their gradients (with gradient accumulation folded in for stage 1);
- stage 2: DeepSpeed checkpoints keep only ``keep_checkpoints`` tags, and ``--resume`` from the step-6 tag
  reproduces steps 7-8 and the final weights of the uninterrupted run.
Deselect with ``-m "not deepspeed"``. The first launch on a machine also JIT-builds DeepSpeed's CPU
shared-memory op (~1 min, cached in ~/.cache/torch_extensions).
"""
from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.deepspeed

try:
    import deepspeed  # noqa: F401
except Exception as err:  # noqa: BLE001 -- any import failure means: cannot test here
    pytest.skip(f"deepspeed is not importable ({err}); pip install deepspeed>=0.19", allow_module_level=True)

STEPS = 8
WORLD = 2

# Runs the real entry point (fastjepa/train.py, which receives --local_rank from the launcher) with
# Trainer.train wrapped to dump this rank's weights afterwards.
WRAPPER = textwrap.dedent("""
    import os, runpy, sys
    import torch
    import fastjepa.trainer as T

    def dump_after_train(self, _train=T.Trainer.train):
        code = _train(self)
        state = {"model." + k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        state.update({"target." + k: v.detach().cpu().clone() for k, v in self.target.state_dict().items()})
        torch.save(state, os.path.join(str(self.output_dir), f"rank{self.rank}_weights.pt"))
        return code

    T.Trainer.train = dump_after_train
    sys.argv[0] = os.environ["FASTJEPA_TRAIN_SCRIPT"]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def launcher() -> list[str]:
    """The ``deepspeed`` script of this interpreter's environment, else the one on PATH, else the module."""
    beside = Path(sys.executable).parent / "deepspeed"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("deepspeed")
    return [found] if found else [sys.executable, "-m", "deepspeed.launcher.runner"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_json(helpers, tmp: Path, stage: int, accum: int) -> Path:
    raw = helpers.tiny_config_dict(
        train={"max_steps": STEPS, "checkpoint_every": 2, "keep_checkpoints": 2, "grad_accum_steps": accum},
        deepspeed={"enabled": "auto", "zero_stage": stage},
    )
    path = tmp / "tiny.json"
    path.write_text(json.dumps(raw))
    return path


def launch(helpers, workdir: Path, config: Path, output: Path, *extra: str):
    wrapper = workdir / "wrapper.py"
    wrapper.write_text(WRAPPER)
    cmd = launcher() + ["--num_accelerators", str(WORLD), "--master_port", str(free_port()), str(wrapper),
                        "--config", str(config), "--output-dir", str(output), *extra]
    env = helpers.subprocess_env(DS_ACCELERATOR="cpu", FASTJEPA_TRAIN_SCRIPT=helpers.TRAIN_SCRIPT)
    proc = subprocess.run(cmd, env=env, cwd=helpers.REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


# stage 1 also accumulates 2 micro-batches per step
STAGES = {0: 1, 1: 2, 2: 1}


@pytest.fixture(scope="module", params=sorted(STAGES), ids=lambda s: f"zero{s}")
def ds_run(request, tmp_path_factory, helpers):
    """One 8-step run per ZeRO stage."""
    from types import SimpleNamespace

    stage, accum = request.param, STAGES[request.param]
    work = tmp_path_factory.mktemp(f"zero{stage}")
    config = tiny_json(helpers, work, stage, accum)
    output = work / "run"
    log = launch(helpers, work, config, output)
    return SimpleNamespace(stage=stage, accum=accum, config=config, output=output, work=work, log=log)


def rank_weights(output: Path):
    return [torch.load(output / f"rank{r}_weights.pt", weights_only=True) for r in range(WORLD)]


def test_ranks_agree_and_loss_falls(ds_run, helpers):
    records = helpers.read_metrics(ds_run.output)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in records]
    assert all(isinstance(x, float) and math.isfinite(x) for x in losses), losses
    third = STEPS // 3
    assert sum(losses[-third:]) / third < sum(losses[:third]) / third, losses
    assert all(r["skipped_steps"] == 0 and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in records)

    w0, w1 = rank_weights(ds_run.output)
    assert w0.keys() == w1.keys() and any(k.startswith("target.") for k in w0)
    different = [k for k in w0 if not torch.equal(w0[k], w1[k])]
    assert not different, f"ranks disagree on {different[:5]}"
    assert all(torch.isfinite(v).all() for v in w0.values())


def test_first_step_matches_two_rank_reference(ds_run, helpers):
    """Step 1 = one data-parallel step over both ranks' micro-batches: loss is their mean, the gradient
    (whose norm is logged, pre-clip) is the mean of their gradients."""
    import torch.nn.functional as F

    from fastjepa.config import load_config
    from fastjepa.data.loader import build_batches
    from fastjepa.trainer import build_models

    cfg = load_config(ds_run.config)
    torch.manual_seed(cfg.train.seed)
    model, target = build_models(cfg)
    losses, grads = [], []
    for rank in range(WORLD):
        batches = build_batches(cfg, model.encoder.grid, rank, WORLD)
        for micro in range(ds_run.accum):  # step 1 reads micro-steps 0 .. accum-1 on every rank
            batch = batches[divmod(micro, batches.steps_per_epoch)]
            model.zero_grad()
            with torch.no_grad():
                h = target(batch.images)
            rows = h.reshape(-1, h.shape[-1])[batch.masks.tgt_index.long()]
            loss = F.smooth_l1_loss(model(batch.images, batch.masks), F.layer_norm(rows, rows.shape[-1:], eps=1e-6))
            loss.backward()
            losses.append(loss.item())
            grads.append([p.grad.clone() for p in model.parameters()])
    mean_grad = [torch.stack(g).mean(0) for g in zip(*grads)]
    ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in mean_grad])).item()

    first = helpers.read_metrics(ds_run.output)[0]
    assert first["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-6)
    assert first["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
    rank0_only = torch.linalg.vector_norm(torch.stack([torch.stack(g[: ds_run.accum]).mean(0).norm()
                                                       for g in zip(*grads)])).item()
    assert abs(rank0_only - ref_norm) > 1e-5 * ref_norm  # the check can tell a missing all-reduce apart


def test_checkpoints_are_pruned_and_resume_is_exact(ds_run, helpers):
    if ds_run.stage != 2:
        pytest.skip("resume is exercised on ZeRO-2 (partitioned gradients and optimizer state) only, for time")
    folder = ds_run.output / "checkpoints" / "deepspeed"
    tags = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert tags == ["step_00000006", "step_00000008"]  # keep_checkpoints=2 of 4 saves
    assert (folder / "latest").read_text().strip() == "step_00000008"
    assert (folder / "step_00000006" / "mp_rank_00_model_states.pt").is_file()

    # the run as it was after step 6: tag 8 gone, latest -> 6, metrics up to 6
    resumed = ds_run.work / "resumed"
    shutil.copytree(ds_run.output, resumed)
    shutil.rmtree(resumed / "checkpoints" / "deepspeed" / "step_00000008")
    (resumed / "checkpoints" / "deepspeed" / "latest").write_text("step_00000006")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()[:6]
    (resumed / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for r in range(WORLD):
        (resumed / f"rank{r}_weights.pt").unlink()

    log = launch(helpers, ds_run.work, ds_run.config, resumed, "--resume")
    assert "at step 6" in log
    full, again = helpers.read_metrics(ds_run.output), helpers.read_metrics(resumed)
    assert [r["step"] for r in again] == list(range(1, STEPS + 1))
    for a, b in zip(full[6:], again[6:]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    w_full, w_again = rank_weights(ds_run.output)[0], rank_weights(resumed)
    for k in w_full:
        torch.testing.assert_close(w_again[0][k], w_full[k], rtol=0, atol=1e-6)
        assert torch.equal(w_again[0][k], w_again[1][k])


# A real SIGTERM delivered to one rank only (rank 1 signals itself after its third step): every rank must
# stop at the same step, write the collective checkpoint and exit 0 -- not hang in the checkpoint's
# collectives while the other rank trains on.
SIGNAL_ONE_RANK = textwrap.dedent("""
    import os, signal
    import fastjepa.trainer as T

    def step_then_signal(self, *a, _step=T.Trainer.train_step, **k):
        out = _step(self, *a, **k)
        if self.rank == 1 and self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    T.Trainer.train_step = step_then_signal
""")


def test_sigterm_on_one_rank_stops_all_ranks_at_one_step(tmp_path, helpers):
    config = tiny_json(helpers, tmp_path, stage=1, accum=1)
    output = tmp_path / "run"
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    launch_script = tmp_path / "signal_wrapper.py"
    launch_script.write_text(SIGNAL_ONE_RANK + WRAPPER)
    cmd = launcher() + ["--num_accelerators", str(WORLD), "--master_port", str(free_port()), str(launch_script),
                        "--config", str(config), "--output-dir", str(output), "train.max_steps=50",
                        "train.checkpoint_every=100"]
    env = helpers.subprocess_env(DS_ACCELERATOR="cpu", FASTJEPA_TRAIN_SCRIPT=helpers.TRAIN_SCRIPT)
    proc = subprocess.run(cmd, env=env, cwd=helpers.REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    folder = output / "checkpoints" / "deepspeed"
    stopped = int((folder / "latest").read_text().strip().split("_")[1])
    assert 3 <= stopped < 50
    assert helpers.read_metrics(output)[-1]["step"] == stopped
    w0, w1 = rank_weights(output)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # both ranks stopped after the same step
