"""The experiment trackers of a training run (``logger=`` csv, wandb, tensorboard, mlflow): Lightning's loggers,
each given the same run config (what a dashboard groups and filters on) and, at the end, the same summary
(``metrics.json``).

A resumed attempt continues the same tracker run: the W&B run id and the MLflow run id are kept in the run's
``status.json``; TensorBoard appends to the run's own ``tensorboard/`` folder. Lightning's loggers write from
global rank 0 only, and so do :func:`log_run_config` and :func:`log_summary` (called by rank 0).
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from plwlab.config import BatchGeometry


def make_loggers(cfg: DictConfig, status: dict[str, Any]) -> list[Any]:
    """The configured loggers. A W&B run keeps one id per run directory (``status.json``'s ``wandb_id``), and so
    does an MLflow run once it exists (``mlflow_run_id``, recorded by :func:`remember_run_ids`): a resumed attempt
    continues the same tracker run."""
    loggers = []
    for c in cfg.logger.values():
        if c is None:
            continue
        if c._target_.endswith("WandbLogger"):
            status.setdefault("wandb_id", secrets.token_hex(4))
            loggers.append(instantiate(c, id=status["wandb_id"], resume="allow"))
        elif c._target_.endswith("MLFlowLogger") and status.get("mlflow_run_id"):
            loggers.append(instantiate(c, run_id=status["mlflow_run_id"]))
        else:
            loggers.append(instantiate(c))
    return loggers


def finish_wandb(loggers: list[Any], failed: bool) -> None:
    """End this run's W&B run, so that the next run of a sweep in this process opens its own."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb  # imported only by runs that log to W&B

        wandb.finish(exit_code=1 if failed else 0)


def remember_run_ids(loggers: list[Any], status: dict[str, Any]) -> None:
    """Record the MLflow run id (created when the logger first writes) in ``status``, for a resumed attempt."""
    for logger in loggers:
        if type(logger).__name__ == "MLFlowLogger" and logger.run_id:
            status["mlflow_run_id"] = logger.run_id


def run_config(cfg: DictConfig, geometry: BatchGeometry, stats: dict[str, Any], run_id: str, total_steps: int,
               segment_weights: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """What every tracker's run config carries, flat: the run id and sweep, dataset and its Rg, model, PLW and
    segment weights, the loss normalization, the batch geometry, seed and steps."""
    return {
        "run_id": run_id, "sweep": cfg.name, "dataset": cfg.data.name, "data_format": cfg.data.format,
        "rg": stats["rg"], "n_train": stats["n_train"], "max_length": cfg.data.max_length,
        "model": cfg.model.name, "model_path": cfg.model.get("name_or_path") or cfg.model.name,
        "plw": float(cfg.plw), **{f"segment_weight/{k}": v for k, v in segment_weights.items()},
        "loss_normalization": cfg.loss.normalization, "denominator_scope": cfg.loss.denominator_scope,
        "global_batch_size": geometry.global_batch, "micro_batch_size": geometry.micro_batch,
        "accumulate_grad_batches": geometry.accumulation, "devices": geometry.devices, "num_nodes": geometry.nodes,
        "world_size": geometry.world_size, "seed": cfg.seed, "total_steps": total_steps,
        "max_steps": cfg.trainer.get("max_steps") or -1, "max_epochs": cfg.trainer.get("max_epochs"),
        "lr": cfg.optim.lr, "completion_weight": cfg.loss.completion_weight,
        "weight_column": cfg.data.get("weight_column"),
    }  # fmt: skip


def log_run_config(loggers: list[Any], config: dict[str, Any]) -> None:
    """Give every tracker the run config (the W&B run config, MLflow params, TensorBoard's and the CSV logger's
    hparams)."""
    for logger in loggers:
        logger.log_hyperparams(config)


def summary_values(metrics: dict[str, Any]) -> dict[str, float | str]:
    """``metrics.json``'s scalars (numbers, strings, flags), the nested entries left out."""
    return {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in metrics.items()
            if isinstance(v, (int, float, str, bool))}  # fmt: skip


def log_summary(loggers: list[Any], metrics: dict[str, Any], step: int) -> None:
    """Write the run's final ``metrics.json`` into each tracker: the W&B run summary; in MLflow the file as an
    artifact and its numbers as ``summary/<key>`` metrics; in TensorBoard the file as text and its numbers as
    ``summary/<key>`` scalars (at the final ``step``)."""
    values = summary_values(metrics)
    numbers = {f"summary/{k}": v for k, v in values.items() if isinstance(v, float)}
    for logger in loggers:
        kind = type(logger).__name__
        if kind == "WandbLogger":
            logger.experiment.summary.update(values)
        elif kind == "MLFlowLogger":
            logger.experiment.log_dict(logger.run_id, metrics, "metrics.json")
            logger.log_metrics(numbers, step=step)
        elif kind == "TensorBoardLogger":
            logger.experiment.add_text("metrics.json", f"```\n{json.dumps(metrics, indent=2)}\n```", step)
            logger.log_metrics(numbers, step=step)
        logger.save()
