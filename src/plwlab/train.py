"""train(cfg): build model, data, callbacks and loggers from a composed config, fit, and write the run directory."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from plwlab.callbacks import LossRSD, ParamDistance
from plwlab.config import validate
from plwlab.data import AlpacaDataModule
from plwlab.module import PLWModule, load_model

log = logging.getLogger(__name__)


def _plain(node: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with prompt loss weight ``cfg.plw``; return the final metrics.

    The run directory ``cfg.paths.run_dir`` receives ``config.yaml`` (resolved), ``metrics.csv`` (CSV logger),
    ``checkpoints/``, ``hf_model/`` (HF export), ``metrics.json`` (the returned summary) and, for a built dataset
    variant, ``data_manifest.json``.
    """
    validate(cfg)
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    loaded = load_model(**_plain(cfg.model))
    module = PLWModule(
        loaded.model, plw=cfg.plw, pretrained_vocab_size=loaded.pretrained_vocab_size,
        **_plain(cfg.loss), **_plain(cfg.optim),
    )  # fmt: skip
    datamodule = AlpacaDataModule(tokenizer=loaded.tokenizer, seed=cfg.seed, **_plain(cfg.data))
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None]
    strategy = instantiate(cfg.strategy) if "_target_" in cfg.strategy else "auto"
    trainer = L.Trainer(
        **cfg.trainer,
        strategy=strategy,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,  # AlpacaDataModule shards data itself, identically for any world size
    )
    if trainer.is_global_zero:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)

    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics.update(
        plw=cfg.plw,
        rg=datamodule.stats["rg"],
        n_train=datamodule.stats["n_train"],
        n_empty_completion=datamodule.stats["n_empty_completion"],
        global_steps=trainer.global_step,
        fit_seconds=time.perf_counter() - start,
        final_train_loss=module.last_step_loss,
    )
    for cb in callbacks:
        if isinstance(cb, LossRSD):
            metrics["loss_rsd"] = cb.value
        if isinstance(cb, ParamDistance):
            metrics["param_distance"] = cb.last.get("total")
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if datamodule.manifest is not None:
            (run_dir / "data_manifest.json").write_text(json.dumps(datamodule.manifest, indent=2) + "\n")
        log.info("run dir %s: %s", run_dir, json.dumps(metrics))
    return metrics
