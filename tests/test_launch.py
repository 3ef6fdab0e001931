"""Launcher detection (``fastjepa.train.launch``): the DeepSpeed launcher, torchrun and SLURM's srun.

- environment dicts of each launcher -> rank, world size, local rank, rendezvous;
- SLURM's compact node lists, against lists written out by hand and a round trip through a writer of the syntax;
- several processes that cannot form one run -> one clear line (LaunchError; exit code 2 from the CLI);
- end to end: 2 processes under ``torchrun --nproc_per_node 2`` and 2 under a SLURM-like environment (as srun
  sets it, without srun: there is no SLURM here) train the tiny config as one data-parallel run on gloo:
  both ranks end with identical weights, one metrics.jsonl, and its first loss is the mean of the two
  ranks' shards' losses.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastjepa.config import load_config
from fastjepa.train import backend as backend_mod
from fastjepa.train.launch import DEFAULT_PORT, Launch, LaunchError, batch_step_note, detect_launch, expand_nodelist

# ---- what each launcher sets ----------------------------------------------------------------------

DEEPSPEED_ENV = {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "node-01", "MASTER_PORT": "29500",
                 "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "8"}
TORCHRUN_ENV = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29400",
                "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1", "TORCHELASTIC_RUN_ID": "none"}
SRUN_ENV = {"SLURM_JOB_ID": "4123456", "SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_NTASKS": "16",
            "SLURM_STEP_NUM_TASKS": "8", "SLURM_JOB_NODELIST": "gpu[07-10,12]", "SLURM_STEP_NODELIST": "gpu[08-09]",
            "SLURM_STEP_ID": "0", "SLURM_NODEID": "1"}


@pytest.mark.parametrize("env, arg, expected", [
    ({}, None, Launch("none")),
    (DEEPSPEED_ENV, 3, Launch("deepspeed", 11, 16, 3, "node-01", 29500)),
    ({k: v for k, v in DEEPSPEED_ENV.items() if k not in ("CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE")}, 3,
     Launch("deepspeed", 11, 16, 3, "node-01", 29500)),  # --local_rank alone says DeepSpeed
    (DEEPSPEED_ENV, None, Launch("deepspeed", 11, 16, 3, "node-01", 29500)),  # --no_local_rank: its variables say it
    (TORCHRUN_ENV, None, Launch("torchrun", 5, 8, 1, "10.0.0.7", 29400)),
    # srun: the step's task count (not the job's), rank 0 on the step's first node, the port from the job id
    (SRUN_ENV, None, Launch("slurm", 6, 8, 2, "gpu08", 15000 + 4123456 % 10000)),
    ({k: v for k, v in SRUN_ENV.items() if k != "SLURM_STEP_NODELIST"}, None, Launch("slurm", 6, 8, 2, "gpu07", 18456)),
    ({**SRUN_ENV, "MASTER_ADDR": "login-3", "MASTER_PORT": "23456"}, None, Launch("slurm", 6, 8, 2, "login-3", 23456)),
    ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_JOB_NODELIST": "n1"}, None,
     Launch("slurm", 0, 1, 0)),  # one srun task: a launch of one, no rendezvous
    ({**SRUN_ENV, **TORCHRUN_ENV}, None, Launch("torchrun", 5, 8, 1, "10.0.0.7", 29400)),  # srun torchrun ...
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}, None,
     Launch("env", 0, 2, 0, "h", 1234)),  # the torch variables set by something else
    # a batch script's own shell: SLURM_PROCID=0 and the job's task count, but no step: one process
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
      "SLURM_JOB_NODELIST": "n[1-2]"}, None, Launch("none")),
], ids=["none", "deepspeed", "deepspeed-arg-only", "deepspeed-no-arg", "torchrun", "srun", "srun-job-nodelist",
        "srun-master-exported", "srun-one-task", "srun-torchrun", "torch-env", "sbatch-shell"])
def test_detects_each_launcher(env, arg, expected):
    assert detect_launch(env, arg) == expected


def test_slurm_launch_sets_the_torch_rendezvous():
    got = detect_launch(SRUN_ENV).torch_env()
    assert got == {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "MASTER_ADDR": "gpu08",
                   "MASTER_PORT": str(15000 + 3456)}
    assert detect_launch({}).torch_env()["MASTER_PORT"] == str(DEFAULT_PORT)


def test_batch_script_without_srun_gets_a_note():
    env = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}
    assert "not started by srun" in batch_step_note(env)
    assert batch_step_note(SRUN_ENV) is None and batch_step_note({}) is None


@pytest.mark.parametrize("env, arg, names", [
    ({"SLURM_NTASKS": "4"}, None, ["SLURM_NTASKS=4", "SLURM_PROCID"]),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]"}, None, ["SLURM_PROCID", "SLURM_LOCALID"]),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_JOB_NODELIST": "n[1-2]"}, None, ["SLURM_LOCALID"]),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}, None, ["SLURM_JOB_NODELIST", "MASTER_ADDR"]),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n1"}, None,
     ["SLURM_PROCID=2"]),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "n[3-1]"}, None,
     ["node list", "n[3-1]"]),
    ({"WORLD_SIZE": "2"}, None, ["WORLD_SIZE=2", "RANK"]),
    ({"RANK": "1"}, None, ["RANK=1", "WORLD_SIZE"]),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, None, ["MASTER_ADDR and MASTER_PORT"]),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, None, ["LOCAL_RANK"]),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, None, ["RANK=2"]),
    ({"RANK": "x", "WORLD_SIZE": "2"}, None, ["RANK='x'"]),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"}, None, ["OMPI_COMM_WORLD_SIZE=4"]),
    ({}, 0, ["--local_rank", "RANK and WORLD_SIZE"]),
], ids=["ntasks-no-procid", "srun-no-ranks", "srun-no-localid", "srun-no-nodelist", "srun-rank-outside",
        "srun-bad-nodelist", "world-no-rank", "rank-no-world", "no-rendezvous", "no-local-rank", "rank-outside",
        "not-an-int", "mpi", "local-rank-only"])
def test_processes_that_cannot_join_get_one_clear_line(env, arg, names):
    with pytest.raises(LaunchError) as err:
        detect_launch(env, arg)
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message


# ---- SLURM node lists -----------------------------------------------------------------------------

@pytest.mark.parametrize("hostlist, hosts", [
    ("node01", ["node01"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("gpu-a[1-2]-ib", ["gpu-a1-ib", "gpu-a2-ib"]),
    ("rack[1-2]-n[08-10]", ["rack1-n08", "rack1-n09", "rack1-n10", "rack2-n08", "rack2-n09", "rack2-n10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("x[7]", ["x7"]),
    ("login-3.cluster.org", ["login-3.cluster.org"]),
])
def test_expands_slurm_node_lists(hostlist, hosts):
    assert expand_nodelist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["node[01-", "node01]", "n[a-b]", "n[3-1]", "", "n[1-2"])
def test_rejects_malformed_node_lists(bad):
    with pytest.raises(LaunchError, match="node list"):
        expand_nodelist(bad)


def compress(groups) -> str:
    """The independent direction: (prefix, width, numbers) groups -> SLURM's compact syntax, consecutive
    numbers folded into ranges."""
    parts = []
    for prefix, width, numbers in groups:
        numbers, runs = sorted(set(numbers)), []
        for n in numbers:
            if runs and n == runs[-1][1] + 1:
                runs[-1][1] = n
            else:
                runs.append([n, n])
        text = ",".join(f"{a:0{width}d}" if a == b else f"{a:0{width}d}-{b:0{width}d}" for a, b in runs)
        parts.append(f"{prefix}[{text}]")
    return ",".join(parts)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["node", "gpu-", "a100n", "r1-c"]), st.integers(1, 4),
                          st.lists(st.integers(0, 120), min_size=1, max_size=12)), min_size=1, max_size=3))
def test_node_list_round_trip(groups):
    expected = [f"{prefix}{n:0{width}d}" for prefix, width, numbers in groups for n in sorted(set(numbers))]
    assert expand_nodelist(compress(groups)) == expected


# ---- which backend a launch gets ------------------------------------------------------------------

def tiny_cfg(tiny, *extra):
    return load_config(None, tiny + list(extra))


def test_several_processes_need_deepspeed(tiny, monkeypatch):
    two = Launch("torchrun", 0, 2, 0, "127.0.0.1", 29500)
    with pytest.raises(LaunchError, match="deepspeed.enabled=off but torchrun started 2 processes"):
        backend_mod.deepspeed_wanted(tiny_cfg(tiny, "deepspeed.enabled=off"), two)
    real_find_spec = backend_mod.importlib.util.find_spec
    monkeypatch.setattr(backend_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a))
    with pytest.raises(LaunchError, match="DeepSpeed is not installed"):
        backend_mod.deepspeed_wanted(tiny_cfg(tiny), two)
    assert not backend_mod.deepspeed_wanted(tiny_cfg(tiny), Launch("none"))  # one process needs no DeepSpeed


def test_auto_turns_deepspeed_on_under_several_processes(tiny):
    cfg = tiny_cfg(tiny)  # deepspeed.enabled=auto
    pytest.importorskip("deepspeed")
    assert backend_mod.deepspeed_wanted(cfg, Launch("torchrun", 0, 2, 0, "h", 1))
    assert backend_mod.deepspeed_wanted(cfg, Launch("slurm", 1, 4, 1, "h", 1))
    assert backend_mod.deepspeed_wanted(cfg, Launch("deepspeed", 0, 1, 0, "h", 1))  # its launcher, even alone
    assert not backend_mod.deepspeed_wanted(cfg, Launch("torchrun", 0, 1, 0))  # one process: single-process
    assert not backend_mod.deepspeed_wanted(cfg, Launch("slurm", 0, 1, 0))


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "CROSS_RANK",
               "LOCAL_SIZE", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
               "SLURM_STEP_ID", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_NODELIST", "OMPI_COMM_WORLD_SIZE",
               "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


def clean_env(**extra) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_cli_exits_2_with_one_line(tiny, tmp_path, monkeypatch, capsys):
    """Two srun tasks whose environment lacks their ranks: exit code 2 and one line, before any model is built."""
    from fastjepa.cli import train_main

    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[1-2]")
    assert train_main(["--output-dir", str(tmp_path / "run")] + tiny) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fastjepa: error: srun started 2 tasks but SLURM_PROCID and SLURM_LOCALID are not set: the tasks "
                   "cannot tell their ranks apart"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---- end to end: 2 processes, one data-parallel run -------------------------------------------------

STEPS = 4

# Runs the real entry point with Trainer.train wrapped to dump this rank's weights and launch afterwards.
WRAPPER = textwrap.dedent("""
    import json, os, runpy, sys
    import torch
    import fastjepa.train.trainer as T

    def dump_after_train(self, _train=T.Trainer.train):
        code = _train(self)
        state = {"model." + k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        state.update({"target." + k: v.detach().cpu().clone() for k, v in self.target.state_dict().items()})
        torch.save(state, os.path.join(str(self.output_dir), f"rank{self.rank}_weights.pt"))
        launch = getattr(self.backend, "launch", None)
        info = {"rank": self.rank, "world_size": self.world_size, "backend": type(self.backend).__name__,
                "kind": launch.kind if launch else None, "local_rank": launch.local_rank if launch else None}
        with open(os.path.join(str(self.output_dir), f"rank{self.rank}_launch.json"), "w") as f:
            json.dump(info, f)
        return code

    T.Trainer.train = dump_after_train
    sys.argv[0] = os.environ["FASTJEPA_TRAIN_SCRIPT"]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def free_port(low: int = 0, high: int = 0) -> int:
    """A free TCP port, in [low, high) when given."""
    for port in (range(low, high) if high else [0]):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def tiny_json(helpers, tmp: Path) -> Path:
    raw = helpers.tiny_config_dict(train={"max_steps": STEPS, "checkpoint_every": 1000})
    path = tmp / "tiny.json"
    path.write_text(json.dumps(raw))
    return path


def check_one_data_parallel_run(helpers, config: Path, output: Path, kind: str):
    import torch.nn.functional as F

    from fastjepa.data.loader import build_batches
    from fastjepa.models import build_models

    infos = [json.loads((output / f"rank{r}_launch.json").read_text()) for r in range(2)]
    assert [(i["rank"], i["world_size"], i["kind"], i["local_rank"], i["backend"]) for i in infos] == [
        (0, 2, kind, 0, "DeepSpeedBackend"), (1, 2, kind, 1, "DeepSpeedBackend")]
    w0, w1 = (torch.load(output / f"rank{r}_weights.pt", weights_only=True) for r in range(2))
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "the ranks' weights differ: gradients were not averaged"
    records = helpers.read_metrics(output)  # the only metrics file: rank 0 writes it
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert sorted(p.name for p in output.glob("**/metrics.jsonl")) == ["metrics.jsonl"]

    # step 1's loss is the mean over both ranks' shards, each different: the ranks saw different data
    cfg = load_config(config)
    torch.manual_seed(cfg.train.seed)
    model, target = build_models(cfg)
    losses = []
    for rank in range(2):
        batch = build_batches(cfg, model.encoder.grid, rank, 2)[(0, 0)]
        with torch.no_grad():
            h = target(batch.images)
            rows = h.reshape(-1, h.shape[-1])[batch.masks.tgt_index.long()]
            pred = model(batch.images, batch.masks)
        losses.append(F.smooth_l1_loss(pred, F.layer_norm(rows, rows.shape[-1:], eps=cfg.train.target_norm_eps)).item())
    assert abs(losses[0] - losses[1]) > 1e-4
    assert records[0]["loss"] == pytest.approx(sum(losses) / 2, abs=1e-6)


def run_two(cmds_envs, timeout=300):
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd, env in cmds_envs]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], "\n".join(outs)


@pytest.mark.deepspeed
@pytest.mark.subprocess
def test_torchrun_two_processes_train_as_one_run(helpers, tmp_path):
    pytest.importorskip("deepspeed")
    config, output = tiny_json(helpers, tmp_path), tmp_path / "run"
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(wrapper), "--config", str(config), "--output-dir", str(output)]
    env = helpers.subprocess_env(DS_ACCELERATOR="cpu", FASTJEPA_TRAIN_SCRIPT=helpers.TRAIN_SCRIPT)
    env = {k: v for k, v in env.items() if k not in LAUNCH_VARS}
    proc = subprocess.run(cmd, env=env, cwd=helpers.REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    check_one_data_parallel_run(helpers, config, output, "torchrun")


@pytest.mark.deepspeed
@pytest.mark.subprocess
def test_srun_environment_two_processes_train_as_one_run(helpers, tmp_path):
    """What srun gives two tasks on one node (SLURM_PROCID/LOCALID, the step's task count and node list, the
    job id the port comes from), without srun: the rendezvous is made from SLURM's variables alone."""
    pytest.importorskip("deepspeed")
    config, output = tiny_json(helpers, tmp_path), tmp_path / "run"
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    port = free_port(15000, 25000)
    job_id = 7_000_000 + (port - 15000)  # the port the launcher derives from the job id is the free one
    base = {k: v for k, v in helpers.subprocess_env(DS_ACCELERATOR="cpu", FASTJEPA_TRAIN_SCRIPT=helpers.TRAIN_SCRIPT).items()
            if k not in LAUNCH_VARS}
    slurm = {"SLURM_JOB_ID": str(job_id), "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0",
             "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_NODELIST": "localhost"}
    cmd = [sys.executable, str(wrapper), "--config", str(config), "--output-dir", str(output)]
    codes, log = run_two([(cmd, {**base, **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)}) for r in range(2)])
    assert codes == [0, 0], log[-6000:]
    check_one_data_parallel_run(helpers, config, output, "slurm")
