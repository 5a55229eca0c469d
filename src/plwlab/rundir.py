"""A training run's directory: the one module that knows its layout, its identity (run id, config digest) and its
state (:class:`RunState`, changed only through :class:`RunDir`'s transitions); its lock is :mod:`plwlab.runlock`. Training writes it (:mod:`plwlab.training.train`), evaluation and analysis read it.

``status.json`` says whether the run is running, interrupted, failed or finished, how many attempts it took and
what it resumed from; a run directory holds one config (its digest), and :func:`prepare_run_dir` decides whether
to start, resume from ``checkpoints/last.ckpt`` or skip. Layout (:class:`RunDir`)::

    config.yaml  status.json  metrics.csv  metrics.json  data_manifest.json  refused.json  .lock
    checkpoints/last.ckpt -> step-N.ckpt     hf_model/ (+ plwlab.json)     eval/ (generations/, status.json)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zipfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from plwlab.files import atomic_write

log = logging.getLogger(__name__)
# keys that do not change what a run computes: they may differ between a run and its resumption
NON_IDENTITY_KEYS = ("paths", "logger", "resume", "plan_only", "name", "allow_data_change")
LAST_CHECKPOINT = "last.ckpt"  # in checkpoints/: a link to the latest whole checkpoint
SWEEP_ID = "PLWLAB_SWEEP_ID"  # environment: which launch of a sweep a job belongs to (its refusals are its own)
SINGLE_RUN = "single run"  # refused.json's key for the refusal of a run launched on its own (no sweep)


def now() -> str:
    """A status timestamp (local time, to the second; compared as text)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class RunState(str, Enum):
    """What ``status.json`` says of a run (``status``), changed only by :class:`RunDir`'s transitions::

        (none) --start_attempt--> running --finish--> finished
                                  running --stop--> interrupted | requeued --start_attempt--> running
                                  running --fail--> failed --start_attempt--> running
                    running | interrupted --requeue--> requeued  (SLURM put the job back in its queue)

    A run directory without ``status.json`` never started (or was exported before ``status.json`` existed)."""

    RUNNING = "running"  # an attempt trains (or its processes died without saying so)
    INTERRUPTED = "interrupted"  # stopped (Ctrl-C, a signal) after saving: relaunching resumes it
    REQUEUED = "requeued"  # stopped for SLURM to start it again
    FAILED = "failed"  # an error ended the attempt (status ``error``)
    FINISHED = "finished"  # trained and exported: the one state evaluation accepts

    def __str__(self) -> str:
        return self.value


class RunError(RuntimeError):
    """A run could not be written or resumed (unwritable directory, full disk, corrupt checkpoint)."""


class RunRefused(RunError):
    """A run directory holds another config's run, or another process is training in it: it is left untouched."""


@dataclass(frozen=True)
class RunDir:
    """The files of one training run's directory, and what is read from them."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # -- layout
    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"  # the resolved train config

    @property
    def status_file(self) -> Path:
        return self.path / "status.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"  # the final summary

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"  # per optimizer step, all attempts (plwlab.training.csv_log)

    @property
    def data_manifest(self) -> Path:
        return self.path / "data_manifest.json"  # a built dataset variant's manifest

    @property
    def refused_file(self) -> Path:
        return self.path / "refused.json"  # why a launcher left this directory untouched

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST_CHECKPOINT

    @property
    def hf_model(self) -> Path:
        return self.path / "hf_model"  # save_pretrained export (or LoRA adapter) + tokenizer

    @property
    def export_meta_file(self) -> Path:
        return self.hf_model / "plwlab.json"  # PLW, model, dataset, Rg, ... of the export

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    @property
    def eval_status_file(self) -> Path:
        return self.eval_dir / "status.json"

    def generations_file(self, name: str) -> Path:
        """The cached responses of the run to the instruction set ``name``."""
        return self.eval_dir / "generations" / f"{name}.json"

    def judgements_file(self, name: str) -> Path:
        """The verdicts of the judge ``name`` on the run's responses (preference, as shown, the judge's text)."""
        return self.eval_dir / "judgements" / f"{name}.json"

    def journal_file(self, file: Path) -> Path:
        """The journal of the completions behind an eval ``file`` (:meth:`generations_file`,
        :meth:`judgements_file`) while they are computed: what an interrupted evaluation resumes from."""
        return file.with_name(f"{file.stem}.journal.jsonl")

    # -- reading
    @property
    def is_exported(self) -> bool:
        """The model export is there (``hf_model/plwlab.json``)."""
        return self.export_meta_file.exists()

    def status(self) -> dict[str, Any]:
        return _read_json(self.status_file)

    @property
    def state(self) -> RunState | None:
        """The run's :class:`RunState`; None when it never started."""
        state = self.status().get("status")
        return RunState(state) if state else None

    @property
    def finished(self) -> bool:
        """Training finished: the one definition that training (skip), the launchers, the sweep summary and evaluation
        use. ``status.json`` says finished; a run exported before ``status.json`` existed counts by its export."""
        state = self.state
        return state is RunState.FINISHED or (state is None and self.is_exported)

    def metrics(self) -> dict[str, Any]:
        return _read_json(self.metrics_file)

    def export_meta(self) -> dict[str, Any]:
        """``hf_model/plwlab.json`` (exports before the ``dataset`` key named it ``data``)."""
        meta = _read_json(self.export_meta_file)
        if "data" in meta:
            meta.setdefault("dataset", meta.pop("data"))
        return meta

    def refusal(self, sweep_id: str | None) -> str | None:
        """Why the launch ``sweep_id`` of a sweep (None: a single run) left this run untouched, if it did
        (``refused.json``)."""
        return (_read_json(self.refused_file).get(sweep_id or SINGLE_RUN) or {}).get("error")

    def train_config(self) -> DictConfig:
        return OmegaConf.load(self.config_file)

    @property
    def name(self) -> str:
        """The training ``name`` (the sweep's), from ``config.yaml``; else the parent folder's name."""
        config = yaml.safe_load(self.config_file.read_text()) if self.config_file.exists() else None
        return (config or {}).get("name") or self.path.parent.name

    @property
    def run_id(self) -> str:
        """``<training name>/<run dir name>``: unique across sweeps that share overrides. Results rows carry it."""
        return f"{self.name}/{self.path.name}"

    @property
    def wandb_eval_id(self) -> str:
        """The W&B run id of the run's evaluation: the training run's W&B id (``status.json``) + ``-eval``, else
        a digest of :attr:`run_id` (a training run logged without W&B)."""
        base = self.status().get("wandb_id") or hashlib.sha256(self.run_id.encode()).hexdigest()[:8]
        return f"{base}-eval"

    # -- the transitions of RunState (rank 0 writes; each returns the status it wrote)
    def write_status(self, status: dict[str, Any]) -> None:
        write_json(self.status_file, status)

    def start_attempt(self, status: dict[str, Any], resumed_from: Path | None) -> dict[str, Any]:
        """A new attempt trains: ``running``, attempts + 1, what it resumed from, the launch it belongs to."""
        self.forget_refusal(SINGLE_RUN)  # a single run's earlier refusal no longer applies
        status = {**status, "status": RunState.RUNNING, "attempts": status.get("attempts", 0) + 1, "error": None,
                  "resumed_from": str(resumed_from) if resumed_from else None, "started": now(),
                  "sweep_id": os.environ.get(SWEEP_ID)}  # fmt: skip
        self.write_status(status)
        return status

    def finish(self, status: dict[str, Any]) -> dict[str, Any]:
        """The attempt trained to the end and exported the model."""
        status = {**status, "status": RunState.FINISHED, "finished": now(), "error": None}
        self.write_status(status)
        return status

    def stop(self, state: RunState, **details: Any) -> dict[str, Any]:
        """The attempt stopped after saving (``interrupted``: relaunching resumes it; ``requeued``: SLURM will)."""
        if state not in (RunState.INTERRUPTED, RunState.REQUEUED):
            raise ValueError(f"a run stops as interrupted or requeued, not {state}")
        status = {**self.status(), "status": state, "stopped": now(), **details}
        self.write_status(status)
        return status

    def requeue(self) -> None:
        """SLURM put the run's job back in its queue: a running or interrupted run says ``requeued`` until it runs."""
        if self.state in (RunState.RUNNING, RunState.INTERRUPTED):
            self.write_status({**self.status(), "status": RunState.REQUEUED, "requeued": now()})

    def skip(self, status: dict[str, Any]) -> dict[str, Any]:
        """A launch found the run finished and left it (``skipped``: when, and by which launch)."""
        status = {**status, "skipped": now(), "skipped_by": os.environ.get(SWEEP_ID)}
        self.write_status(status)
        return status

    def fail(self, error: BaseException) -> None:
        """Mark the run failed with ``error`` (never a finished run), if the directory is writable. A refusal is no
        failure of the run: it goes beside it, into ``refused.json``, keyed by the launch it refused
        (:meth:`refuse`)."""
        if isinstance(error, RunRefused):
            return self.refuse(error)
        try:
            if self.finished:
                return
            self.write_status({**(self.status() or {"attempts": 1}), "status": RunState.FAILED,
                               "error": f"{type(error).__name__}: {error}"[:2000]})  # fmt: skip
        except OSError:
            pass

    def refuse(self, error: BaseException) -> None:
        """Record why this launch (its sweep id) left the run untouched: ``refused.json`` keeps one entry per
        launch until that launch's summary has read it (:meth:`forget_refusal`), so that another launch finishing
        the run meanwhile cannot hide it."""
        try:
            refused = {k: v for k, v in _read_json(self.refused_file).items() if isinstance(v, dict)}
            key = os.environ.get(SWEEP_ID) or SINGLE_RUN
            write_json(self.refused_file, {**refused, key: {"time": now(), "error": str(error)}})
        except OSError:
            pass

    def forget_refusal(self, sweep_id: str | None) -> None:
        """The launch ``sweep_id`` has summarised its refusal: remove it (and ``refused.json`` once empty)."""
        refused = _read_json(self.refused_file)
        if sweep_id in refused:
            del refused[sweep_id]
            if refused:
                write_json(self.refused_file, refused)
            else:
                self.refused_file.unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically replace ``path`` with ``data`` as JSON."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def find_runs(root: str | Path, marker: str = "status.json") -> list[RunDir]:
    """The run directories below ``root`` (itself included) that hold ``marker``, sorted."""
    return [RunDir(p.parent) for p in sorted(Path(root).rglob(marker))]


def check_writable(directory: str | Path) -> None:
    """Create ``directory`` if needed and write a file in it; a :class:`RunError` naming it if that fails."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to run directory {directory}: {e.strerror or e}") from e


def record_failure(run_dir: Path, error: BaseException) -> None:
    """Mark the run in ``run_dir`` failed, or refused (:meth:`RunDir.fail`)."""
    RunDir(run_dir).fail(error)


def identity(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Everything in a config that determines what a run computes (not where it writes or how it logs)."""
    if isinstance(cfg, DictConfig):  # resolved key by key: paths.run_dir may need Hydra's runtime, absent in a plan
        ident = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                 for k in cfg if k not in NON_IDENTITY_KEYS}  # fmt: skip
    else:
        ident = {k: v for k, v in cfg.items() if k not in NON_IDENTITY_KEYS}
    for name in ("progress", "checkpoint"):  # how a run shows progress and how often it checkpoints
        ident.get("callbacks", {}).pop(name, None)
    return ident


def config_digest(cfg: DictConfig) -> str:
    """Hash of a config's :func:`identity`: a run directory holds runs of one digest."""
    return hashlib.sha256(json.dumps(identity(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf of two identities that differs (dotted keys, sorted)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def usable_checkpoint(path: Path) -> bool:
    """A torch checkpoint is a zip archive (a truncated one has no readable central directory); a distributed
    (sharded) checkpoint is a directory with its ``.metadata``. ``last.ckpt`` is a link to one of them."""
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
    run = RunDir(run_dir)
    check_writable(run.path)
    status = run.status() or {"attempts": 0}
    digest = config_digest(cfg)
    if status.get("config_digest", digest) != digest:
        changed = ""
        if run.config_file.exists():
            differences = config_differences(identity(yaml.safe_load(run.config_file.read_text()) or {}), identity(cfg))
            changed = f" ({'; '.join(differences[:4])}{'; ...' if len(differences) > 4 else ''})" if differences else ""
        raise RunRefused(
            f"{run.path} holds a run of a different config (digest {status['config_digest']} != {digest}){changed}; "
            "use another name/run dir, or delete it"
        )
    status["config_digest"] = digest
    if run.finished and cfg.resume:
        return "skip", None, status
    last = run.last_checkpoint
    if cfg.resume and (last.exists() or last.is_symlink()):
        if not last.exists():  # a link whose checkpoint is gone
            raise RunError(f"{last} points to {os.readlink(last)}, which does not exist; delete {last} to restart "
                           "this run from scratch")  # fmt: skip
        if not usable_checkpoint(last):
            raise RunError(f"{last} is unreadable (truncated?); delete it to restart this run from scratch")
        return "resume", last, status
    return "start", None, status
