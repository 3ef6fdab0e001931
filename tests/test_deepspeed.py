"""Data-parallel training through the DeepSpeed launcher: 2 CPU ranks (gloo), ZeRO stages 0, 1, 2 and 3.

Each stage runs ``deepspeed --num_accelerators 2 fastjepa/train.py ...`` once (a module-scoped fixture,
~20 s each on 2 cores) through a small wrapper that, after ``Trainer.train``, dumps each rank's weights
(gathered under ZeRO-3, for the test only) and counts the collectives issued inside the EMA; the tests
then check:
- the losses are finite and fall; the two ranks hold bit-identical weights (model and target);
- step 1 matches an in-process reference: loss = mean of the two ranks' losses and grad_norm = the norm of
  the mean of their gradients (with gradient accumulation folded in for stage 1);
- all 10 steps match a one-process replay of the data-parallel run (both ranks' micro-batches, averaged
  gradients, AdamW, a ``torch._foreach_lerp_`` EMA in fp32): losses, final weights and target encoder;
- the EMA issues no collective on any rank (while the step around it issues many);
- no run leaves DeepSpeed's CPU all-reduce buffers behind in /dev/shm;
- stage 2 and 3: DeepSpeed checkpoints keep only ``keep_checkpoints`` tags; with one file of the newest
  tag (step 10) truncated, a file that only rank 1 checks, both ranks agree to fall back to the step-8 tag,
  which ``--resume`` continues exactly (steps 9-10 and the final weights of the uninterrupted run);
- SIGTERM to the ``deepspeed`` runner (which dies without passing it on) or to DeepSpeed's ``launch.py``:
  every rank checkpoints at the same step and exits 0;
- stage 3: the exported target encoder (assembled from the per-rank shard files) equals the gathered
  target; a universal checkpoint resumes on 1 rank with the same weights; a rank killed mid-step leaves
  the last checkpoint loadable;
- the DALI loader on 2 ranks (ZeRO-2): the ranks share out every file of an epoch, and a resumed run
  gets each rank's pipeline state back (same files, same losses).
Deselect with ``-m "not deepspeed"``. The first launch on a machine also JIT-builds DeepSpeed's CPU
shared-memory op (~1 min, cached in ~/.cache/torch_extensions).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.deepspeed

try:
    import deepspeed  # noqa: F401
except Exception as err:  # noqa: BLE001 -- any import failure means: cannot test here
    pytest.skip(f"deepspeed is not importable ({err}); pip install deepspeed>=0.19", allow_module_level=True)

STEPS = 10
WORLD = 2

# Runs the real entry point (fastjepa/train.py, which receives --local_rank from the launcher) with
# Trainer.train wrapped to dump this rank's weights afterwards, and every collective of torch.distributed
# and deepspeed.comm counted, separately while the EMA runs (rank{r}_collectives.json).
WRAPPER = textwrap.dedent("""
    import contextlib, functools, json, os, runpy, sys
    import torch
    import deepspeed.comm
    import fastjepa.train.step as S
    import fastjepa.train.trainer as T

    COUNTS = {"ema": 0, "other": 0}
    IN_EMA = [False]
    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter",
             "broadcast", "reduce", "all_to_all_single", "barrier", "send", "recv", "isend", "irecv",
             "all_reduce_coalesced", "allgather_fn", "reduce_scatter_fn", "inference_all_reduce")

    def counted(fn):
        @functools.wraps(fn)
        def call(*a, **k):
            COUNTS["ema" if IN_EMA[0] else "other"] += 1
            return fn(*a, **k)
        return call

    for module in (torch.distributed, deepspeed.comm):
        for name in NAMES:
            if callable(getattr(module, name, None)):
                setattr(module, name, counted(getattr(module, name)))

    def ema_counted(*a, _ema=S.ema_, **k):
        IN_EMA[0] = True
        try:
            return _ema(*a, **k)
        finally:
            IN_EMA[0] = False
    S.ema_ = ema_counted

    def dump_after_train(self, _train=T.Trainer.train):
        code = _train(self)
        gathered = contextlib.nullcontext()
        if self.backend.zero3:  # the test's own look at the whole weights (the trainer never gathers the target)
            params = list(self.model.parameters()) + list(self.target.parameters())
            gathered = deepspeed.zero.GatheredParameters(params)
        with gathered:
            state = {"model." + k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            state.update({"target." + k: v.detach().cpu().clone() for k, v in self.target.state_dict().items()})
        torch.save(state, os.path.join(str(self.output_dir), f"rank{self.rank}_weights.pt"))
        with open(os.path.join(str(self.output_dir), f"rank{self.rank}_collectives.json"), "w") as f:
            json.dump(COUNTS, f)
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


def tiny_json(helpers, tmp: Path, stage: int, accum: int, bf16: bool = False) -> Path:
    raw = helpers.tiny_config_dict(
        train={"max_steps": STEPS, "checkpoint_every": 2, "keep_checkpoints": 2, "grad_accum_steps": accum},
        deepspeed={"enabled": "auto", "zero_stage": stage, "bf16": "on" if bf16 else "off"},
    )
    if bf16:
        raw["train"]["precision"] = "bf16"
    path = tmp / "tiny.json"
    path.write_text(json.dumps(raw))
    return path


def launch(helpers, workdir: Path, config: Path, output: Path, *extra: str, world: int = WORLD,
           prefix: str = "", expect_rc: int | None = 0):
    wrapper = workdir / "wrapper.py"
    wrapper.write_text(prefix + WRAPPER)
    cmd = launcher() + ["--num_accelerators", str(world), "--master_port", str(free_port()), str(wrapper),
                        "--config", str(config), "--output-dir", str(output), *extra]
    env = helpers.subprocess_env(DS_ACCELERATOR="cpu", FASTJEPA_TRAIN_SCRIPT=helpers.TRAIN_SCRIPT)
    proc = subprocess.run(cmd, env=env, cwd=helpers.REPO, capture_output=True, text=True, timeout=400)
    if expect_rc is not None:
        assert proc.returncode == expect_rc, proc.stdout[-6000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


# name: (ZeRO stage, micro-batches per step, DeepSpeed bf16 mode); stage 1 also accumulates
RUNS = {"zero0": (0, 1, False), "zero1": (1, 2, False), "zero2": (2, 1, False), "zero3": (3, 1, False),
        "zero3-bf16": (3, 1, True)}


@pytest.fixture(scope="module", params=list(RUNS))
def ds_run(request, tmp_path_factory, helpers):
    """One 10-step run per configuration."""
    from types import SimpleNamespace

    stage, accum, bf16 = RUNS[request.param]
    work = tmp_path_factory.mktemp(request.param)
    config = tiny_json(helpers, work, stage, accum, bf16)
    output = work / "run"
    before = shm_buffers()
    log = launch(helpers, work, config, output)
    return SimpleNamespace(name=request.param, stage=stage, accum=accum, bf16=bf16, config=config, output=output,
                           work=work, log=log, leaked_shm=shm_buffers() - before)


def shm_buffers() -> set:
    """The /dev/shm all-reduce buffers of DeepSpeed's CPU backend that exist now."""
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def test_no_shared_memory_left_behind(ds_run):
    """The trainer unlinks DeepSpeed's per-rank /dev/shm buffers (DeepSpeed itself never does)."""
    assert not ds_run.leaked_shm, sorted(ds_run.leaked_shm)


def rewound_copy(output: Path, dest: Path, step: int, last: int) -> Path:
    """A copy of a finished run as it was after ``step``: the tag of step ``last`` gone, ``latest`` at
    ``step``, metrics up to ``step``, the test wrapper's per-rank dumps removed."""
    shutil.copytree(output, dest)
    folder = dest / "checkpoints" / "deepspeed"
    shutil.rmtree(folder / f"step_{last:08d}")
    (folder / "latest").write_text(f"step_{step:08d}")
    lines = (dest / "metrics.jsonl").read_text().splitlines()[:step]
    (dest / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for dump in dest.glob("rank*_*"):
        dump.unlink()
    return dest


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
    from fastjepa.models import build_models

    if ds_run.bf16:
        pytest.skip("bf16 runs are checked against the replay with bf16 tolerances")
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
            loss = F.smooth_l1_loss(model(batch.images, batch.masks), F.layer_norm(rows, rows.shape[-1:], eps=1e-5))
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


def data_parallel_replay(config: Path, steps: int, world: int = WORLD):
    """One process replaying a ``world``-rank data-parallel run: each step takes every rank's micro-batches,
    averages their gradients, steps AdamW and moves the target with ``torch._foreach_lerp_`` in fp32.
    Returns (per-step losses, model state, target state)."""
    from fastjepa import schedules
    from fastjepa.config import load_config
    from fastjepa.data.loader import build_batches
    from fastjepa.models import build_models
    from fastjepa.optim import build_optimizer, set_hyperparameters
    from fastjepa_kernels import jepa_target_loss

    cfg = load_config(config)
    torch.manual_seed(cfg.train.seed)
    model, target = build_models(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    data = [build_batches(cfg, model.encoder.grid, rank, world) for rank in range(world)]
    accum, total = cfg.train.grad_accum_steps, cfg.train.max_steps
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for step in range(steps):
        # The official loop steps its schedulers before the optimizer, so step s trains at the value for s + 1.
        set_hyperparameters(optimizer, schedules.learning_rate(step + 1, cfg.optim, total),
                            schedules.weight_decay(step + 1, cfg.optim, total))
        sums, step_losses = [torch.zeros_like(p) for p in params], []
        for batches in data:
            for micro in range(step * accum, (step + 1) * accum):
                batch = batches[divmod(micro, batches.steps_per_epoch)]
                model.zero_grad()
                with torch.no_grad():
                    h = target(batch.images)
                loss = jepa_target_loss(model(batch.images, batch.masks), h, batch.masks.tgt_index, backend="reference",
                                        eps=cfg.train.target_norm_eps)
                loss.backward()
                step_losses.append(loss.item())
                torch._foreach_add_(sums, [p.grad for p in params])
        for p, g in zip(params, sums):
            p.grad = g / (world * accum)
        optimizer.step()
        momentum = schedules.ema_momentum(step, cfg.optim, total)
        torch._foreach_lerp_(list(target.parameters()), list(model.encoder.parameters()), 1.0 - momentum)
        losses.append(sum(step_losses) / len(step_losses))
    return losses, model.state_dict(), target.state_dict()


def test_matches_one_process_replay(ds_run, helpers):
    """2 ranks x batch b == one process over both ranks' batches, for all 10 steps: losses, weights, and
    the EMA target (fp32 on both sides: only summation order differs; DeepSpeed's bf16 mode against the
    fp32 replay: within bf16 rounding, measured against how far training moved the weights)."""
    from fastjepa.config import load_config
    from fastjepa.models import build_models

    losses, model_state, target_state = data_parallel_replay(ds_run.config, STEPS)
    got = [r["loss"] for r in helpers.read_metrics(ds_run.output)]
    weights = rank_weights(ds_run.output)[0]
    if ds_run.bf16:
        assert got == pytest.approx(losses, rel=1e-2)
        torch.manual_seed(load_config(ds_run.config).train.seed)
        init_model, init_target = build_models(load_config(ds_run.config))
        for prefix, ref, init in (("model.", model_state, init_model.state_dict()),
                                  ("target.", target_state, init_target.state_dict())):
            err = sum((weights[prefix + k].float() - v).square().sum() for k, v in ref.items()).sqrt()
            moved = sum((v - init[k]).square().sum() for k, v in ref.items()).sqrt()
            assert err < 0.1 * moved, (prefix, float(err), float(moved))
        return
    assert got == pytest.approx(losses, rel=1e-5, abs=1e-7)
    for k, v in model_state.items():
        torch.testing.assert_close(weights["model." + k], v, rtol=1e-4, atol=1e-6, msg=k)
    for k, v in target_state.items():
        torch.testing.assert_close(weights["target." + k], v, rtol=1e-4, atol=1e-6, msg=k)
    moved = max((target_state[k] - weights["model.encoder." + k]).abs().max().item() for k in target_state)
    assert moved > 1e-4  # the target lags the encoder: the comparison can tell EMA from a copy


def test_ema_issues_no_collective(ds_run):
    for rank in range(WORLD):
        counts = json.loads((ds_run.output / f"rank{rank}_collectives.json").read_text())
        assert counts["ema"] == 0, counts
        if ds_run.stage:  # ZeRO steps communicate through the counted functions: the counter works
            assert counts["other"] > STEPS, counts


def test_checkpoints_are_pruned_and_resume_is_exact(ds_run, helpers):
    if ds_run.stage < 2 or ds_run.bf16:
        pytest.skip("resume is exercised on ZeRO-2 and ZeRO-3 (partitioned state) only, for time")
    folder = ds_run.output / "checkpoints" / "deepspeed"
    tags = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert tags == ["step_00000008", "step_00000010"]  # keep_checkpoints=2 of 5 saves
    assert (folder / "latest").read_text().strip() == "step_00000010"
    assert list((folder / "step_00000008").glob("*model_states.pt"))
    if ds_run.stage == 3:
        assert sorted(p.name for p in (folder / "step_00000008").glob("fastjepa_target_*")) == [
            "fastjepa_target_rank00000_of_00002.safetensors", "fastjepa_target_rank00001_of_00002.safetensors"]

    resumed = ds_run.work / "resumed"  # the whole run, with the newest tag damaged where only rank 1 looks
    shutil.copytree(ds_run.output, resumed, ignore=shutil.ignore_patterns("rank*_*"))
    newest = resumed / "checkpoints" / "deepspeed" / "step_00000010"
    files = sorted(p for p in newest.iterdir() if p.suffix in (".pt", ".safetensors"))
    damaged = files[1]  # the ranks check the files of a tag between them: file i on rank i % 2
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])

    log = launch(helpers, ds_run.work, ds_run.config, resumed, "--resume")
    assert "at step 8" in log
    assert f"rank 1: '{damaged}' is " in log and "moved it to" in log, log[-3000:]  # truncated / not whole
    assert (resumed / "checkpoints" / "corrupt" / "step_00000010").is_dir()
    full, again = helpers.read_metrics(ds_run.output), helpers.read_metrics(resumed)
    assert [r["step"] for r in again] == list(range(1, STEPS + 1))
    for a, b in zip(full[8:], again[8:]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    w_full, w_again = rank_weights(ds_run.output)[0], rank_weights(resumed)
    for k in w_full:
        torch.testing.assert_close(w_again[0][k], w_full[k], rtol=0, atol=1e-6)
        assert torch.equal(w_again[0][k], w_again[1][k])


def zero3_only(ds_run):
    if ds_run.name != "zero3":
        pytest.skip("ZeRO-3 (fp32) only, for time")


def test_zero3_export_equals_gathered_target(ds_run):
    """target_encoder.safetensors (assembled from the shard files) and ``python -m fastjepa.train.zero
    export-target`` both equal the target gathered from the ranks."""
    from safetensors.torch import load_file

    from fastjepa.train.zero import main as zero_main

    zero3_only(ds_run)
    gathered = {k[len("target."):]: v for k, v in rank_weights(ds_run.output)[0].items() if k.startswith("target.")}
    exported = load_file(ds_run.output / "target_encoder.safetensors")
    assert exported.keys() == gathered.keys()
    for k in gathered:
        assert torch.equal(exported[k], gathered[k]), k
    out = ds_run.work / "export.safetensors"
    assert zero_main(["export-target", str(ds_run.output / "checkpoints" / "deepspeed" / "step_00000010"), str(out)]) == 0
    again = load_file(out)
    assert all(torch.equal(again[k], gathered[k]) for k in gathered)
    assert zero_main(["export-target", str(ds_run.work), str(out)]) == 2  # no shards there: a clear error


def test_zero3_universal_checkpoint_resumes_on_one_rank(ds_run, helpers):
    """2 ranks -> universal checkpoint -> 1 rank: the model, optimizer moments' owner and target come back
    whole (compared with DeepSpeed's own fp32 consolidation and our shard assembly of the same tag)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from fastjepa.train.zero import consolidate_target, to_universal

    zero3_only(ds_run)
    one = ds_run.work / "one_rank"
    shutil.copytree(ds_run.output, one, ignore=shutil.ignore_patterns("rank*_*"))
    tag = one / "checkpoints" / "deepspeed" / "step_00000010"
    universal = to_universal(tag)
    assert (tag.parent / "latest_universal").read_text().strip() == universal.name
    log = launch(helpers, ds_run.work, ds_run.config, one, "--resume", "deepspeed.load_universal=true",
                 f"train.max_steps={STEPS}", world=1)
    assert "at step 10" in log
    weights = torch.load(one / "rank0_weights.pt", weights_only=True)
    model_ref = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    for k, v in model_ref.items():
        torch.testing.assert_close(weights["model." + k], v, rtol=0, atol=0, msg=k)
    for k, v in consolidate_target(tag).items():
        assert torch.equal(weights["target." + k], v), k


# rank 0's micro-batch 4 (step 5) gets NaN images; every rank records its target slices' sum after each step
NAN_ON_RANK0_STEP5 = textwrap.dedent("""
    import json, os
    import fastjepa.data.loader as L
    import fastjepa.train.trainer as T

    class NaNAtFour:
        def __init__(self, inner, rank):
            self.inner, self.rank, self.steps_per_epoch = inner, rank, inner.steps_per_epoch
        def __len__(self):
            return len(self.inner)
        def __getitem__(self, key):
            batch = self.inner[key]
            if self.rank == 0 and key[0] * self.steps_per_epoch + key[1] == 4:
                batch.images = batch.images * float("nan")
            return batch

    def build_batches(cfg, grid, rank=0, world_size=1, _build=L.build_batches):
        return NaNAtFour(_build(cfg, grid, rank, world_size), rank)
    L.build_batches = build_batches

    def step_and_record(self, *a, _step=T.Trainer.train_step, **k):
        out = _step(self, *a, **k)
        sums = getattr(self, "_sums", [])
        sums.append(sum(float(t.double().sum()) for t in self.backend.ema_pairs()[0]))
        self._sums = sums
        with open(os.path.join(str(self.output_dir), f"rank{self.rank}_target_sums.json"), "w") as f:
            json.dump(sums, f)
        return out
    T.Trainer.train_step = step_and_record
""")


def test_zero3_skipped_step_skips_the_ema_on_every_rank(tmp_path, helpers):
    """A non-finite loss on one rank: every rank skips the optimizer step and the EMA of its own slices."""
    config = tiny_json(helpers, tmp_path, stage=3, accum=1)
    output = tmp_path / "run"
    launch(helpers, tmp_path, config, output, "train.max_steps=7", prefix=NAN_ON_RANK0_STEP5)
    records = helpers.read_metrics(output)
    assert [r["skipped_steps"] for r in records] == [0, 0, 0, 0, 1, 1, 1]
    for rank in range(WORLD):
        sums = json.loads((output / f"rank{rank}_target_sums.json").read_text())
        assert sums[4] == sums[3], (rank, sums)  # step 5: the target slices did not move
        assert sums[5] != sums[4] and sums[3] != sums[2], (rank, sums)  # the steps around it did


# rank 1 kills itself (SIGKILL, no clean-up) in the middle of step 3, after the step-2 checkpoint
KILL_RANK_MID_STEP = textwrap.dedent("""
    import os, signal
    import fastjepa.train.step as S

    def ema_then_die(*a, _ema=S.ema_, **k):
        import torch.distributed as dist
        if dist.get_rank() == 1 and os.path.isdir(os.environ["FASTJEPA_KILL_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return _ema(*a, **k)

    S.ema_ = ema_then_die
""")


def test_zero3_killed_rank_leaves_last_checkpoint_loadable(tmp_path, helpers, monkeypatch):
    config = tiny_json(helpers, tmp_path, stage=3, accum=1)
    output = tmp_path / "run"
    monkeypatch.setenv("FASTJEPA_KILL_AFTER", str(output / "checkpoints" / "deepspeed" / "step_00000002"))
    log = launch(helpers, tmp_path, config, output, "train.max_steps=6", prefix=KILL_RANK_MID_STEP, expect_rc=None)
    folder = output / "checkpoints" / "deepspeed"
    assert (folder / "latest").read_text().strip() == "step_00000002", log[-3000:]
    monkeypatch.delenv("FASTJEPA_KILL_AFTER")
    log = launch(helpers, tmp_path, config, output, "--resume", "train.max_steps=4")
    assert "at step 2" in log
    assert [r["step"] for r in helpers.read_metrics(output)][-2:] == [3, 4]


# A real SIGTERM delivered to one rank only (rank 1 signals itself after its third step): every rank must
# stop at the same step, write the collective checkpoint and exit 0 -- not hang in the checkpoint's
# collectives while the other rank trains on.
SIGNAL_ONE_RANK = textwrap.dedent("""
    import os, signal
    import fastjepa.train.trainer as T

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


# Prepended to WRAPPER: each rank writes the code Trainer.train returned to rank{r}_exit.txt
RECORD_EXIT = textwrap.dedent("""
    import os
    import fastjepa.train.trainer as T

    def train_and_record(self, _train=T.Trainer.train):
        code = _train(self)
        with open(os.path.join(str(self.output_dir), f"rank{self.rank}_exit.txt"), "w") as f:
            f.write(str(code))
        return code
    T.Trainer.train = train_and_record
""")


@pytest.mark.parametrize("target", ["runner", "launch.py"])
def test_sigterm_to_a_launcher_checkpoints_every_rank(tmp_path, helpers, target):
    """SIGTERM to the ``deepspeed`` runner (DeepSpeed 0.19.8's runner installs no handler on one node: it dies
    and leaves launch.py and the ranks running) or to launch.py (it sends SIGTERM to each rank's process
    tree, workers included, and SIGKILLs what is left 30 s later): every rank stops at one step with a
    checkpoint and returns 0; no rank trains on."""
    import psutil

    config = tiny_json(helpers, tmp_path, stage=1, accum=1)
    output = tmp_path / "run"
    script = tmp_path / "exit_wrapper.py"
    script.write_text(RECORD_EXIT + WRAPPER)
    cmd = launcher() + ["--num_accelerators", str(WORLD), "--master_port", str(free_port()), str(script),
                        "--config", str(config), "--output-dir", str(output), "train.max_steps=100000",
                        "train.checkpoint_every=100000", "train.log_every=1", "data.num_workers=1"]
    env = helpers.subprocess_env(DS_ACCELERATOR="cpu", FASTJEPA_TRAIN_SCRIPT=helpers.TRAIN_SCRIPT)
    proc = subprocess.Popen(cmd, env=env, cwd=helpers.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ((output / "metrics.jsonl").exists() and (output / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-4000:]
            time.sleep(0.2)
        runner = psutil.Process(proc.pid)
        launch_py = next(p for p in runner.children() if "deepspeed.launcher.launch" in " ".join(p.cmdline()))
        ranks = [p for p in launch_py.children() if "--local_rank" in " ".join(p.cmdline())]
        assert len(ranks) == WORLD
        (runner if target == "runner" else launch_py).send_signal(signal.SIGTERM)
        gone, alive = psutil.wait_procs(ranks, timeout=180)
        assert not alive, "a rank trained on after its launcher was signalled"
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert [(output / f"rank{r}_exit.txt").read_text() for r in range(WORLD)] == ["0", "0"], log[-4000:]
    assert ("the deepspeed runner" if target == "runner" else "signal 15 (SIGTERM)") in log, log[-4000:]
    stopped = int((output / "checkpoints" / "deepspeed" / "latest").read_text().strip().split("_")[1])
    assert stopped >= 1 and helpers.read_metrics(output)[-1]["step"] == stopped
    w0, w1 = rank_weights(output)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # both ranks stopped after the same step
    assert "Traceback" not in log and "DataLoader worker" not in log, log[-4000:]


# Prepended to WRAPPER: every DALI batch's labels, per rank, appended to OUT/rank{r}_labels.jsonl
RECORD_DALI_LABELS = textwrap.dedent("""
    import json as _json, os as _os, sys as _sys
    import fastjepa.data.dali as _dali

    def _iterate(self, start, stop, _iterate=_dali.DaliBatches.iterate):
        out = _sys.argv[_sys.argv.index("--output-dir") + 1]
        path = _os.path.join(out, "rank%s_labels.jsonl" % _os.environ["RANK"])
        for micro, batch in enumerate(_iterate(self, start, stop), start):
            with open(path, "a") as f:
                f.write(_json.dumps({"micro": micro, "labels": batch.labels.tolist()}) + "\\n")
            yield batch
    _dali.DaliBatches.iterate = _iterate
""")


def test_dali_loader_under_deepspeed_shards_by_rank_and_resumes_exactly(tmp_path, helpers):
    """DALI (CPU pipelines) on 2 gloo ranks, ZeRO-2: over an epoch the ranks see every file once between
    them; the ranks end with identical weights; a run resumed at step 3 (each rank's DALI state comes
    back from the all-gathered checkpoint) repeats steps 4-6 of the uninterrupted run: the same files on
    each rank and the same losses."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (pip install nvidia-dali-cuda120)")
    root = helpers.one_file_per_class(tmp_path / "tree", 16)
    raw = helpers.tiny_config_dict(
        data={"dataset": "folder", "root": str(root), "loader": "dali", "num_workers": 1},
        train={"max_steps": 6, "batch_size": 2, "checkpoint_every": 3, "keep_checkpoints": 2},
        deepspeed={"enabled": "auto", "zero_stage": 2, "bf16": "off"})
    config = tmp_path / "dali.json"
    config.write_text(json.dumps(raw))
    full = tmp_path / "full"
    log = launch(helpers, tmp_path, config, full, prefix=RECORD_DALI_LABELS)
    assert "NVIDIA DALI" in log

    def labels(output):
        return [{r["micro"]: r["labels"] for r in map(json.loads, (output / f"rank{k}_labels.jsonl").read_text().splitlines())}
                for k in range(WORLD)]

    seen = labels(full)
    steps_per_epoch = 16 // (WORLD * 2)
    epoch0 = [x for rank in seen for m in range(steps_per_epoch) for x in rank[m]]
    assert sorted(epoch0) == list(range(16)), seen
    w = rank_weights(full)
    for k in w[0]:
        assert torch.equal(w[0][k], w[1][k]), k

    resumed = rewound_copy(full, tmp_path / "resumed", 3, 6)
    log = launch(helpers, tmp_path, config, resumed, "--resume", prefix=RECORD_DALI_LABELS)
    assert "at step 3" in log
    again = labels(resumed)
    for k in range(WORLD):
        assert sorted(again[k]) == [3, 4, 5] and all(again[k][m] == seen[k][m] for m in (3, 4, 5)), (k, again[k], seen[k])
    want, got = helpers.read_metrics(full), helpers.read_metrics(resumed)
    assert [r["step"] for r in got] == list(range(1, 7))
    for a, b in zip(want[3:], got[3:]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6), a["step"]
    w_again = rank_weights(resumed)
    for k in w[0]:
        torch.testing.assert_close(w_again[0][k], w[0][k], rtol=0, atol=1e-6)
