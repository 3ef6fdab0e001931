"""Who started this process: the DeepSpeed launcher, torchrun, SLURM's ``srun``, or nobody.

:func:`detect_launch` reads the environment once and returns a :class:`Launch` (rank, world size, local rank,
the rendezvous address). Several processes always train as one data-parallel run through the DeepSpeed
backend, which joins through torch's ``env://`` variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``): :meth:`Launch.torch_env` gives them, made from SLURM's own under ``srun``.

What each launcher sets (and what tells them apart):

- DeepSpeed (``deepspeed.launcher.launch``): the torch variables, ``CROSS_RANK``/``CROSS_SIZE``/``LOCAL_SIZE``,
  and a ``--local_rank=N`` argument;
- torchrun (torch elastic): the torch variables, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` and
  ``TORCHELASTIC_RUN_ID``;
- ``srun``: ``SLURM_PROCID`` (global rank), ``SLURM_LOCALID`` (rank on the node), ``SLURM_STEP_NUM_TASKS``
  (tasks of this step, set by srun only; ``SLURM_NTASKS`` is the job's), ``SLURM_STEP_NODELIST``/``SLURM_JOB_NODELIST`` in
  SLURM's compact syntax (``node[01-04,07]``); rank 0 runs on the first host of the step's list. A batch
  script's own shell has ``SLURM_PROCID=0`` and ``SLURM_NTASKS`` but no ``SLURM_STEP_*``: one process.

The torch variables win over SLURM's: ``srun torchrun ...`` (one torchrun per node) is a torchrun launch.
Several processes that cannot find each other (an ``srun`` environment with a variable missing, MPI ranks
without a rendezvous, ``WORLD_SIZE`` without ``RANK``) raise :class:`LaunchError`, one line naming what is
missing, instead of each training alone into the same folder.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..config import ConfigError

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# A port from the job id keeps two jobs that share a node apart; 15000-24999 stays below Linux's ephemeral
# range (32768-60999), where the OS hands out ports to outgoing connections.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 10000
DEFAULT_PORT = 29500  # torchrun's and DeepSpeed's default


class LaunchError(ConfigError):
    """Several processes that cannot form one run; the message names the missing or bad variable."""


@dataclass(frozen=True)
class Launch:
    """``kind``: ``none``, ``deepspeed``, ``torchrun``, ``env`` (the torch variables set by something else),
    or ``slurm``. ``master_addr``/``master_port`` are the rendezvous (None for one process)."""

    kind: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def distributed(self) -> bool:
        """Whether a launcher started this process (possibly as its only process)."""
        return self.kind != "none"

    def describe(self) -> str:
        if self.kind == "none":
            return "one process (no launcher)"
        where = f", rendezvous {self.master_addr}:{self.master_port}" if self.master_addr else ""
        return f"{self.kind}: rank {self.rank} of {self.world_size} (local rank {self.local_rank}){where}"

    def torch_env(self) -> dict[str, str]:
        """The ``env://`` variables torch.distributed and DeepSpeed read to join this run."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "MASTER_ADDR": self.master_addr or "127.0.0.1", "MASTER_PORT": str(self.master_port or DEFAULT_PORT)}


def _int(env: Mapping[str, str], name: str) -> int:
    text = env[name]
    try:
        return int(text)
    except ValueError:
        raise LaunchError(f"{name}={text!r} is not an integer") from None


def _parse_ranges(text: str, hostlist: str) -> list[str]:
    """``01-04,07`` -> ``['01', '02', '03', '04', '07']``, zero padding kept (the width of the lower bound)."""
    out = []
    for part in text.split(","):
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise LaunchError(f"cannot read the SLURM node list {hostlist!r}: bad range {part!r}")
        if not sep:
            out.append(low)
            continue
        if int(high) < int(low):
            raise LaunchError(f"cannot read the SLURM node list {hostlist!r}: range {part!r} runs backwards")
        out += [str(i).zfill(len(low)) for i in range(int(low), int(high) + 1)]
    return out


def expand_nodelist(hostlist: str) -> list[str]:
    """SLURM's compact host list -> host names, in order: ``node[01-03,07],gpu-a[1-2]-b`` ->
    ``node01 node02 node03 node07 gpu-a1-b gpu-a2-b``. Several bracket groups in one name expand as a
    product (``r[1-2]n[1-2]`` -> ``r1n1 r1n2 r2n1 r2n2``), as ``scontrol show hostnames`` does."""
    hosts, depth, start = [], 0, 0
    items = []
    for i, ch in enumerate(hostlist):  # split on the commas outside brackets
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"cannot read the SLURM node list {hostlist!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            items.append(hostlist[start:i])
            start = i + 1
    if depth:
        raise LaunchError(f"cannot read the SLURM node list {hostlist!r}: unbalanced '['")
    items.append(hostlist[start:])
    for item in filter(None, (s.strip() for s in items)):
        names = [""]
        for literal, ranges in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", item):
            if not literal and not ranges:
                continue
            tails = _parse_ranges(ranges, hostlist) if ranges else [""]
            names = [n + literal + t for n in names for t in tails]
        hosts += names
    if not hosts:
        raise LaunchError(f"the SLURM node list {hostlist!r} names no host")
    return hosts


def _slurm(env: Mapping[str, str]) -> Launch:
    """An ``srun`` task (``SLURM_STEP_NUM_TASKS`` set: srun sets it, a batch script's shell has none)."""
    world = _int(env, "SLURM_STEP_NUM_TASKS")
    if world < 1:
        raise LaunchError(f"SLURM_STEP_NUM_TASKS={world}: a step has at least one task")
    missing = [name for name in ("SLURM_PROCID", "SLURM_LOCALID") if name not in env]
    if missing and world > 1:
        raise LaunchError(f"srun started {world} tasks but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'}"
                          " not set: the tasks cannot tell their ranks apart")
    rank = _int(env, "SLURM_PROCID") if "SLURM_PROCID" in env else 0
    local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    if not 0 <= rank < world:
        raise LaunchError(f"SLURM_PROCID={rank} is outside the {world} tasks of this step")
    if world == 1:
        return Launch("slurm", 0, 1, local_rank)
    addr = env.get("MASTER_ADDR")  # a user's export wins over the node list
    if not addr:
        listed = next((env[n] for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(n)),
                      None)
        if listed is None:
            raise LaunchError(f"srun started {world} tasks but none of SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, "
                              "SLURM_NODELIST or MASTER_ADDR is set: no address for rank 0")
        addr = expand_nodelist(listed)[0]  # SLURM places task 0 on the first node of the step
    if env.get("MASTER_PORT"):
        port = _int(env, "MASTER_PORT")
    elif env.get("SLURM_JOB_ID", "").isdigit():
        port = SLURM_PORT_BASE + int(env["SLURM_JOB_ID"]) % SLURM_PORT_SPAN
    else:
        port = DEFAULT_PORT
    return Launch("slurm", rank, world, local_rank, addr, port)


def _torch_vars(env: Mapping[str, str], local_rank_arg: int | None) -> Launch:
    """A launcher that set the torch ``env://`` variables (RANK and WORLD_SIZE at least)."""
    if "TORCHELASTIC_RUN_ID" in env:
        kind = "torchrun"
    elif local_rank_arg is not None or "CROSS_RANK" in env or "LOCAL_SIZE" in env:
        kind = "deepspeed"
    else:
        kind = "env"
    world, rank = _int(env, "WORLD_SIZE"), _int(env, "RANK")
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if "LOCAL_RANK" in env:
        local_rank = _int(env, "LOCAL_RANK")
    elif local_rank_arg is not None:
        local_rank = local_rank_arg
    elif world == 1:
        local_rank = 0
    else:
        raise LaunchError(f"WORLD_SIZE={world} but LOCAL_RANK is not set: cannot tell which device is this process's")
    if world == 1:
        return Launch(kind, 0, 1, local_rank, env.get("MASTER_ADDR"),
                      _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else None)
    missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not env.get(n)]
    if missing:
        raise LaunchError(f"WORLD_SIZE={world} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          "not set: the processes have no rendezvous")
    return Launch(kind, rank, world, local_rank, env["MASTER_ADDR"], _int(env, "MASTER_PORT"))


MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


def detect_launch(environ: Mapping[str, str] | None = None, local_rank_arg: int | None = None) -> Launch:
    """This process's launch, read from ``environ`` (default ``os.environ``) and the ``--local_rank``
    argument the DeepSpeed launcher passes. Raises :class:`LaunchError` for several processes that cannot
    form one run."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [n for n in ("RANK", "WORLD_SIZE") if n not in env]
        if missing:
            have = "RANK" if "RANK" in env else "WORLD_SIZE"
            raise LaunchError(f"{have}={env[have]} is set but {missing[0]} is not: an incomplete torch.distributed "
                              "environment (torchrun and the deepspeed launcher set both)")
        return _torch_vars(env, local_rank_arg)
    if "SLURM_STEP_NUM_TASKS" in env:
        return _slurm(env)
    if env.get("SLURM_NTASKS", "1").isdigit() and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" not in env:
        raise LaunchError(f"SLURM_NTASKS={env['SLURM_NTASKS']} but SLURM_PROCID is not set: start the tasks with "
                          "srun (each then knows its rank), or unset SLURM_NTASKS to train in this one process")
    for name in MPI_SIZE_VARS:
        if env.get(name, "1").isdigit() and int(env.get(name, "1")) > 1:
            raise LaunchError(f"{name}={env[name]}: {env[name]} MPI processes but no RANK/WORLD_SIZE/MASTER_ADDR/"
                              "MASTER_PORT; start them with torchrun, srun or the deepspeed launcher")
    if local_rank_arg is not None or "LOCAL_RANK" in env:
        raise LaunchError("--local_rank or LOCAL_RANK is set but RANK and WORLD_SIZE are not: an incomplete "
                          "launcher environment (the deepspeed launcher sets all three)")
    return Launch("none")


def batch_step_note(environ: Mapping[str, str] | None = None) -> str | None:
    """A line for a process alone in a SLURM allocation of several tasks (a batch script that forgot srun)."""
    env = os.environ if environ is None else environ
    tasks = env.get("SLURM_NTASKS", "1")
    if "SLURM_STEP_NUM_TASKS" not in env and tasks.isdigit() and int(tasks) > 1:
        return (f"fastjepa: this SLURM job has {tasks} tasks but this process was not started by srun: training in "
                "one process (start it with srun for a data-parallel run)")
    return None


__all__ = ["DEFAULT_PORT", "Launch", "LaunchError", "batch_step_note", "detect_launch", "expand_nodelist"]
