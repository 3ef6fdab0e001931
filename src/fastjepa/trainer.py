"""The I-JEPA trainer: one process (CPU or one GPU) or data-parallel through DeepSpeed.

One step, as data (everything on the device; lengths come from the host-side masks):
  images -> target encoder (all N tokens, no grad) ----------------------------> h [B, N, D]
  images -> context encoder (packed context tokens) -> predictor (context + mask tokens per block)
         -> predictions [T_tgt, D] -> loss vs layer_norm(h) at the target rows -> backward -> AdamW
  -> EMA: target <- momentum * target + (1 - momentum) * context encoder
A non-finite loss or gradient sets ``found_inf`` on the device: the fused AdamW skips its update and
the EMA uses momentum 1, so nothing changes and the host never waits to find out.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from fastjepa_kernels import ema_, jepa_target_loss

from . import schedules, zero
from .checkpoint import export_safetensors, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, load_config
from .data.dali import DaliBatches, choose_loader, dali_problem
from .data.loader import DataError, build_batches, build_loader
from .flops import step_flops
from .metrics import MetricsLogger
from .models import build_encoder, build_predictor
from .models.vit import Block
from .optim import build_optimizer, set_hyperparameters


class IJEPA(nn.Module):
    """Context encoder + predictor: the modules that get gradients. ``forward`` -> predictions [T_tgt, D]."""

    def __init__(self, encoder: nn.Module, predictor: nn.Module):
        super().__init__()
        self.encoder, self.predictor = encoder, predictor

    def forward(self, images, masks):
        context = self.encoder(images, masks.ctx_index, masks.ctx_cu_seqlens, masks.ctx_max_seqlen)
        return self.predictor(context, masks)


def build_models(cfg: Config):
    """(IJEPA online model, target encoder) with the target an exact fp32 copy of the encoder."""
    encoder = build_encoder(cfg.model)
    model = IJEPA(encoder, build_predictor(cfg.model, encoder))
    target = copy.deepcopy(encoder).requires_grad_(False)
    return model, target


def compile_blocks(*models: nn.Module) -> None:
    """``torch.compile`` every transformer block in place (regional compilation: blocks of one width
    share a graph, so ViT-H compiles two, not 76). Token counts change every step: dynamic shapes."""
    for model in models:
        for module in model.modules():
            if isinstance(module, Block):
                module.compile(dynamic=True)


def _deepspeed_wanted(cfg: Config, local_rank: int | None) -> bool:
    if cfg.deepspeed.enabled == "auto":
        return local_rank is not None or "LOCAL_RANK" in os.environ
    return cfg.deepspeed.enabled == "on"


class Trainer:
    def __init__(self, cfg: Config, output_dir: str | Path, resume: bool = False, local_rank: int | None = None):
        self.cfg, self.output_dir = cfg, Path(output_dir)
        self.use_deepspeed = _deepspeed_wanted(cfg, local_rank)
        self.rank, self.world_size = 0, 1
        if self.use_deepspeed:
            self._init_distributed()
        self.device = self._pick_device(local_rank)
        self.is_main = self.rank == 0
        self.output_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.train.seed)  # every rank starts from the same weights

        with torch.device(self.device):  # initialise on the device: a ViT-H takes seconds on a CPU
            self.model, self.target = build_models(cfg)
        self.ops_backend = self.model.encoder.ops_backend  # gather, target loss and EMA follow attention
        if cfg.train.compile:
            compile_blocks(self.model, self.target)
        self.model.to(self.device)
        self.target.to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.engine = self.target_engine = None
        self.zero3 = self.use_deepspeed and cfg.deepspeed.zero_stage == 3
        if self.use_deepspeed:
            self._init_engine()
        if self.zero3:  # this rank's slices: the EMA never leaves the rank (fastjepa/zero.py)
            self.target_params, self.online_params = zero.ema_shards(self.target, self.model.encoder)
        else:
            self.target_params = list(self.target.parameters())
            self.online_params = list(self.model.encoder.parameters())
        self.grad_params = [p for p in self.model.parameters() if p.requires_grad]

        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if cfg.train.precision == "bf16" else nullcontext())
        self.total_steps = cfg.train.schedule_steps or cfg.train.max_steps  # what the schedules span
        self.step = 0  # optimizer steps done
        self.saved_step, self.saved_tag_dir = None, None  # the newest checkpoint written or loaded
        self._data_state = None  # the resumed checkpoint's DALI states
        self.skipped_images = 0
        self.skipped_steps = torch.zeros((), device=self.device)  # device counters: read when logging
        self.nonfinite_run = torch.zeros((), device=self.device)
        self.stop_signal = None
        if resume:
            self._resume()
        self.loader_kind = choose_loader(cfg)
        if self.is_main:
            print(f"fastjepa: data loader: {self._loader_line()}", file=sys.stderr)
        # random access by (epoch, step): the torch loader's dataset (benchmarks and tests read it too)
        self.batches = None if self.loader_kind == "dali" else build_batches(
            cfg, self.model.encoder.grid, self.rank, self.world_size)
        self.dali = None
        if self.loader_kind == "dali":
            self.dali = DaliBatches(cfg, self.model.encoder.grid, self.rank, self.world_size, self.device,
                                    state=self._dali_resume_state())

    # ---- set-up ---------------------------------------------------------------------------------
    def _loader_line(self) -> str:
        if self.loader_kind == "dali":
            where = "GPU (nvImageCodec)" if self.device.type == "cuda" else "CPU"
            return f"NVIDIA DALI, decoding on the {where}"
        why = dali_problem(self.cfg) if self.cfg.data.loader == "auto" else None
        return "torch DataLoader" + (f" ({why})" if why else "")

    def _dali_resume_state(self):
        """This rank's saved DALI pipeline state, if the resumed checkpoint has one for this world size."""
        saved = self._data_state
        if not saved:
            return None
        if len(saved) != self.world_size:
            if self.is_main:
                print(f"fastjepa: the checkpoint's DALI state is for {len(saved)} ranks, not {self.world_size}: "
                      "the data order restarts (masks and step count continue)", file=sys.stderr)
            return None
        return saved[self.rank]

    def _pick_device(self, local_rank) -> torch.device:
        want = self.cfg.train.device
        if want == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device='cuda' but no CUDA device is visible")
        if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
            index = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
        return torch.device("cpu")

    def _init_distributed(self) -> None:
        import deepspeed

        backend = "nccl" if torch.cuda.is_available() and self.cfg.train.device != "cpu" else "gloo"
        deepspeed.init_distributed(dist_backend=backend)
        self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if backend == "gloo":
            torch.distributed.barrier()  # every rank has mapped its peers' shared-memory buffers
            release_shm_buffer_name(self.rank)

    def _init_engine(self) -> None:
        import deepspeed

        width = self.model.encoder.embed_dim
        if self.zero3 and self.cfg.model.activation_checkpointing == "non_reentrant":
            # ZeRO-3 gathers parameters in module hooks that must fire again in the recomputation
            if self.is_main:
                print("fastjepa: ZeRO-3 uses reentrant activation checkpointing", file=sys.stderr)
            for module in (self.model.encoder, self.model.predictor):
                module.checkpointing = "reentrant"
        config = zero.engine_config(self.cfg, width, self.device.type)
        if self.cfg.deepspeed.load_universal:
            config["checkpoint"] = {"load_universal": True}
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimizer,
                                                                 config=config)
        self.inner_optimizer = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        if self.zero3:
            self.target_engine, *_ = deepspeed.initialize(model=self.target,
                                                          config=zero.target_engine_config(self.cfg, width))

    # ---- the step -------------------------------------------------------------------------------
    def train_step(self, micro_batches, want_stats: bool = False) -> dict:
        """One optimizer step over ``grad_accum_steps`` micro-batches. Returns device tensors."""
        lr = schedules.learning_rate(self.step, self.cfg.optim, self.total_steps)
        wd = schedules.weight_decay(self.step, self.cfg.optim, self.total_steps)
        momentum = schedules.ema_momentum(self.step, self.cfg.optim, self.total_steps)
        set_hyperparameters(self.optimizer, lr, wd)
        accum = len(micro_batches)
        loss_sum = torch.zeros((), device=self.device)
        stats = {}
        for i, batch in enumerate(micro_batches):
            images = batch.images.to(self.device, non_blocking=True)
            masks = batch.masks.to(self.device, non_blocking=True)
            with torch.no_grad(), self.autocast:
                h = (self.target_engine or self.target)(images)  # [B, N, D]
            with self.autocast:
                pred = self.model(images, masks) if self.engine is None else self.engine(images, masks)
            loss = jepa_target_loss(pred, h, masks.tgt_index, self.cfg.train.loss, backend=self.ops_backend,
                                    eps=self.cfg.train.target_norm_eps)
            loss_sum += loss.detach()
            if self.engine is None:
                (loss / accum).backward()
            else:
                self.engine.backward(loss)  # DeepSpeed scales by 1 / accum itself
                if i + 1 < accum:
                    # DeepSpeed counts micro-batches in step() (a no-op before the boundary): without this
                    # call every backward looks like the first of a window, so gradients are reduced at the
                    # wrong micro-batch and the optimizer runs only every other accumulation window
                    self.engine.step()
            if want_stats:  # collapse watch: per-dimension std of the target features
                stats["target_feature_std"] = h.float().std(dim=(0, 1)).mean()
                stats["pred_feature_std"] = pred.detach().float().std(dim=0).mean()
        loss_mean = loss_sum / accum
        found_inf = ~torch.isfinite(loss_mean)
        if self.engine is None:
            grads = [p.grad for p in self.grad_params if p.grad is not None]
            if self.cfg.optim.clip_grad:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.grad_params, self.cfg.optim.clip_grad, foreach=True)
            else:
                grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            found_inf |= ~torch.isfinite(grad_norm)
            self.optimizer.found_inf = found_inf.float()  # fused AdamW skips the update on the device
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            grad_norm = None
            if self.cfg.deepspeed.zero_stage == 0:
                # no ZeRO: the last backward all-reduced the full gradients; DeepSpeed reports no norm then
                grad_norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in self.grad_params if p.grad is not None], foreach=True)
                found_inf |= ~torch.isfinite(grad_norm)
            verdict = found_inf.float()  # gloo reduces floats; the same verdict on every rank
            torch.distributed.all_reduce(verdict, op=torch.distributed.ReduceOp.MAX)
            found_inf = verdict > 0
            self.inner_optimizer.found_inf = verdict
            self.engine.step()
            if not self.engine.was_step_applied():  # ZeRO-1/2 skip a step with non-finite gradients themselves
                found_inf = torch.ones_like(found_inf)
            if grad_norm is None:  # ZeRO-1/2: the pre-clip norm DeepSpeed computed on the partitions
                norm = self.engine.get_global_grad_norm()
                grad_norm = float("nan") if norm is None else norm  # already on the host: no copy back
        # EMA: a skipped step keeps the target still (momentum 1), decided on the device
        # (float64 momentum: in fp32, 1 - 0.9999 would be off by ~6e-4 relative)
        momentum_t = torch.full((), momentum, dtype=torch.float64, device=self.device)  # a fill, not a copy
        ema_(self.target_params, self.online_params, torch.where(found_inf, 1.0, momentum_t), backend=self.ops_backend)
        self.skipped_steps += found_inf
        self.nonfinite_run = (self.nonfinite_run + 1) * found_inf
        self.step += 1
        return {"loss": loss_mean, "skipped": found_inf, "grad_norm": grad_norm, "lr": lr, "wd": wd,
                "momentum": momentum, **stats}

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            **({} if self.zero3 else {"target": self.target.state_dict()}),  # ZeRO-3: per-rank shard files
            "optimizer": self.optimizer.state_dict(),
            "skipped_images": self._global_skipped_images(),  # collective under DeepSpeed, like save()
            "skipped_steps": self.skipped_steps.cpu(),
            "nonfinite_run": self.nonfinite_run.cpu(),
            "torch_rng": torch.get_rng_state(),
            "data": self._data_states(),  # DALI pipeline state of every rank (None: the torch loader)
            "config": self.cfg.to_dict(),
        }

    def _data_states(self):
        """Every rank's DALI pipeline state, in rank order (collective under DeepSpeed, like save())."""
        if self.dali is None:
            return None
        mine = self.dali.state_dict()
        if self.engine is None:
            return [mine]
        states = [None] * self.world_size
        torch.distributed.all_gather_object(states, mine)
        return states

    def _global_skipped_images(self) -> int:
        """Unreadable images skipped so far, summed over ranks (each rank counts its own)."""
        if self.engine is None:
            return self.skipped_images
        total = torch.tensor([float(self.skipped_images)], device=self.device)
        torch.distributed.all_reduce(total)
        return int(total.item())

    def save(self, final: bool = False) -> None:
        """A checkpoint of the current step (all ranks under DeepSpeed) + the target as safetensors
        (under ZeRO-3 only when ``final``: the whole target exists only in the shard files until then).
        A step already saved (a run resumed at its last step) is not written again."""
        folder = self.output_dir / "checkpoints"
        if self.step != self.saved_step:
            if self.engine is not None:
                tag = f"step_{self.step:08d}"
                if self.zero3:  # before DeepSpeed's save, which writes `latest` last
                    zero.save_target_shard(folder / "deepspeed" / tag, self.target, self.rank, self.world_size)
                # nested under one key: DeepSpeed merges client_state into its own top level, where our
                # "skipped_steps" overwrote its counter and was then dropped again on load (KeyError on resume)
                client = {"fastjepa": {k: v for k, v in self.state_dict().items() if k not in ("model", "optimizer")}}
                self.engine.save_checkpoint(str(folder / "deepspeed"), tag=tag, client_state=client)
                self.saved_tag_dir = folder / "deepspeed" / tag
                if self.is_main:
                    self._prune_deepspeed_tags(folder / "deepspeed")
            elif self.is_main:
                save_checkpoint(folder, self.step, self.state_dict(), keep=self.cfg.train.keep_checkpoints)
            self.saved_step = self.step
        if self.zero3 and not final:
            return
        if self.zero3:
            torch.distributed.barrier()  # every rank's shard file is written
            state = zero.consolidate_target(self.saved_tag_dir) if self.is_main else None
        else:
            state = self.target.state_dict()
        if self.is_main:
            export_safetensors(self.output_dir / "target_encoder.safetensors", state,
                               metadata={"step": str(self.step), "config": json.dumps(self.cfg.to_dict())})

    def _prune_deepspeed_tags(self, folder: Path) -> None:
        """train.keep_checkpoints for DeepSpeed's tag folders (its save_checkpoint keeps every tag)."""
        tags = sorted(p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"step_\d{8}", p.name))
        for old in tags[: -self.cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def _resume(self) -> None:
        folder = self.output_dir / "checkpoints"
        if self.engine is not None:
            path, client = self.engine.load_checkpoint(str(folder / "deepspeed"))
            if path is None:
                return self._no_checkpoint(folder)
            state = client["fastjepa"]
            self.saved_tag_dir = Path(path).parent
            if self.zero3:
                zero.load_target_shard(self.saved_tag_dir, self.target, self.rank, self.world_size)
        else:
            path = latest_checkpoint(folder)
            if path is None:
                return self._no_checkpoint(folder)
            state = load_checkpoint(path, map_location=self.device)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if not self.zero3:
            self.target.load_state_dict(state["target"])
        self.step = self.saved_step = int(state["step"])
        self._data_state = state.get("data")
        # the saved count is the sum over ranks: rank 0 carries it on, so sums stay right on any world size
        self.skipped_images = int(state["skipped_images"]) if self.is_main else 0
        self.skipped_steps.copy_(state["skipped_steps"])
        self.nonfinite_run.copy_(state["nonfinite_run"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if self.is_main:
            print(f"fastjepa: resumed from {path} at step {self.step}", file=sys.stderr)

    def _no_checkpoint(self, folder):
        if self.is_main:
            print(f"fastjepa: --resume found no checkpoint in {folder}; starting from step 0", file=sys.stderr)

    # ---- the loop -------------------------------------------------------------------------------
    def _on_signal(self, signum, _frame):
        self.stop_signal = signum  # acted on between steps: checkpoint, then a clean exit

    def _should_stop(self, check_every: int) -> bool:
        """Whether a signal asks to stop now. One process: at once (a host flag). Under DeepSpeed every
        rank must stop at the same step (the checkpoint is collective), so the flags are all-reduced,
        only every ``check_every`` steps, which is when the host reads device state anyway."""
        if self.engine is None:
            return self.stop_signal is not None
        if self.step % check_every:
            return False
        flag = torch.tensor([float(self.stop_signal is not None)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())  # note: a host sync, every check_every steps only

    def train(self) -> int:
        """Run to ``train.max_steps``; returns the process exit code."""
        t = self.cfg.train
        if self.is_main:
            (self.output_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        previous = signal.signal(signal.SIGTERM, self._on_signal)
        accum = t.grad_accum_steps
        if self.dali is not None:
            loader = self.dali.iterate(self.step * accum, t.max_steps * accum)
        else:
            loader = build_loader(self.batches, self.step * accum, t.max_steps * accum,
                                  self.cfg.data.num_workers, pin_memory=self.device.type == "cuda")
        batches = iter(loader)
        logger = MetricsLogger(self.output_dir, t.max_steps, self.step, enabled=self.is_main,
                               progress=t.progress, tensorboard=t.tensorboard)
        check_every = min(t.log_every, max(1, t.max_nonfinite_steps))
        window_images, window_wait, window_start = 0, 0.0, time.perf_counter()
        loss_window = torch.zeros((), device=self.device)
        finite_window = torch.zeros((), device=self.device)  # steps in the window with a finite loss
        window_steps, ctx_tokens, tgt_tokens, flops = 0, 0, 0, 0.0
        exit_code = 0
        try:
            while self.step < t.max_steps:
                waited = time.perf_counter()
                micro = [next(batches) for _ in range(accum)]
                window_wait += time.perf_counter() - waited
                log_now = (self.step + 1) % t.log_every == 0 or self.step + 1 == t.max_steps
                out = self.train_step(micro, want_stats=log_now)
                loss_window += torch.where(out["skipped"], 0.0, out["loss"])  # a skipped step's NaN stays out
                finite_window += ~out["skipped"]
                window_steps += 1
                for b in micro:
                    self.skipped_images += b.skipped  # this rank's count; summed over ranks when read
                    window_images += len(b.masks.ctx_lens)
                    ctx_tokens += sum(b.masks.ctx_lens)
                    tgt_tokens += sum(b.masks.tgt_lens)
                    flops += step_flops(self.model, b.masks, len(b.masks.ctx_lens))
                logger.advance()
                if log_now:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()  # logging interval only
                    elapsed = time.perf_counter() - window_start
                    # the window's sums over every rank (logging only): loss, finite steps, images, tokens,
                    # FLOPs, and the unreadable images so far (float64: token and FLOP counts stay exact)
                    totals = torch.tensor([0.0, 0.0, window_images, ctx_tokens, tgt_tokens, flops,
                                           self.skipped_images], dtype=torch.float64)
                    totals[0], totals[1] = loss_window.double().cpu(), finite_window.double().cpu()  # host sync
                    if self.engine is not None:
                        totals = totals.to(self.device)
                        torch.distributed.all_reduce(totals)
                        totals = totals.cpu()
                    loss_sum, finite, images, ctx_sum, tgt_sum, flop_sum, skipped = totals.tolist()
                    record = {
                        "step": self.step,
                        "epoch": micro[-1].epoch,
                        # mean over the finite steps of every rank; null when every step was skipped
                        "loss": loss_sum / finite if finite else None,
                        "lr": out["lr"], "wd": out["wd"], "momentum": out["momentum"],
                        "grad_norm": float(out["grad_norm"]),
                        "images_per_s": images / elapsed,
                        "tflops": flop_sum / elapsed / 1e12,
                        "data_wait_s": window_wait,
                        "context_tokens": ctx_sum / images,
                        "target_tokens": tgt_sum / images,
                        "target_feature_std": float(out["target_feature_std"]),
                        "pred_feature_std": float(out["pred_feature_std"]),
                        "skipped_images": int(skipped),
                        "skipped_steps": int(self.skipped_steps),
                    }
                    logger.log(record)
                    window_images, window_wait, window_steps = 0, 0.0, 0
                    ctx_tokens, tgt_tokens, flops = 0, 0, 0.0
                    loss_window.zero_()
                    finite_window.zero_()
                    window_start = time.perf_counter()
                if self.step % check_every == 0 and int(self.nonfinite_run) >= t.max_nonfinite_steps:
                    self.save(final=True)
                    logger.message(f"fastjepa: stopping: {int(self.nonfinite_run)} non-finite steps in a row "
                                   f"(train.max_nonfinite_steps={t.max_nonfinite_steps}); checkpoint at step {self.step}")
                    exit_code = 3
                    break
                if self._should_stop(check_every):
                    self.save(final=True)
                    logger.message(f"fastjepa: signal {self.stop_signal or 'on another rank'}: "
                                   f"checkpoint saved at step {self.step}")
                    break
                if self.step % t.checkpoint_every == 0 and self.step < t.max_steps:
                    self.save()
            else:
                self.save(final=True)
        except DataError as err:  # raised in a loader worker; its last line names the files
            detail = str(err).strip().splitlines()[-1]
            if self.engine is None and self.step > 0:  # under DeepSpeed a one-rank save would hang
                self.save(final=True)
            print(f"fastjepa: error: {detail} (stopped at step {self.step})", file=sys.stderr, flush=True)
            exit_code = 4
        finally:
            logger.close()
            signal.signal(signal.SIGTERM, previous)
        return exit_code


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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="I-JEPA pretraining (fastjepa)")
    parser.add_argument("--config", help="a JSON config file, or a packaged preset by name (demo, vith14, vitl16, vitb16, vits16)")
    parser.add_argument("--output-dir", default="runs/default", help="checkpoints, metrics.jsonl, config.json")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=5e-4 train.max_steps=100")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg, args.output_dir, resume=args.resume, local_rank=args.local_rank)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"fastjepa: error: {err}", file=sys.stderr)
        return 2
    return trainer.train()
