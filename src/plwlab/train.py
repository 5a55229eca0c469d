"""train(cfg): build model, data, callbacks and loggers from a composed config, fit, and write the run directory.

A run directory is resumable: a finished run is skipped, an interrupted one continues from
``checkpoints/last.ckpt`` (model, optimizer, schedule, loop and data position), and ``status.json`` records
every attempt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from plwlab.callbacks import LossRSD, ParamDistance
from plwlab.config import ConfigError, validate
from plwlab.data import AlpacaDataModule
from plwlab.files import atomic_write
from plwlab.module import PLWModule, load_model

log = logging.getLogger(__name__)
# keys that do not change what a run computes: they may differ between a run and its resumption
NON_IDENTITY_KEYS = ("paths", "logger", "resume", "plan_only", "name")


class RunError(RuntimeError):
    """A run could not be written or resumed (unwritable directory, full disk, corrupt checkpoint)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file and renamed into place, so an interruption or a full
    disk never leaves a truncated checkpoint where the previous good one was."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        try:
            with atomic_write(path) as tmp:
                torch.save(checkpoint, tmp)
        except OSError as e:
            raise RunError(f"cannot write checkpoint {path}: {e.strerror or e}; the previous checkpoint is intact") from e


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically replace ``path`` with ``data`` as JSON."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def record_failure(run_dir: Path, error: BaseException) -> None:
    """Mark a run failed in its ``status.json`` (kept for the sweep summary), if the directory is writable."""
    try:
        status_file = run_dir / "status.json"
        status = json.loads(status_file.read_text()) if status_file.exists() else {"attempts": 1}
        status.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000])
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(status_file, status)
    except OSError:
        pass


def _plain(node: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)


def config_digest(cfg: DictConfig) -> str:
    """Hash of everything that determines what a run computes (not where it writes or how it logs)."""
    identity = {k: v for k, v in _plain(cfg).items() if k not in NON_IDENTITY_KEYS}
    identity.get("callbacks", {}).pop("progress", None)
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _usable_checkpoint(path: Path) -> bool:
    """A torch checkpoint is a zip archive (a truncated one has no readable central directory); a distributed
    (sharded) checkpoint is a directory whose ``.metadata`` is written last."""
    if path.is_dir():
        return (path / ".metadata").exists()
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def prepare_run_dir(cfg: DictConfig, run_dir: Path) -> tuple[str, Path | None, dict[str, Any]]:
    """Decide what to do with ``run_dir``: ("skip", None, status) when the same config already finished there,
    ("resume", checkpoint, status) when it was interrupted, ("start", None, status) otherwise."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to run directory {run_dir}: {e.strerror or e}") from e
    status_file = run_dir / "status.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else {"attempts": 0}
    digest = config_digest(cfg)
    if status.get("config_digest", digest) != digest:
        raise ConfigError(
            f"{run_dir} holds a run of a different config (digest {status['config_digest']} != {digest}); "
            "use another name/run dir, or delete it"
        )
    status["config_digest"] = digest
    if status.get("status") == "finished" and cfg.resume:
        return "skip", None, status
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.resume and last.exists():
        if not _usable_checkpoint(last):
            raise RunError(f"{last} is unreadable (truncated?); delete it to restart this run from scratch")
        return "resume", last, status
    return "start", None, status


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with prompt loss weight ``cfg.plw``; return the final metrics.

    The run directory ``cfg.paths.run_dir`` receives ``config.yaml`` (resolved), ``status.json``, ``metrics.csv``
    (CSV logger), ``checkpoints/``, ``hf_model/`` (HF export), ``metrics.json`` (the returned summary) and, for a
    built dataset variant, ``data_manifest.json``. With ``resume=true`` (default) a finished run is skipped and an
    interrupted one resumes from ``checkpoints/last.ckpt``.
    """
    validate(cfg)
    run_dir = Path(cfg.paths.run_dir)
    action, ckpt_path, status = prepare_run_dir(cfg, run_dir)
    if action == "skip":
        log.info("run dir %s: already finished, skipped (resume=false reruns it)", run_dir)
        write_json(run_dir / "status.json", {**status, "skipped": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return {**json.loads((run_dir / "metrics.json").read_text()), "skipped": True}
    # before the Trainer exists: torchrun sets RANK, srun SLURM_PROCID, Lightning's launcher LOCAL_RANK (>0 only)
    is_zero = int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or os.environ.get("LOCAL_RANK") or 0) == 0
    if is_zero:
        status.update(status="running", attempts=status["attempts"] + 1, resumed_from=str(ckpt_path) if ckpt_path else None,
                      started=time.strftime("%Y-%m-%dT%H:%M:%S"))  # fmt: skip
        write_json(run_dir / "status.json", status)
        if ckpt_path is not None and (run_dir / "metrics.csv").exists():  # the CSV logger would overwrite it
            os.replace(run_dir / "metrics.csv", run_dir / f"metrics.attempt{status['attempts'] - 1}.csv")
    L.seed_everything(cfg.seed, workers=True)
    # AlpacaDataModule saves and restores its position in the epoch itself (exact mid-epoch resume)
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

    loaded = load_model(**_plain(cfg.model))
    module = PLWModule(
        loaded.model, plw=cfg.plw, pretrained_vocab_size=loaded.pretrained_vocab_size,
        **_plain(cfg.loss), **_plain(cfg.optim),
    )  # fmt: skip
    datamodule = AlpacaDataModule(tokenizer=loaded.tokenizer, seed=cfg.seed, **_plain(cfg.data))
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None]
    strategy = instantiate(cfg.strategy) if "_target_" in cfg.strategy else "auto"
    sharded = type(strategy).__name__ in ("FSDPStrategy", "ModelParallelStrategy")  # they write their own layout
    trainer = L.Trainer(
        **cfg.trainer,
        strategy=strategy,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,  # AlpacaDataModule shards data itself, identically for any world size
        plugins=None if sharded else [AtomicCheckpointIO()],
    )
    if trainer.is_global_zero:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except BaseException as e:
        if trainer.is_global_zero:
            if isinstance(e, KeyboardInterrupt):
                write_json(run_dir / "status.json", {**status, "status": "interrupted"})
            else:
                record_failure(run_dir, e)
        if isinstance(e, OSError):
            raise RunError(f"run {run_dir} failed writing its outputs: {e.strerror or e}") from e
        raise

    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics.update(
        plw=cfg.plw,
        rg=datamodule.stats["rg"],
        n_train=datamodule.stats["n_train"],
        n_empty_completion=datamodule.stats["n_empty_completion"],
        global_steps=trainer.global_step,
        fit_seconds=time.perf_counter() - start,
        final_train_loss=module.last_step_loss,
        resumed=ckpt_path is not None,
    )
    for cb in callbacks:
        if isinstance(cb, LossRSD):
            metrics["loss_rsd"] = cb.value
        if isinstance(cb, ParamDistance):
            metrics["param_distance"] = cb.last.get("total")
    if trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)
        if datamodule.manifest is not None:
            write_json(run_dir / "data_manifest.json", datamodule.manifest)
        status.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), error=None)
        write_json(run_dir / "status.json", status)
        log.info("run dir %s: %s", run_dir, json.dumps(metrics))
    return metrics
