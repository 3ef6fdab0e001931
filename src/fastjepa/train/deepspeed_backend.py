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
- Each rank watches its launcher (DeepSpeed's ``launch.py``, and the ``deepspeed`` runner above it): when one
  is gone the run stops with a checkpoint (``orphan_watch``; DeepSpeed's runner dies on SIGTERM without
  passing it on, and a killed ``launch.py`` leaves its ranks running).
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
from ..io.files import (
    CheckpointError,
    SaveError,
    atomic_write,
    checkpoint_tag,
    free_space,
    human_bytes,
    save_error,
    verify_checkpoint_file,
)
from ..io.train_state import TrainState
from . import zero
from .backend import pick_device
from .checkpoint import CORRUPT_DIR, set_aside
from .launch import Launch

LAUNCHERS = {"deepspeed.launcher.launch": "DeepSpeed's launch.py", "torch.distributed.run": "torchrun",
             "torchrun": "torchrun"}

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

    def orphan_watch(self) -> list[tuple[int, int, str]]:
        """This rank under its launcher, and DeepSpeed's launch.py under the ``deepspeed`` runner."""
        import psutil  # a DeepSpeed requirement

        me, parent, watch = os.getpid(), os.getppid(), []
        try:
            command = " ".join(psutil.Process(parent).cmdline())
            name = next((n for key, n in LAUNCHERS.items() if key in command), None)
            if name is not None:
                watch.append((me, parent, name))
            if name == "DeepSpeed's launch.py":
                runner = psutil.Process(parent).ppid()
                if "deepspeed" in " ".join(psutil.Process(runner).cmdline()):
                    watch.append((parent, runner, "the deepspeed runner"))
        except psutil.Error:  # a launcher gone already: the watch of this rank's parent sees it
            pass
        return watch

    def checkpoint_store(self, folder: Path, keep: int):
        return DeepSpeedStore(Path(folder) / "deepspeed", keep, self)

    def close(self) -> None:
        pass


class DeepSpeedStore:
    """DeepSpeed's tag folders ``checkpoints/deepspeed/step_XXXXXXXX/``: every rank writes its model and
    optimizer partitions, our state rides in the client state, and under ZeRO-3 each rank also writes its
    target slices. ``latest`` is written by us, atomically, once every rank's files are written (DeepSpeed
    writes it before its last barrier, non-atomically), so a tag newer than ``latest`` is an unfinished save.

    Resume: the ranks check the tags' files between them (each ``.pt`` a whole zip, each shard file whole;
    each rank reads its own model-states file, weights-only) and all-reduce the verdicts, so every rank takes
    the same newest good tag; the bad ones go to ``checkpoints/corrupt/``."""

    def __init__(self, folder: Path, keep: int, backend: DeepSpeedBackend):
        self.folder, self.keep, self.backend = Path(folder), keep, backend
        self.tag_dir: Path | None = None  # the newest tag written or loaded

    # ---- save ---------------------------------------------------------------------------------------
    def save(self, state: TrainState) -> None:
        b, tag = self.backend, checkpoint_tag(state.step)
        self._check_space(tag)
        try:
            if b.zero3:
                zero.save_target_shard(self.folder / tag, b.target, b.rank, b.world_size)
            else:
                state.target = b.target.state_dict()
            # nested under one key: DeepSpeed merges client_state into its own top level, where our "skipped_steps"
            # overwrote its counter and was then dropped again on load
            b.engine.save_checkpoint(str(self.folder), tag=tag, client_state={"fastjepa": state.to_dict(weights=False)},
                                     save_latest=False)
        except (OSError, RuntimeError) as err:  # this rank stops (exit 5); launch.py then stops the others
            raise err if isinstance(err, SaveError) else save_error(self.folder / tag, err) from err
        self.tag_dir = self.folder / tag
        if b.is_main:
            atomic_write(self.folder / "latest", lambda tmp: Path(tmp).write_text(tag))
            for old in self._tags()[max(1, self.keep):]:  # train.keep_checkpoints; never the tag just written
                shutil.rmtree(old, ignore_errors=True)

    def _check_space(self, tag: str) -> None:
        """Refuse a save the disk cannot hold (the previous tag's size), on every rank alike: a save that
        fails on one rank half-way would leave the others waiting in DeepSpeed's barriers."""
        b, short = self.backend, None
        if b.is_main and self.tag_dir is not None and self.tag_dir.is_dir():
            need = sum(p.stat().st_size for p in self.tag_dir.rglob("*") if p.is_file())
            free = shutil.disk_usage(self.folder).free
            if free < need:
                short = (f"not enough space to write checkpoint '{self.folder / tag}': the previous one took "
                         f"{human_bytes(need)}, {free_space(self.folder)} on that file system")
        if b.any_rank(short is not None):
            raise SaveError(short or f"not enough space to write checkpoint '{self.folder / tag}' (rank 0 says why)")

    # ---- resume -------------------------------------------------------------------------------------
    def _tags(self) -> list[Path]:
        """The tag folders, newest first."""
        if not self.folder.is_dir():
            return []
        return sorted((p for p in self.folder.iterdir() if p.is_dir() and TAG_RE.fullmatch(p.name)), reverse=True)

    def _model_states(self, tag_dir: Path) -> Path:
        # DeepSpeed's name for this rank's file holding the client state (mp_rank_00_model_states.pt, or one
        # per rank under ZeRO-3)
        return Path(self.backend.engine._get_ckpt_name(str(self.folder), tag_dir.name))

    def _peek(self, tag_dir: Path) -> TrainState:
        """Our state from this rank's model-states file, weights-only and memory-mapped (no weights read)."""
        path = self._model_states(tag_dir)
        verify_checkpoint_file(path)
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - torch's text here suggests weights_only=False: never pass that on
            raise CheckpointError(f"'{path}' cannot be read weights-only (a damaged or foreign file)") from None
        client = raw.get("fastjepa") if isinstance(raw, dict) else None
        if not isinstance(client, dict):
            raise CheckpointError(f"'{path}' holds no fastjepa training state (no 'fastjepa' client state)")
        return TrainState.from_dict(client, f"checkpoint '{path}'", need=() if self.backend.zero3 else ("target",))

    def _problem(self, tag_dir: Path) -> str | None:
        """Why this rank's share of the tag does not load, or None."""
        b = self.backend
        files = sorted(p for p in tag_dir.iterdir() if p.suffix in (".pt", ".safetensors"))
        try:
            for path in files[b.rank::b.world_size]:  # each file checked once, by one rank
                verify_checkpoint_file(path)
            self._peek(tag_dir)
        except CheckpointError as err:
            return str(err)
        return None

    def load_latest(self, accept):
        b = self.backend
        if b.cfg.deepspeed.load_universal:  # the tag DeepSpeed's latest_universal names, as it is
            return self._load(None, accept)
        tags, latest = self._tags(), self.folder / "latest"
        named = latest.read_text().strip() if latest.is_file() else ""
        if TAG_RE.fullmatch(named):  # tags after `latest`: saves that were killed before every rank finished
            unfinished = [t for t in tags if t.name > named]
            tags = [t for t in tags if t.name <= named]
            if b.is_main and unfinished:
                for t in unfinished:
                    shutil.rmtree(t, ignore_errors=True)
                print(f"fastjepa: removed {len(unfinished)} unfinished checkpoint(s) after {named}: "
                      f"{', '.join(t.name for t in unfinished)}", file=sys.stderr, flush=True)
        if not tags:
            return None
        problems = [self._problem(t) for t in tags]
        votes = b.all_reduce_sum(torch.tensor([float(p is not None) for p in problems], dtype=torch.float64)).tolist()
        good = next((i for i, v in enumerate(votes) if v == 0), None)
        for tag_dir, problem in zip(tags[:good], problems):
            if problem is not None and not b.is_main:
                print(f"fastjepa: rank {b.rank}: {problem}", file=sys.stderr, flush=True)
            if b.is_main:
                reason = problem or f"checkpoint '{tag_dir}' failed its check on another rank (see its line)"
                set_aside(tag_dir, self.folder.parent / CORRUPT_DIR, CheckpointError(reason))
        if good is None:
            raise CheckpointError(f"none of the {len(tags)} checkpoints in '{self.folder}' loads (all moved to "
                                  f"{self.folder.parent / CORRUPT_DIR}): start again with --overwrite, or restore one")
        if b.is_main and good > 0:
            atomic_write(latest, lambda tmp: Path(tmp).write_text(tags[good].name))
        return self._load(tags[good], accept)

    def _load(self, tag_dir: Path | None, accept):
        b, need = self.backend, () if self.backend.zero3 else ("target",)
        if tag_dir is not None:
            accept(self._peek(tag_dir), f"'{tag_dir}'")  # before the engine loads weights of another shape
        path, client = b.engine.load_checkpoint(str(self.folder), tag=None if tag_dir is None else tag_dir.name)
        if path is None:
            return None
        state = TrainState.from_dict(client["fastjepa"], f"checkpoint '{path}'", need=need)
        if tag_dir is None:
            accept(state, f"'{path}'")
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
