"""Fine-tune with a prompt loss weight: python train.py [plw=0.1] [model=tiny] [data=alpaca_sample] ...

Sweep: python train.py -m plw=0,0.01,0.1,1. See README.md, docs/cluster.md and conf/train.yaml.
"""

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from plwlab.alpaca import DataError
from plwlab.config import ConfigError, register, world_size
from plwlab.model import ModelLoadError
from plwlab.module import TrainingDiverged
from plwlab.rundir import RunError, record_failure
from plwlab.train import train

register()
log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        if multirun and hydra_cfg.launcher._target_.endswith("BasicLauncher") and world_size(cfg.trainer) > 1:
            raise SystemExit(
                "error: a sweep with the basic launcher runs in one process group, so it cannot start "
                f"{world_size(cfg.trainer)} processes per run; use hydra/launcher=torchrun (this node, one run after "
                "another) or hydra/launcher=slurm"
            )
        metrics = train(cfg)
    except (ConfigError, DataError, ModelLoadError, RunError, TrainingDiverged) as e:
        if multirun:  # one failing run must not stop the sweep; the summary lists it
            log.error("run failed: %s", e)
            record_failure(Path(HydraConfig.get().runtime.output_dir), e)
            return None
        raise SystemExit(f"error: {e}") from None
    except Exception as e:
        if multirun:
            log.exception("run failed")
            record_failure(Path(HydraConfig.get().runtime.output_dir), e)
            return None
        raise
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
