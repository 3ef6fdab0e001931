"""The I-JEPA trainer: wires the components of a run and runs the loop.

- the execution backend (``backend.py``: one process, or DeepSpeed ZeRO in ``deepspeed_backend.py``);
- the models (``fastjepa.models``: online model + target encoder) and the optimizer (``fastjepa.optim``);
- the step (``step.py``: forward, loss, backward, update, EMA);
- the data (``fastjepa.data``: a ``BatchStream``, the torch DataLoader or DALI);
- the checkpoints (``checkpoint.py``: one ``TrainState`` schema, save / resume / prune / target export);
- the run folder (``run_dir.py``: lock, fresh-run check, clean-up) and the resume check (``resume_config.py``);
- the metrics (``metrics.py``: the logging window and the logger) and stop requests (``signals.py``).

The exit codes are in ``exits.py``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ..config import Config, batch_summary, global_batch_warning
from ..data import DataError, build_batch_stream, restore_stream
from ..io.train_state import TrainState
from ..models import build_models, compile_blocks
from ..optim import build_optimizer
from .backend import make_backend
from .checkpoint import Checkpoints
from .exits import EXIT_DATA, EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_OK, EXIT_SAVE, stop_line
from .metrics import MetricsLogger, MetricsWindow, check_monitoring
from .online_probe import build_online_probe
from .run_dir import RunDir
from .signals import StopRequests
from .step import TrainStep


class Trainer:
    """``Trainer(cfg, output_dir, resume=False).train()`` -> exit code. ``step``: optimizer steps done.
    ``overwrite``: delete a run already in ``output_dir`` (else a fresh run there is an error)."""

    def __init__(self, cfg: Config, output_dir: str | Path, resume: bool = False, local_rank: int | None = None,
                 overwrite: bool = False):
        self.cfg, self.output_dir = cfg, Path(output_dir)
        check_monitoring(cfg)  # a logger asked for but not installed: a config error before anything starts
        self.backend = make_backend(cfg, local_rank)
        self.device, self.rank, self.world_size = self.backend.device, self.backend.rank, self.backend.world_size
        self.is_main = self.backend.is_main
        self.run_dir = RunDir.open(self.output_dir, self.backend, resume, overwrite, say=self.say)  # held till the end
        try:
            self._build(cfg, resume)
        except BaseException:
            self.run_dir.release()
            raise

    def _build(self, cfg: Config, resume: bool) -> None:
        torch.manual_seed(cfg.train.seed)  # every rank starts from the same weights
        with torch.device(self.device):  # initialise on the device: a ViT-H takes seconds on a CPU
            self.model, self.target = build_models(cfg)
        if cfg.train.compile:
            compile_blocks(self.model, self.target)
        self.backend.prepare(self.model, self.target, build_optimizer(self.model, cfg.optim))
        self.step_fn = TrainStep(cfg, self.backend, self.model.encoder.ops_backend)
        self.checkpoints = Checkpoints(self.output_dir, self.backend, cfg.train.keep_checkpoints)
        self.data, loader_line = build_batch_stream(cfg, self.model.encoder.grid, self.rank, self.world_size, self.device)
        self.probe, probe_note = build_online_probe(cfg, self.model.encoder.embed_dim, self.device)  # or None
        self.step_fn.probe = self.probe
        for line in (f"fastjepa: data loader: {loader_line}", batch_summary(cfg, self.world_size, self.data.steps_per_epoch),
                     global_batch_warning(cfg, self.world_size), probe_note):
            if line:
                self.say(line)
        self.step = 0  # optimizer steps done
        self.skipped_images = 0  # this rank's count (rank 0 also carries the resumed total)
        self.stop = StopRequests(watch=self.backend.orphan_watch())
        if resume:
            self.resume()

    def say(self, text: str) -> None:
        if self.is_main:
            print(text, file=sys.stderr, flush=True)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.backend.optimizer

    @property
    def autocast(self):
        return self.step_fn.autocast

    @property
    def batches(self):
        """The torch loader's random-access batches (``batches[(epoch, step)]``), for benchmarks and tests."""
        return self.data.batches

    # ---- the step and the state -------------------------------------------------------------------
    def train_step(self, micro_batches, want_stats: bool = False) -> dict:
        """One optimizer step over ``grad_accum_steps`` micro-batches (device tensors back)."""
        out = self.step_fn(self.step, micro_batches, want_stats)
        self.step += 1
        return out

    def state(self) -> TrainState:
        """This run's state without the weights (the checkpoint store adds them); collective under DeepSpeed."""
        skipped = self.backend.all_reduce_sum(torch.tensor([float(self.skipped_images)], dtype=torch.float64))
        loader_state = self.data.state_dict()
        return TrainState(step=self.step, config=self.cfg.to_dict(), skipped_images=int(skipped.item()),
                          torch_rng=torch.get_rng_state(), **self.step_fn.counters(),
                          data=None if loader_state is None else self.backend.gather_objects(loader_state))

    def save(self, final: bool = False) -> None:
        self.checkpoints.save(self.state(), final)
        if self.probe is not None and self.is_main:  # the probe's own small file beside the checkpoints
            self.probe.save(self.output_dir / "checkpoints", self.step)

    def resume(self) -> None:
        state, where = self.checkpoints.resume(self.cfg.to_dict(), say=self.say) or (None, None)
        self.step = state.step if state else 0
        self.run_dir.truncate_metrics(self.step, say=self.say)  # steps logged after the checkpoint come again
        if state is None:
            return
        # the saved count is the sum over ranks: rank 0 carries it on, so sums stay right on any world size
        self.skipped_images = state.skipped_images if self.is_main else 0
        self.step_fn.load_counters(state)
        if state.torch_rng is not None:
            torch.set_rng_state(state.torch_rng.cpu())
        if self.probe is not None:
            self.probe.load(self.output_dir / "checkpoints")
        warning = restore_stream(self.data, state.data, self.rank, self.world_size)
        if warning:
            self.say(f"fastjepa: {warning}")
        self.say(f"fastjepa: resumed from {where} at step {self.step}")

    # ---- the loop -----------------------------------------------------------------------------------
    def train(self) -> int:
        """Run to ``train.max_steps``; returns the process exit code."""
        try:
            with self.stop:  # before the loader starts its workers (they ignore the signals the trainer handles)
                return self._loop()
        except (DataError, OSError, KeyboardInterrupt) as err:  # bad data, a failed write, a second Ctrl-C
            if isinstance(err, DataError) and self.world_size == 1 and self.step > 0:
                self.save(final=True)  # with several ranks a one-rank save would hang
            line, code = stop_line(err, self.step, self.checkpoints.saved_step, self.output_dir)
            print(line, file=sys.stderr, flush=True)
            return code
        finally:
            self.data.close()
            self.run_dir.release()

    def _loop(self) -> int:
        t, accum = self.cfg.train, self.cfg.train.grad_accum_steps
        if self.is_main:
            (self.output_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        batches = self.data.iterate(self.step * accum, t.max_steps * accum)
        logger = MetricsLogger(self.output_dir, t.max_steps, self.step, enabled=self.is_main,
                               progress=t.progress, tensorboard=t.tensorboard, wandb=t.wandb, config=self.cfg.to_dict())
        window = MetricsWindow(self.model, self.device, probe=self.probe)
        # the host reads device state only every check_every steps; ranks agree on stopping as often (one rank
        # has nobody to agree with: it stops at the first step boundary after a signal)
        check_every = min(t.log_every, max(1, t.max_nonfinite_steps))
        agree_every = check_every if self.world_size > 1 else 1
        try:
            while self.step < t.max_steps:
                waited = time.perf_counter()
                micro = [next(batches) for _ in range(accum)]
                wait = time.perf_counter() - waited
                log_now = (self.step + 1) % t.log_every == 0 or self.step + 1 == t.max_steps
                out = self.train_step(micro, want_stats=log_now)
                self.skipped_images += sum(b.skipped for b in micro)
                window.add(out, micro, wait)
                logger.advance()
                if log_now:
                    logger.log(window.record(self.step, micro[-1].epoch, out, self.backend, self.skipped_images,
                                             self.step_fn.skipped_steps))
                if self.step % check_every == 0 and int(self.step_fn.nonfinite_run) >= t.max_nonfinite_steps:
                    self.save(final=True)
                    logger.message(f"fastjepa: stopping: {int(self.step_fn.nonfinite_run)} non-finite steps in a row "
                                   f"(train.max_nonfinite_steps={t.max_nonfinite_steps}); checkpoint at step {self.step}")
                    return EXIT_NONFINITE
                stop, save_now = self.stop.poll(self.backend) if self.step % agree_every == 0 else (None, False)
                if stop:
                    self.save(final=True)
                    logger.message(f"fastjepa: {stop}: checkpoint saved at step {self.step}; exiting")
                    return EXIT_OK
                if save_now or (self.step % t.checkpoint_every == 0 and self.step < t.max_steps):
                    self.save()
                    if save_now:
                        logger.message(f"fastjepa: save requested (SIGUSR1): checkpoint saved at step {self.step}")
            self.save(final=True)
            return EXIT_OK
        finally:
            logger.close()

    def close(self) -> None:
        """Release the run folder without training (``train()`` releases it itself)."""
        self.run_dir.release()


__all__ = ["EXIT_DATA", "EXIT_INTERRUPTED", "EXIT_NONFINITE", "EXIT_OK", "EXIT_SAVE", "Trainer"]
