"""The evaluate.py command: ``python evaluate.py run_dir=<run dir or glob> [eval=quick|mechanisms|paper]`` (also
``plwlab-evaluate`` and ``python -m plwlab.evaluation.main``). See docs/evaluation.md and conf/evaluate.yaml."""

import hydra
from omegaconf import DictConfig

from plwlab import CONF_DIR
from plwlab.evaluation.evaluate import evaluate
from plwlab.training.config import register


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # bad paths or values, failed runs: one line
        raise SystemExit(f"error: {e}") from None


register()  # the ${plwlab.asset:...} resolver

if __name__ == "__main__":
    main()
