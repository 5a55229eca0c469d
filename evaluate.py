"""Evaluate trained runs into the results table: python evaluate.py run_dir=<run dir or glob> [eval=quick|mechanisms|paper]."""

import hydra
from omegaconf import DictConfig

from plwlab.config import register
from plwlab.evaluate import evaluate

register()  # the ${plwlab.asset:...} resolver


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # bad paths or values, failed runs: one line
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
