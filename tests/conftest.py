import os
import signal

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

from pathlib import Path  # noqa: E402

import lightning.pytorch as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from plwlab import ASSETS, CONF_DIR  # noqa: E402
from plwlab.config import register  # noqa: E402
from plwlab.training.model import LoadedModel, load_model  # noqa: E402
from plwlab.training.smollm2 import RESOLVERS  # noqa: E402

torch.set_num_threads(1)
register(RESOLVERS)

ROOT = Path(__file__).resolve().parents[1]


def sigint_default() -> None:
    """``preexec_fn`` of a subprocess that a test stops with SIGINT: a shell that started the tests in the background
    left SIGINT ignored, which a child inherits (Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE = ASSETS / "alpaca_sample.json"
TINY_CONFIG = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}


def tiny_model(dtype: str = "float32", seed: int = 0, **kwargs) -> LoadedModel:
    torch.manual_seed(seed)
    return load_model(
        name="tiny", tokenizer=str(ASSETS / "tiny_tokenizer"), config=TINY_CONFIG, dtype=dtype, **kwargs
    )


def compose_train(overrides: list[str], run_dir: Path) -> DictConfig:
    """The train config as train.py composes it, with a fixed run directory (no Hydra runtime needed)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"paths.run_dir={run_dir}", *overrides])


@pytest.fixture
def tiny() -> LoadedModel:
    return tiny_model()


class SignalAt(L.Callback):
    """This process gets SIGTERM as optimizer step ``$SIGNAL_AT_STEP`` (0-based) starts, as a scheduler's signal
    arrives mid-step: ``+callbacks.signal_at={_target_: conftest.SignalAt}`` (the step is not in the config, so
    the attempts of one run directory keep one config)."""

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if str(trainer.global_step) == os.environ.get("SIGNAL_AT_STEP"):
            os.kill(os.getpid(), signal.SIGTERM)
