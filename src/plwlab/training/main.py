"""The train.py command: ``python train.py [plw=0.1] [model=tiny] [data=alpaca_sample] ...`` (also ``plwlab-train``
and ``python -m plwlab.training.main``). Sweep: ``python train.py -m plw=0,0.01,0.1,1``. See README.md,
docs/cluster.md and conf/train.yaml."""

import logging
import os
from pathlib import Path

import hydra
import torch.distributed
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from plwlab import CONF_DIR
from plwlab.data.sources import DataError
from plwlab.rundir import SWEEP_ID, RunError, record_failure
from plwlab.training.config import ConfigError, batch_geometry, register
from plwlab.training.launch import die_with_parent
from plwlab.training.model import ModelLoadError
from plwlab.training.module import TrainingDiverged
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
    except (ConfigError, DataError, ModelLoadError, RunError, TrainingDiverged) as e:
        if multirun or os.environ.get(SWEEP_ID):  # a sweep's job (here, or in a torchrun group): the summary lists it
            record_failure(Path(hydra_cfg.runtime.output_dir), e)
        if multirun:  # one failing run must not stop the sweep
            log.error("run failed: %s", e)
            return None
        raise SystemExit(f"error: {e}") from None
    except Exception as e:
        if multirun:
            log.exception("run failed")
            record_failure(Path(hydra_cfg.runtime.output_dir), e)
            return None
        if lost_peer(e):  # another process of this run died (killed, out of memory): its error is the one to read
            raise SystemExit(f"error: rank {os.environ.get('RANK', 0)} stopped: another process of this run died "
                             f"({str(e).strip().splitlines()[0][:200]}); relaunch the same command to resume from the "
                             "last checkpoint") from None  # fmt: skip
        raise
    return metrics.get("val/loss")


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another rank went away (gloo or NCCL)."""
    text = str(error)
    return isinstance(error, torch.distributed.DistError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")
    )


def run() -> None:
    """train.py's entry point: :func:`main`, with Ctrl-C or a signal forwarded by a launcher ending in one line."""
    try:
        main()
    except KeyboardInterrupt as e:
        raise SystemExit(f"interrupted{f' ({e})' if str(e) else ''}: relaunch the same command to resume (finished "
                         "runs are skipped, interrupted ones resume from their last checkpoint)") from None


register()
die_with_parent()  # the ranks a plwlab launcher starts end with it

if __name__ == "__main__":
    run()
