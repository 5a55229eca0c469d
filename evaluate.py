"""Evaluate trained runs into the results table: python evaluate.py run_dir=<run dir or glob> [eval=mechanisms]."""

import hydra
from omegaconf import DictConfig

from plwlab.alpaca import DataError
from plwlab.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except (FileNotFoundError, DataError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
