"""plwlab: prompt loss weight (PLW) studies for instruction fine-tuning.

The package follows the study's pipeline, each stage importing only the stages before it:
``data`` (examples -> tokens with a segment per token -> batches), ``training`` (the PLW loss, the Lightning
module, train()), ``evaluation`` (benchmarks and judges of trained runs), ``analysis`` (GLMM, GAM, figures,
recommendations). Two files are the contracts between stages: :mod:`plwlab.rundir` (a training run's directory)
and :mod:`plwlab.results` (the results table evaluation writes and analysis reads).
"""

from pathlib import Path

__version__ = "0.1.0"

CONF_DIR = Path(__file__).parent / "conf"  # train.yaml, evaluate.yaml and their groups (installed with the package)
ASSETS = Path(__file__).parent / "assets"  # the bundled samples and the tiny tokenizer
