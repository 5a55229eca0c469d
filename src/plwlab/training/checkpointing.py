"""Training checkpoints that are always whole: written aside, then published by an atomic link flip.

``checkpoints/step-00000050.ckpt`` (a file, or a folder of shards under FSDP2) is written by every rank; once all
ranks are done and the next step has ended (Lightning has then logged step 50, and the loggers are flushed first,
so ``metrics.csv`` holds every row the checkpoint covers), rank 0 points ``checkpoints/last.ckpt`` (a symbolic link)
at it in one atomic rename and deletes the previous one. A preemption or a full disk at any moment leaves ``last.ckpt`` pointing at the previous complete
checkpoint, never at a mix.

SIGTERM (SLURM's preemption, ``scancel``, ``scontrol requeue``, a kill) and the preemption signal of submitit
(SIGUSR2, sent ``signal_delay_s`` before a SLURM time limit) are answered at the end of the current optimizer step:
every rank saves a checkpoint and the run directory says ``requeued`` (SIGUSR2 under submitit: the job requeues
itself) or ``interrupted`` (relaunch, or SLURM's requeue, resumes it). The process ends (:class:`Preempted`) as the
next step would start: after Lightning has logged the saved step and run a validation due after it (at an epoch's
end), which the resumed run does not repeat. So a preemption loses at most the step under way, and no log row.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from plwlab.rundir import LAST_CHECKPOINT, RunDir, RunState

log = logging.getLogger(__name__)


PREEMPT_SIGNAL = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))  # submitit's


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (full disk, unwritable directory); the previous one is intact."""


class Preempted(SystemExit):
    """The run stopped on a signal after saving a checkpoint. ``status`` is what its run directory now says:
    ``requeued`` (SLURM starts it again) or ``interrupted`` (relaunching the same command resumes it)."""

    def __init__(self, status: RunState, reason: str) -> None:
        hint = "SLURM starts it again" if status is RunState.REQUEUED else "relaunch the same command to resume"
        super().__init__(f"{reason}; {hint}")
        self.status, self.reason = status, reason


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class RunCheckpoint(Checkpoint):
    """Checkpoint the whole training state (model, optimizer, schedule, loop and data position, callbacks) every
    ``every_n_steps`` optimizer steps and/or every ``every_minutes`` minutes of training (rank 0's clock), as
    described in this module's docstring. ``keep=False`` (default): :meth:`discard` removes the checkpoints once the
    run has finished (train.py calls it after the HF export and ``status.json`` are written); ``keep=True`` also
    saves the final state at the end of training and keeps it. Logs ``checkpoint/save_seconds``. A Lightning
    ``Checkpoint``, so the Trainer runs it after every other callback: their state of the step is in the file."""

    def __init__(
        self, dirpath: str | None = None, every_n_steps: int | None = 50, every_minutes: float | None = None,
        keep: bool = False,
    ) -> None:  # fmt: skip
        if every_n_steps is not None and every_n_steps < 1 or every_minutes is not None and every_minutes <= 0:
            raise ValueError(f"every_n_steps must be >= 1 and every_minutes > 0 (or null), got {every_n_steps}, {every_minutes}")
        self.dirpath = None if dirpath is None else Path(dirpath)  # None: the run directory's checkpoints/
        self.every_n_steps, self.every_minutes, self.keep = every_n_steps, every_minutes, keep
        self._seen_step = 0
        self._last_save = time.monotonic()
        self._unpublished: Path | None = None  # written (or being written) but not yet last.ckpt
        self._signal: int | None = None  # a stop signal received, answered at the end of the optimizer step
        self._stopping = False  # the step of the signal is saved: end the process before the next one starts
        self._handlers: dict[int, Any] = {}  # the handlers ours replaced (submitit's requeue among them)

    @property
    def last(self) -> Path:
        return self.dirpath / LAST_CHECKPOINT

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = RunDir(trainer.default_root_dir).checkpoints

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen_step, self._last_save = trainer.global_step, time.monotonic()
        # installed now, after Lightning's own (which stop at the next batch without saving, and under several
        # processes broadcast from inside the handler): ours only take note; the step's end does the rest
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, PREEMPT_SIGNAL):
                self._handlers[signum] = signal.signal(signum, self._take_note)

    def _take_note(self, signum: int, frame: FrameType | None) -> None:
        self._signal = self._signal or signum

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.keep:
            self.save_final(trainer)
        self.publish(trainer, wait=True)

    def save_final(self, trainer: L.Trainer) -> None:
        """Save the state of the last step unless it is already saved, and publish it (every rank calls it)."""
        latest = self._unpublished.name if self._unpublished is not None else self.last.resolve().name
        if latest != self._name(trainer.global_step):
            self.save(trainer)
        self.publish(trainer, wait=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._handlers.items():
            # unless Lightning's teardown already put back the handlers from before fit: reinstalling the one we
            # replaced (Lightning's, which holds the trainer) would keep every run of a sweep alive in one process
            if signal.getsignal(signum) == self._take_note:
                signal.signal(signum, handler)
        self._handlers.clear()

    def _due(self, trainer: L.Trainer, step: int) -> bool:
        due = self.every_n_steps is not None and step % self.every_n_steps == 0
        if self.every_minutes is not None:  # every rank must take the same decision: rank 0's clock decides
            due |= trainer.strategy.broadcast(time.monotonic() - self._last_save >= 60 * self.every_minutes)
        return due

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # still accumulating gradients: no optimizer step yet
            return
        self._seen_step = step
        stop = self._signal is not None
        if trainer.world_size > 1:  # one rank got it: all stop, at this same step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        self.publish(trainer, wait=False)
        if stop or self._due(trainer, step):
            self.save(trainer)
        if stop:
            self.publish(trainer, wait=True)
            if trainer.is_global_zero:
                run = RunDir(trainer.default_root_dir)
                if run.status_file.exists():
                    run.stop(self._stop_status(), stopped_by=self._signal_name())
            # Lightning logs this step only after on_train_batch_end, and a checkpoint of the step's end holds no
            # validation that follows it: the process ends when the next batch starts (or, the last step, not at all)
            self._stopping = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._stopping:
            self._stop(trainer)
        epochs = trainer.fit_loop.epoch_progress
        if epochs.current.ready == epochs.current.processed:
            # Lightning 2.6, resumed from a checkpoint of an epoch's last step, goes on with the next epoch without
            # counting it as started (FitLoop.on_advance_start skips that on its restart stage); counted here, or the
            # next checkpoint would read as the end of an epoch and its resume would run this epoch again from batch 0
            epochs.increment_ready()
            epochs.increment_started()

    def _stop_status(self) -> RunState:
        requeue = self._signal == PREEMPT_SIGNAL and callable(self._handlers.get(PREEMPT_SIGNAL))
        return RunState.REQUEUED if requeue else RunState.INTERRUPTED

    def _signal_name(self) -> str:
        return signal.Signals(self._signal).name if self._signal else "a signal on another rank"

    def _stop(self, trainer: L.Trainer) -> None:
        """The checkpoint of the signal's step is published and the run directory says so: let submitit requeue
        the job (its preemption signal, rank 0), and end the process."""
        status = self._stop_status()
        requeue = status is RunState.REQUEUED
        trainer.strategy.barrier()
        if requeue and trainer.is_global_zero:
            try:
                self._handlers[PREEMPT_SIGNAL](self._signal, None)  # submitit: requeue this job, then exit
            except SystemExit:
                pass
        raise Preempted(status, f"stopped by {self._signal_name()} after saving a checkpoint at step {trainer.global_step}")

    @staticmethod
    def _name(step: int) -> str:
        return f"step-{step:08d}.ckpt"

    def save(self, trainer: L.Trainer) -> None:
        """Write ``step-N.ckpt`` (all ranks), then atomically point ``last.ckpt`` at it and delete older ones. A
        strategy that saves asynchronously (FSDP2: :class:`~plwlab.training.sharding.FSDP2Strategy`) returns once
        the state is copied aside; the checkpoint is published when every rank has written it (checked at each
        step, :meth:`publish`). ``checkpoint/save_seconds`` is the time training was blocked."""
        start = time.perf_counter()
        self.publish(trainer, wait=True)  # one save in flight at a time: the previous one first (training waits)
        target = self.dirpath / self._name(trainer.global_step)
        try:
            if trainer.is_global_zero:
                self.dirpath.mkdir(parents=True, exist_ok=True)
                _remove(target)  # a leftover of an interrupted save of this same step
            trainer.strategy.barrier()
            trainer.save_checkpoint(target)  # synchronous: ends with a barrier, every rank's shard is on disk
        except OSError as e:
            if trainer.is_global_zero:
                _remove(target)
            raise CheckpointError(f"cannot write checkpoint {target}: {e.strerror or e}; the previous checkpoint is intact") from e
        self._unpublished = target  # published at the next step's end, or at a stop (publish): see there
        self._last_save = time.monotonic()
        seconds = time.perf_counter() - start
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"checkpoint/save_seconds": seconds}, step=trainer.global_step)
        log.info("checkpoint %s: training blocked %.2f s", target, seconds)

    def publish(self, trainer: L.Trainer, wait: bool) -> None:
        """Point ``last.ckpt`` at the checkpoint written last, once every rank has finished writing it (``wait``:
        wait for that; else only if it is done), after the loggers have flushed.

        A checkpoint of step N is published no earlier than the end of step N + 1, when Lightning has logged step
        N's row (it logs after ``on_train_batch_end``, where the checkpoint was written): with the loggers flushed
        first, ``metrics.csv`` holds every row the checkpoint covers before ``last.ckpt`` names it, so a ``kill -9``
        right after cannot lose a row that the resume will not recompute."""
        if self._unpublished is None:
            return
        strategy = trainer.strategy
        if hasattr(strategy, "checkpoint_in_flight"):
            if not wait:
                in_flight = strategy.checkpoint_in_flight()
                if trainer.world_size > 1:  # every rank must be done: one decision for all
                    in_flight = strategy.reduce_boolean_decision(in_flight, all=False)
                if in_flight:
                    return
            try:
                strategy.finish_checkpoint()
            except OSError as e:
                if trainer.is_global_zero:
                    _remove(self._unpublished)
                self._unpublished = None
                raise CheckpointError(f"cannot write checkpoint: {e.strerror or e}; the previous checkpoint is intact") from e
            strategy.barrier()
        target, self._unpublished = self._unpublished, None
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.save()
            link = self.dirpath / f".{LAST_CHECKPOINT}.{os.getpid()}"
            link.unlink(missing_ok=True)
            link.symlink_to(target.name)
            os.replace(link, self.last)  # atomic: last.ckpt names the old or the new checkpoint, never neither
            for old in self.dirpath.glob("step-*.ckpt"):
                if old.name != target.name:
                    _remove(old)
        strategy.barrier()

    def discard(self) -> None:
        """Remove the checkpoints (rank 0 only: call it after training, when no other rank needs them)."""
        if self.dirpath.exists():
            shutil.rmtree(self.dirpath)
