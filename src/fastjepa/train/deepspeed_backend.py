"""The DeepSpeed backend: data-parallel I-JEPA with ZeRO stages 0-3 (``deepspeed.*`` config keys).

- The online model (context encoder + predictor) and the optimizer go through ``deepspeed.initialize`` with
  the engine config of :func:`fastjepa.train.zero.engine_config`.
- ZeRO-1/2: the target encoder stays whole (fp32) on every rank; the EMA reads the rank's encoder weights.
- ZeRO-3: the target encoder is a second, optimizer-less engine partitioned exactly like the encoder; the
  EMA runs over this rank's slices, reading the fp32 master slice of the same parameter from the optimizer:
  no collective (``fastjepa.train.zero``). Its checkpoints are per-rank shard files beside DeepSpeed's own.
- A non-finite step skips on every rank: the verdict is all-reduced, fused AdamW gets ``found_inf``, and a
  step DeepSpeed skips itself (ZeRO-1/2 overflow checks) counts as skipped too.
- On the CPU (gloo), DeepSpeed's shared-memory all-reduce buffers are unlinked after start-up
  (:func:`release_shm_buffer_name`).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from ..config import Config
from ..io.files import checkpoint_tag
from ..io.train_state import TrainState
from . import zero
from .backend import pick_device
from .launch import Launch

TAG_RE = re.compile(r"step_\d{8}")


def release_shm_buffer_name(rank: int) -> None:
    """Unlink this rank's ``/dev/shm`` all-reduce buffer of DeepSpeed's CPU backend.

    DeepSpeed (``ops/csrc/cpu/comm/shm.cpp``) creates one file per rank, named after the uid,
    MASTER_ADDR, MASTER_PORT and rank, and never unlinks it: each CPU run leaves tens of MB per rank
    in /dev/shm until it fills. Once every rank has mapped its peers' files (the caller's barrier) the
    names can go; the memory stays mapped until the last rank exits, and a killed run leaves nothing.
    """
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{rank}")
    try:
        os.unlink(name)
    except FileNotFoundError:  # not all ranks on this node: DeepSpeed made no buffer
        pass


def free_port() -> int:
    """A TCP port nobody listens on now (for a one-process DeepSpeed run's own rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DeepSpeedBackend:
    """``deepspeed.initialize`` engines for the online model (and, under ZeRO-3, the target encoder)."""

    def __init__(self, cfg: Config, launch: Launch):
        self.cfg = cfg
        # --- launcher detection (launch.py): DeepSpeed joins through torch's env:// variables, so a SLURM
        # launch's are made from SLURM's, and one process on its own gets a rendezvous of its own
        env = launch.torch_env()
        if launch.kind == "none":
            env["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(free_port())
        os.environ.update(env)
        self.launch = launch
        # ---
        comm = "nccl" if torch.cuda.is_available() and cfg.train.device != "cpu" else "gloo"
        deepspeed.init_distributed(dist_backend=comm)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        if comm == "gloo":
            dist.barrier()  # every rank has mapped its peers' shared-memory buffers
            release_shm_buffer_name(self.rank)
        self.device = pick_device(cfg, launch.local_rank)
        self.zero3 = cfg.deepspeed.zero_stage == 3

    def prepare(self, model, target, optimizer) -> None:
        self.model, self.target = model, target
        width = model.encoder.embed_dim
        if self.zero3 and self.cfg.model.activation_checkpointing == "non_reentrant":
            # ZeRO-3 gathers parameters in module hooks that must fire again in the recomputation
            if self.is_main:
                print("fastjepa: ZeRO-3 uses reentrant activation checkpointing", file=sys.stderr)
            for module in (model.encoder, model.predictor):
                module.checkpointing = "reentrant"
        config = zero.engine_config(self.cfg, width, self.device.type)
        if self.cfg.deepspeed.load_universal:
            config["checkpoint"] = {"load_universal": True}
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.inner_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        self.target_engine = None
        if self.zero3:
            self.target_engine, *_ = deepspeed.initialize(model=target, config=zero.target_engine_config(self.cfg, width))
            self._ema = zero.ema_shards(target, model.encoder)  # this rank's slices: the EMA never leaves the rank
        else:
            self._ema = list(target.parameters()), list(model.encoder.parameters())
        self.grad_params = [p for p in model.parameters() if p.requires_grad]

    # ---- the step -----------------------------------------------------------------------------------
    def forward(self, images, masks):
        return self.engine(images, masks)

    def target_forward(self, images):
        return (self.target_engine or self.target)(images)

    def backward(self, loss, accum: int, last: bool) -> None:
        self.engine.backward(loss)  # DeepSpeed scales by 1 / accum itself
        if not last:
            # DeepSpeed counts micro-batches in step() (a no-op before the boundary): without this call every
            # backward looks like the first of a window, so gradients are reduced at the wrong micro-batch and
            # the optimizer runs only every other accumulation window
            self.engine.step()

    def update(self, found_inf):
        grad_norm = None
        if self.cfg.deepspeed.zero_stage == 0:
            # no ZeRO: the last backward all-reduced the full gradients; DeepSpeed reports no norm then
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.grad_params if p.grad is not None],
                                                      foreach=True)
            found_inf = found_inf | ~torch.isfinite(grad_norm)
        verdict = found_inf.float()  # gloo reduces floats; the same verdict on every rank
        dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
        found_inf = verdict > 0
        self.inner_optimizer.found_inf = verdict
        self.engine.step()
        if not self.engine.was_step_applied():  # ZeRO-1/2 skip a step with non-finite gradients themselves
            found_inf = torch.ones_like(found_inf)
        if grad_norm is None:  # ZeRO-1/2/3: the pre-clip norm DeepSpeed computed on the partitions
            norm = self.engine.get_global_grad_norm()
            grad_norm = float("nan") if norm is None else norm  # already on the host: no copy back
        return found_inf, grad_norm

    def ema_pairs(self):
        return self._ema

    # ---- collectives --------------------------------------------------------------------------------
    def all_reduce_sum(self, values):
        values = values.to(self.device)
        dist.all_reduce(values)
        return values.cpu()

    def any_rank(self, flag: bool) -> bool:
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())  # note: a host sync, made only where the caller needs a decision

    def gather_objects(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def checkpoint_store(self, folder: Path, keep: int):
        return DeepSpeedStore(Path(folder) / "deepspeed", keep, self)

    def close(self) -> None:
        pass


class DeepSpeedStore:
    """DeepSpeed's tag folders ``checkpoints/deepspeed/step_XXXXXXXX/``: every rank writes its model and
    optimizer partitions, our state rides in the client state, and under ZeRO-3 each rank also writes its
    target slices (before DeepSpeed updates ``latest``, so a tag ``latest`` names is complete)."""

    def __init__(self, folder: Path, keep: int, backend: DeepSpeedBackend):
        self.folder, self.keep, self.backend = Path(folder), keep, backend
        self.tag_dir: Path | None = None  # the newest tag written or loaded

    def save(self, state: TrainState) -> None:
        b, tag = self.backend, checkpoint_tag(state.step)
        if b.zero3:
            zero.save_target_shard(self.folder / tag, b.target, b.rank, b.world_size)
        else:
            state.target = b.target.state_dict()
        # nested under one key: DeepSpeed merges client_state into its own top level, where our "skipped_steps"
        # overwrote its counter and was then dropped again on load
        b.engine.save_checkpoint(str(self.folder), tag=tag, client_state={"fastjepa": state.to_dict(weights=False)})
        self.tag_dir = self.folder / tag
        if b.is_main:  # train.keep_checkpoints (DeepSpeed's save_checkpoint keeps every tag)
            tags = sorted(p for p in self.folder.iterdir() if p.is_dir() and TAG_RE.fullmatch(p.name))
            for old in tags[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)

    def load_latest(self):
        b = self.backend
        path, client = b.engine.load_checkpoint(str(self.folder))
        if path is None:
            return None
        need = () if b.zero3 else ("target",)
        state = TrainState.from_dict(client["fastjepa"], f"checkpoint '{path}'", need=need)
        self.tag_dir = Path(path).parent
        if b.zero3:
            zero.load_target_shard(self.tag_dir, b.target, b.rank, b.world_size)
        else:
            b.target.load_state_dict(state.target)
        return state, str(path)

    def export_target(self, state: TrainState, final: bool):
        b = self.backend
        if not b.zero3:
            return b.target.state_dict()
        if not final:
            return None  # the whole target exists only in the shard files until the end
        b.barrier()  # every rank's shard file is written
        return zero.consolidate_target(self.tag_dir) if b.is_main else None


__all__ = ["DeepSpeedBackend", "DeepSpeedStore", "release_shm_buffer_name"]
