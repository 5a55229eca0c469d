"""train(cfg): assemble model, data, callbacks, loggers and the Lightning Trainer from a composed config, fit, and
write the run directory (:mod:`plwlab.rundir`)."""

from __future__ import annotations

import logging
import os
import resource
import shlex
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from plwlab.config import BatchGeometry, to_dict, validate_train
from plwlab.data.datamodule import InstructionDataModule
from plwlab.rundir import RunDir, RunError, RunRefused, RunState, prepare_run_dir, write_json
from plwlab.runlock import run_dir_lock
from plwlab.training.callbacks import ExportError, HFExport, LossRSD, ParamDistance
from plwlab.training.checkpointing import CheckpointError, Preempted, RunCheckpoint
from plwlab.training.memory import RunPlan, preflight, strategy_shards
from plwlab.training.model import load_model
from plwlab.training.module import PLWModule
from plwlab.training.trackers import finish_wandb, log_run_config, log_summary, make_loggers, remember_run_ids, run_config

log = logging.getLogger(__name__)


class _LitLoggerTip(logging.Filter):
    """Lightning logs an advertisement for its cloud logger (litlogger) at every fit, on every run of a sweep; it
    means nothing for plwlab's runs (their trackers are the logger= group's), so it is dropped where it is logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_LitLoggerTip())


def make_strategy(strategy: DictConfig, world_size: int) -> Any:
    """The configured Lightning strategy; FSDP2 (:class:`~plwlab.training.sharding.FSDP2Strategy`) uses all
    ``world_size`` processes for data parallelism."""
    if "_target_" not in strategy:
        return "auto"
    if strategy_shards(strategy):
        return instantiate(strategy, data_parallel_size=world_size, tensor_parallel_size=1)
    return instantiate(strategy)


def total_steps(datamodule: InstructionDataModule, cfg: DictConfig, geometry: BatchGeometry) -> int:
    """Optimizer steps of the whole run, as Lightning's fit loop takes them (a partial accumulation at the end of an
    epoch still steps)."""
    per_epoch = -(-datamodule.batches_per_epoch(geometry.world_size) // geometry.accumulation)
    steps = per_epoch * max(cfg.trainer.get("max_epochs") or 1, 1)
    max_steps = cfg.trainer.get("max_steps") or -1
    return min(steps, max_steps) if max_steps > 0 else steps


def peak_host_rss_gb(trainer: L.Trainer) -> list[float]:
    """The peak resident host memory of each rank so far, in GB (every rank calls it)."""
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6], dtype=torch.float64)
    gathered = trainer.strategy.all_gather(rss.to(trainer.strategy.root_device))
    return [round(float(x), 3) for x in gathered.flatten().cpu()]


INPUTS = {"data_sha256": "the data file", "tokenizer_sha256": "the tokenizer",
          "base_weights_sha256": "the pretrained weights"}  # a run's inputs: their digests, per attempt  # fmt: skip


def check_inputs(status: dict[str, Any], inputs: dict[str, str | None], ckpt_path: Path | None, allow_change: bool) -> None:
    """Refuse (:class:`RunRefused`) to resume from a checkpoint trained on other data, with another tokenizer or
    from other pretrained weights than ``inputs`` (their digests, recorded in ``status.json`` when the run
    started), unless ``allow_change``."""
    recorded = status.get("inputs") or {}
    changed = [k for k, v in inputs.items() if recorded.get(k, v) != v]
    if ckpt_path is not None and changed and not allow_change:
        what = " and ".join(INPUTS[k] for k in changed)
        digests = "; ".join(f"{k} {recorded[k]} -> {inputs[k]}" for k in changed)
        raise RunRefused(f"cannot resume: {what} changed since the checkpoint ({digests}): the run would "
                         "mix both; restore them, or set allow_data_change=true to resume anyway")  # fmt: skip


def record_inputs(status: dict[str, Any], inputs: dict[str, str | None], ckpt_path: Path | None) -> None:
    """Write this attempt's input digests into ``status`` (``inputs``) and its ``input_history``: one entry per
    attempt (attempt, the step it started from, its digests), so that a resume on changed inputs
    (``allow_data_change``) keeps which steps trained on what."""
    step = checkpoint_step(ckpt_path) if ckpt_path is not None else 0
    history = [h for h in status.get("input_history", []) if h["attempt"] != status["attempts"]]
    if not history and status.get("inputs"):  # a run started before input_history existed
        history = [{"attempt": 1, "from_step": 0, **status["inputs"]}]
    status["input_history"] = [*history, {"attempt": status["attempts"], "from_step": step, **inputs}]
    status["inputs"] = inputs


def checkpoint_step(ckpt_path: Path) -> int:
    """The optimizer step a checkpoint holds, from its name (``last.ckpt`` -> ``step-00000050.ckpt``)."""
    return int(ckpt_path.resolve().stem.split("-")[-1])


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with prompt loss weight ``cfg.plw``; return the final metrics.

    The run directory ``cfg.paths.run_dir`` receives ``config.yaml`` (resolved), ``status.json``, ``metrics.csv``
    (CSV logger), ``checkpoints/`` (while running; kept only with ``callbacks.checkpoint.keep=true``), ``hf_model/``
    (HF export), ``metrics.json`` (the returned summary) and, for a built dataset variant, ``data_manifest.json``.
    With ``resume=true`` (default) a finished run is skipped and an interrupted one resumes from
    ``checkpoints/last.ckpt``.
    """
    geometry = validate_train(cfg)
    plan = preflight(cfg, geometry)  # before any weight is read: will it fit, sharded how, checkpointing or not
    run_dir = Path(cfg.paths.run_dir)
    # before the Trainer exists: torchrun sets RANK, srun SLURM_PROCID, Lightning's launcher LOCAL_RANK (>0 only)
    rank = int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or os.environ.get("LOCAL_RANK") or 0)
    with run_dir_lock(run_dir, rank):
        return _train(cfg, RunDir(run_dir), geometry, plan, rank == 0)


def _train(cfg: DictConfig, run: RunDir, geometry: BatchGeometry, plan: RunPlan, is_zero: bool) -> dict[str, Any]:
    action, ckpt_path, status = prepare_run_dir(cfg, run.path)
    if action == "skip":
        log.info("run dir %s: already finished, skipped (resume=false reruns it)", run.path)
        run.skip(status)
        return {**run.metrics(), "skipped": True}
    if cfg.matmul_precision:
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    loggers = make_loggers(cfg, status)
    before = dict(status)  # what status.json says again if this attempt is refused
    if is_zero:
        status = run.start_attempt(status, ckpt_path)
    trainer = None
    try:
        L.seed_everything(cfg.seed, workers=True)
        # a sharded run reads a pretrained model once, on rank 0, and broadcasts it into the shards
        model_args = {**to_dict(cfg.model), "gradient_checkpointing": plan.gradient_checkpointing}
        loaded = load_model(**model_args, weights=is_zero or not (plan.sharded and geometry.world_size > 1))
        datamodule = InstructionDataModule(tokenizer=loaded.tokenizer, seed=cfg.seed, global_batch_size=geometry.global_batch,
                                           **to_dict(cfg.data))  # fmt: skip
        datamodule.setup("fit")
        inputs = {**{key: datamodule.stats[key] for key in ("data_sha256", "tokenizer_sha256")},
                  "base_weights_sha256": loaded.weights_sha256}  # fmt: skip
        check_inputs(status, inputs, ckpt_path, cfg.allow_data_change)
        record_inputs(status, inputs, ckpt_path)
        if is_zero:
            run.write_status(status)
        module = PLWModule(
            loaded.model, plw=cfg.plw, pretrained_vocab_size=loaded.pretrained_vocab_size,
            total_steps=total_steps(datamodule, cfg, geometry), **to_dict(cfg.loss), **to_dict(cfg.optim),
        )  # fmt: skip
        callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
        trainer = L.Trainer(
            **cfg.trainer,
            accumulate_grad_batches=geometry.accumulation,
            strategy=make_strategy(plan.strategy, geometry.world_size),
            callbacks=callbacks,
            logger=loggers or False,
            default_root_dir=str(run.path),  # where callbacks find the run directory
            # RunCheckpoint (callbacks.checkpoint) writes the checkpoints; without it, Lightning must not add its own
            enable_checkpointing=any(isinstance(cb, RunCheckpoint) for cb in callbacks),
            use_distributed_sampler=False,  # InstructionDataModule shards data itself, identically for any world size
        )
        if is_zero:
            run.config_file.write_text(OmegaConf.to_yaml(cfg, resolve=True))
            log_run_config(loggers, run_config(cfg, geometry, datamodule.stats, run.run_id, module.total_steps,
                                               module.segment_weight_dict()))  # fmt: skip
            remember_run_ids(loggers, status)
            run.write_status(status)
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        exporter = next((cb for cb in callbacks if isinstance(cb, HFExport)), None)
        # an earlier attempt trained to the end but could not write its export: Lightning's loop had nothing to do
        export_only = (ckpt_path is not None and trainer.global_step == checkpoint_step(ckpt_path)
                       and run.metrics_file.exists() and not run.is_exported)  # fmt: skip
        if export_only and exporter is not None:
            exporter.on_train_end(trainer, module)
    except BaseException as e:
        if is_zero:  # every failure after the run started is recorded, also one before fit (bad model path, ...)
            finish_wandb(loggers, failed=True)
            if isinstance(e, Preempted):  # its checkpoint is saved and its status written (requeued/interrupted)
                pass
            elif isinstance(e, RunRefused):  # nothing trained: the run stays as it was, the refusal beside it
                run.write_status(before)
                run.refuse(e)
            # Lightning turns Ctrl-C into SystemExit(1) after marking the trainer interrupted
            elif isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit) and trainer is not None and trainer.interrupted):
                run.stop(RunState.INTERRUPTED, stopped_by="SIGINT")
            else:
                run.fail(e)
        if isinstance(e, SystemExit) and not isinstance(e, Preempted) and trainer is not None and trainer.interrupted:
            raise KeyboardInterrupt("stopped by SIGINT") from None  # Lightning's sys.exit(1) after Ctrl-C, named
        if isinstance(e, CheckpointError):
            raise RunError(str(e)) from e
        if isinstance(e, OSError):
            raise RunError(f"run {run.path} failed writing its outputs: {e.strerror or e}") from e
        raise

    failed = exporter is not None and exporter.failed is not None
    if export_only:  # the metrics of the attempt that trained (nothing was computed again)
        metrics = {**run.metrics(), "input_history": status["input_history"]}
        if trainer.is_global_zero:
            log_summary(loggers, metrics, trainer.global_step)
            finish_wandb(loggers, failed=failed)
        return _finish(run, metrics, status, callbacks, exporter, datamodule, trainer.is_global_zero)
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics.update(
        plw=cfg.plw,
        segment_weights=module.segment_weight_dict(),
        rg=datamodule.stats["rg"],
        dataset=cfg.data.name,
        data_format=cfg.data.format,
        data_path=datamodule.stats["data_path"],
        data_sha256=datamodule.stats["data_sha256"],
        n_train=datamodule.stats["n_train"],
        n_empty_completion=datamodule.stats["n_empty_completion"],
        n_duplicates=datamodule.stats["n_duplicates"],
        example_weights=datamodule.stats.get("example_weights"),  # data.weight_column: column, n, min, mean, max
        tokenizer_sha256=datamodule.stats["tokenizer_sha256"],
        base_weights_sha256=loaded.weights_sha256,
        input_history=status["input_history"],  # per attempt: from which step, on which data, tokenizer, weights
        global_steps=trainer.global_step,
        global_batch_size=geometry.global_batch,
        micro_batch_size=geometry.micro_batch,
        accumulate_grad_batches=geometry.accumulation,
        world_size=geometry.world_size,
        strategy=type(trainer.strategy).__name__,
        sharding=getattr(trainer.strategy, "sharding", None),
        gradient_checkpointing=plan.gradient_checkpointing,  # model.gradient_checkpointing=auto decided by the plan
        precision=str(trainer.precision),
        **module.precision_report(),
        fit_seconds=time.perf_counter() - start,
        final_train_loss=module.last_step_loss,
        resumed=ckpt_path is not None,
        host_rss_gb=peak_host_rss_gb(trainer),
    )
    for cb in callbacks:
        if isinstance(cb, LossRSD):
            metrics["loss_rsd"] = cb.value
        if isinstance(cb, ParamDistance):
            metrics["param_distance"] = cb.last.get("total")
    if trainer.is_global_zero:
        log_summary(loggers, metrics, trainer.global_step)
        finish_wandb(loggers, failed=failed)
    return _finish(run, metrics, status, callbacks, exporter, datamodule, trainer.is_global_zero)


def _finish(run: RunDir, metrics: dict[str, Any], status: dict[str, Any], callbacks: list[Any],
            exporter: HFExport | None, datamodule: InstructionDataModule, is_zero: bool) -> dict[str, Any]:  # fmt: skip
    """Write the trained run's ``metrics.json``; then finish it, or, when its export could not be written, fail it
    with the checkpoints kept (a resume exports without training)."""
    if is_zero:
        write_json(run.metrics_file, metrics)
        if datamodule.manifest is not None:
            write_json(run.data_manifest, datamodule.manifest)
    if exporter is not None and exporter.failed is not None:
        error = ExportError(exporter.failed)
        if is_zero:
            run.fail(error)
        raise error
    if is_zero:
        run.finish(status)
        for cb in callbacks:
            if isinstance(cb, RunCheckpoint) and not cb.keep:
                cb.discard()  # the run is complete: hf_model/ is the result, the training state is no longer needed
        log.info("%s", finished_summary(run, metrics))
    return metrics


def finished_summary(run: RunDir, metrics: dict[str, Any]) -> str:
    """What a finished run says (its numbers are all in ``metrics.json``): where it is, what it trained, its final
    losses, stability and drift, and the commands that evaluate it and talk to it."""

    def num(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else f"{value:.4g}"

    path = shlex.quote(str(run.path))
    rg = metrics.get("rg")
    return "\n".join([
        f"run finished: {run.path}",
        f"  {metrics.get('dataset')} (Rg {'n/a' if rg is None else f'{rg:.2f}'}), PLW {metrics.get('plw'):g}: "
        f"{metrics.get('global_steps')} optimizer steps of {metrics.get('global_batch_size')} sequences in "
        f"{metrics.get('fit_seconds') or 0:.0f} s",
        f"  final loss {num('final_train_loss')} (completion {num('train/completion_loss')}, prompt "
        f"{num('train/prompt_loss')}), val/loss {num('val/loss')}; loss RSD {num('loss_rsd')}; distance from the "
        f"pretrained weights {num('param_distance')}",
        f"  metrics: {run.metrics_file}   model: {run.hf_model}",
        f"  next: python evaluate.py {path}    or talk to it: plwlab generate {path} \"Name three primary colours.\"",
    ])  # fmt: skip
