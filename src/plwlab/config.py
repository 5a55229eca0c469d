"""Typed Hydra schema for ``conf/train.yaml`` (so ``plw=0`` arrives as a float and typos fail) and the checks that
turn bad values into one-line errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from plwlab.alpaca import VARIANTS
from plwlab.data import BATCHING
from plwlab.loss import NORMALIZATIONS
from plwlab.module import DENOMINATOR_SCOPES

ASSETS = Path(__file__).parent / "assets"


class ConfigError(ValueError):
    """An invalid configuration value."""


@dataclass
class ModelConfig:  # arguments of plwlab.module.load_model
    name: str = MISSING
    tokenizer: str = MISSING
    name_or_path: Optional[str] = None
    config: Optional[dict[str, Any]] = None
    dtype: str = "float32"
    add_pad_token: bool = False
    attn_implementation: Optional[str] = None
    gradient_checkpointing: bool = False
    lora: Any = None  # peft.LoraConfig kwargs, e.g. {r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj]}


@dataclass
class DataConfig:  # arguments of plwlab.data.AlpacaDataModule (tokenizer and seed come from model and seed)
    path: str = MISSING
    name: str = "alpaca"
    max_length: int = 512
    val_size: float = 0.05
    batch_size: int = 4
    eval_batch_size: Optional[int] = None
    num_workers: int = 0
    limit: Optional[int] = None
    empty_completion: str = "keep"
    batching: str = "padded"  # padded | length_grouped | packed
    on_invalid: str = "error"
    variant: str = "as_is"
    target_rg: Optional[float] = None
    cache_dir: Optional[str] = "outputs/data"  # built variants + tokenized data (null: no tokenized cache)


@dataclass
class LossConfig:  # loss arguments of plwlab.module.PLWModule
    normalization: str = "weight_sum"
    denominator_scope: str = "step"
    chunk_tokens: Optional[int] = None  # memory-lean loss: logits computed this many targets at a time


@dataclass
class OptimConfig:  # optimizer arguments of plwlab.module.PLWModule (Stanford Alpaca defaults)
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class TrainConfig:
    plw: float = 0.1
    allow_plw_above_one: bool = False
    resume: bool = True  # skip a finished run, resume an interrupted one from checkpoints/last.ckpt
    plan_only: bool = False  # with -m: print the sweep plan and stop
    seed: int = 42
    name: str = "plwlab"
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: dict[str, Any] = field(default_factory=dict)  # kwargs of lightning.Trainer
    strategy: dict[str, Any] = field(default_factory=dict)  # {} = "auto", or a _target_ strategy
    callbacks: dict[str, Any] = field(default_factory=dict)  # name -> _target_ callback (null disables)
    logger: dict[str, Any] = field(default_factory=dict)  # name -> _target_ logger
    paths: dict[str, Any] = field(default_factory=dict)


def register() -> None:
    """Register the schema and the ``${plwlab.asset:NAME}`` resolver (path of a bundled asset)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("plwlab.asset"):
        OmegaConf.register_new_resolver("plwlab.asset", lambda name: str(ASSETS / name))


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` with a one-line message for values that cannot be right."""
    if cfg.plw < 0:
        raise ConfigError(f"plw must be >= 0, got {cfg.plw}")
    if cfg.plw > 1 and not cfg.allow_plw_above_one:
        raise ConfigError(f"plw={cfg.plw} > 1 up-weights prompts over completions; set allow_plw_above_one=true if meant")
    if cfg.loss.normalization not in NORMALIZATIONS:
        raise ConfigError(f"loss.normalization must be one of {NORMALIZATIONS}, got {cfg.loss.normalization!r}")
    if cfg.loss.denominator_scope not in DENOMINATOR_SCOPES:
        raise ConfigError(f"loss.denominator_scope must be one of {DENOMINATOR_SCOPES}, got {cfg.loss.denominator_scope!r}")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {cfg.data.batch_size}")
    if cfg.data.variant not in VARIANTS:
        raise ConfigError(f"data.variant must be one of {VARIANTS}, got {cfg.data.variant!r}")
    if cfg.data.variant == "rg_target" and not (cfg.data.target_rg or 0) > 0:
        raise ConfigError(f"data.variant=rg_target needs data.target_rg > 0, got {cfg.data.target_rg}")
    if cfg.data.batching not in BATCHING:
        raise ConfigError(f"data.batching must be one of {BATCHING}, got {cfg.data.batching!r}")
    if not 0 <= cfg.data.val_size:
        raise ConfigError(f"data.val_size must be a fraction in [0, 1) or a count, got {cfg.data.val_size}")
