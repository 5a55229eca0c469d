"""Fine-tune with a prompt loss weight: python train.py [plw=0.1] [model=tiny] [data=alpaca_sample] ...

Sweep: python train.py -m plw=0,0.01,0.1,1. See README.md and conf/train.yaml.
"""

import hydra
from omegaconf import DictConfig

from plwlab.config import ConfigError, register
from plwlab.alpaca import DataError
from plwlab.module import ModelLoadError
from plwlab.train import train

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except (ConfigError, DataError, ModelLoadError) as e:
        raise SystemExit(f"error: {e}") from None
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
