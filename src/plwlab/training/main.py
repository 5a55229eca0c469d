"""The train.py command: ``python train.py [plw=0.1] [model=tiny] [data=alpaca_sample] ...`` (also ``plwlab-train``
and ``python -m plwlab.training.main``). Sweep: ``python train.py -m plw=0,0.01,0.1,1``. See README.md,
docs/cluster.md and conf/train.yaml."""

import logging
import os
import re
import shlex
import sys
from pathlib import Path

import hydra
import torch.distributed
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from plwlab import CONF_DIR
from plwlab.config import ConfigError, TrainConfig, batch_geometry, register, unknown_override
from plwlab.data.sources import DataError
from plwlab.rundir import SWEEP_ID, RunError, RunState, record_failure
from plwlab.training.callbacks import ExportError
from plwlab.training.checkpointing import Preempted
from plwlab.training.launch import die_with_parent
from plwlab.training.model import ModelLoadError
from plwlab.training.module import TrainingDiverged
from plwlab.training.smollm2 import RESOLVERS
from plwlab.training.train import train

log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        world = batch_geometry(cfg).world_size
        if multirun and hydra_cfg.launcher._target_.endswith("BasicLauncher") and world > 1:
            raise SystemExit(
                "error: a sweep with the basic launcher runs in one process group, so it cannot start "
                f"{world} processes per run; use hydra/launcher=torchrun (this node, one run after another) or "
                "hydra/launcher=slurm"
            )
        metrics = train(cfg)
    except (KeyboardInterrupt, Preempted) as e:
        if multirun or os.environ.get(SWEEP_ID) or getattr(e, "status", None) is RunState.REQUEUED:
            raise  # a sweep's launcher (or SLURM) says what happens next
        # a single run's folder is named by the time it started: the same command would start a new one
        reason = getattr(e, "reason", None) or f"interrupted ({e or 'Ctrl-C'})"
        raise SystemExit(f"{reason}; resume it from its last checkpoint with: {resume_command(hydra_cfg)}") from None
    except (ConfigError, DataError, ModelLoadError, RunError, TrainingDiverged) as e:
        if multirun or os.environ.get(SWEEP_ID):  # a sweep's job (here, or in a torchrun group): the summary lists it
            record_failure(Path(hydra_cfg.runtime.output_dir), e)
        if multirun:  # one failing run must not stop the sweep
            log.error("run failed: %s", e)
            return None
        if isinstance(e, ExportError) and not os.environ.get(SWEEP_ID):
            raise SystemExit(f"error: {e}: {resume_command(hydra_cfg)}") from None
        raise SystemExit(f"error: {e}") from None
    except Exception as e:
        if multirun:
            log.exception("run failed")
            record_failure(Path(hydra_cfg.runtime.output_dir), e)
            return None
        if lost_peer(e):  # another process of this run died (killed, out of memory): its error is the one to read
            again = "relaunch the same command" if os.environ.get(SWEEP_ID) else f"run {resume_command(hydra_cfg)}"
            raise SystemExit(f"error: rank {os.environ.get('RANK', 0)} stopped: another process of this run died "
                             f"({str(e).strip().splitlines()[0][:200]}); {again} to resume from the last "
                             "checkpoint") from None  # fmt: skip
        raise
    return metrics.get("val/loss")


def resume_command(hydra_cfg: DictConfig) -> str:
    """The command that resumes this single run in its own directory (the same command would start a new one)."""
    script = sys.argv[0]
    command = ["python", script] if script.endswith(".py") else [Path(script).name]
    overrides = [shlex.quote(o) for o in hydra_cfg.overrides.task]
    if not any(o.startswith(("hydra.run.dir=", "paths.run_dir=")) for o in hydra_cfg.overrides.task):
        run_dir = hydra_cfg.runtime.output_dir
        plain = re.fullmatch(r"[\w./-]+", run_dir)  # else quoted for Hydra ('...') inside the shell's "..."
        overrides.append(f"hydra.run.dir={run_dir}" if plain else f"\"hydra.run.dir='{run_dir}'\"")
    return " ".join([*command, *overrides])


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another rank went away (gloo or NCCL)."""
    text = str(error)
    return isinstance(error, torch.distributed.DistError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")
    )


def run() -> None:
    """train.py's entry point: :func:`main`, with Ctrl-C or a signal forwarded by a launcher ending in one line."""
    problem = unknown_override(sys.argv[1:], TrainConfig)
    if problem:
        raise SystemExit(f"error: {problem}")
    try:
        main()
    except KeyboardInterrupt as e:
        raise SystemExit(f"interrupted{f' ({e})' if str(e) else ''}: relaunch the same command to resume (finished "
                         "runs are skipped, interrupted ones resume from their last checkpoint)") from None


register(RESOLVERS)
die_with_parent()  # the ranks a plwlab launcher starts end with it

if __name__ == "__main__":
    run()
