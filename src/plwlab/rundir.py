"""A training run's directory: the one module that knows its layout, its identity (run id, config digest), its
state and its lock. Training writes it (:mod:`plwlab.training.train`), evaluation and analysis read it.

``status.json`` says whether the run is running, interrupted, failed or finished, how many attempts it took and
what it resumed from; a run directory holds one config (its digest), and :func:`prepare_run_dir` decides whether
to start, resume from ``checkpoints/last.ckpt`` or skip. Layout (:class:`RunDir`)::

    config.yaml  status.json  metrics.csv  metrics.json  data_manifest.json  refused.json  .lock
    checkpoints/last.ckpt -> step-N.ckpt     hf_model/ (+ plwlab.json)     eval/ (generations/, status.json)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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

    # -- reading
    @property
    def is_exported(self) -> bool:
        """Training finished and exported the model (evaluation needs this)."""
        return self.export_meta_file.exists()

    def status(self) -> dict[str, Any]:
        return _read_json(self.status_file)

    def metrics(self) -> dict[str, Any]:
        return _read_json(self.metrics_file)

    def export_meta(self) -> dict[str, Any]:
        """``hf_model/plwlab.json`` (exports before the ``dataset`` key named it ``data``)."""
        meta = _read_json(self.export_meta_file)
        if "data" in meta:
            meta.setdefault("dataset", meta.pop("data"))
        return meta

    def refusal(self, sweep_id: str | None) -> str | None:
        """Why the launch ``sweep_id`` of a sweep left this run untouched, if it did (``refused.json``)."""
        refused = _read_json(self.refused_file)
        return refused.get("error") if refused and sweep_id and refused.get("sweep_id") == sweep_id else None

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

    # -- writing
    def write_status(self, status: dict[str, Any]) -> None:
        write_json(self.status_file, status)


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
    """Mark a run failed in its ``status.json`` (kept for the sweep summary), if the directory is writable. A
    refusal is recorded beside the run (``refused.json``), never in it, and a finished run is never marked failed."""
    run = RunDir(run_dir)
    try:
        if isinstance(error, RunRefused):
            write_json(run.refused_file, {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "error": str(error),
                                          "sweep_id": os.environ.get(SWEEP_ID)})  # fmt: skip
            return
        status = run.status() or {"attempts": 1}
        if status.get("status") == "finished":
            return
        status.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000])
        run.write_status(status)
    except OSError:
        pass


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


HEARTBEAT_SECONDS = 30.0  # how often a training process renews its lock record
STALE_SECONDS = 120.0  # a record not renewed for this long is a dead holder's


@contextmanager
def run_dir_lock(run_dir: Path, rank: int = 0) -> Iterator[None]:
    """Hold ``<run_dir>/.lock`` (rank 0) while a run trains there: a second launcher of the same run is refused
    instead of resuming from a live checkpoint.

    Two locks in one: ``flock`` (released by the OS when the process dies, even by kill -9), and a record in the
    file (host, pid, heartbeat renewed every :data:`HEARTBEAT_SECONDS`) for parallel filesystems where ``flock``
    fails (Lustre without ``-o flock``: ENOSYS; then the record alone locks, with a warning) or holds only per node
    (``localflock``). A live record of another holder refuses the run; a record on this host whose process is gone,
    or one not renewed for :data:`STALE_SECONDS`, is a dead holder's and is taken over (after waiting that long
    when it names another node).
    """
    if rank != 0:
        yield
        return
    run = RunDir(run_dir)
    check_writable(run.path)
    try:
        handle = open(run.lock_file, "a+")
    except OSError as e:
        raise RunError(f"cannot write to run directory {run.path}: {e.strerror or e}") from e
    with handle:
        flocked = _flock(handle, run)
        try:
            holder = _live_holder(run.lock_file)
            if holder:
                raise RunRefused(f"{run.path} is in use by another training process ({holder}); skipped")
            record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
            write_lock_record(run.lock_file, {**record, "heartbeat": time.time()})
            stop = threading.Event()
            beat = threading.Thread(target=_heartbeat, args=(run.lock_file, record, stop), daemon=True)
            beat.start()
            try:
                yield
            finally:
                stop.set()
                beat.join()
                write_lock_record(run.lock_file, {})
        finally:
            if flocked:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _flock(handle: Any, run: RunDir) -> bool:
    """Take the flock (True), refuse if another process holds it, or say that this filesystem has none (False)."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        raise RunRefused(f"{run.path} is in use by another training process ({_describe(_read_record(run.lock_file))}); "
                         "skipped") from None  # fmt: skip
    except OSError as e:  # ENOSYS, ENOLCK, EOPNOTSUPP: no flock here (Lustre without -o flock, some NFS mounts)
        log.warning("cannot flock %s (%s): locking the run directory by its record and heartbeat alone",
                    run.lock_file, e.strerror or e)  # fmt: skip
        return False


RECORD_BYTES = 512  # a lock record is rewritten in place, whole, by one write of this size (never truncated)


def write_lock_record(path: Path, record: dict[str, Any]) -> None:
    """Replace the lock record in place: one ``pwrite`` of :data:`RECORD_BYTES` at offset 0, so a reader never sees
    it half written or empty (the file itself must stay: ``flock`` holds its inode)."""
    data = json.dumps(record).encode() if record else b""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data.ljust(RECORD_BYTES), 0)
    finally:
        os.close(fd)


def _read_record(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text().strip() or "{}")
    except (OSError, ValueError):
        return {}  # an old plain-text record: no live holder can be read from it


def _describe(record: dict[str, Any]) -> str:
    return f"pid {record.get('pid')} on {record.get('host')} since {record.get('since')}" if record else "unknown"


def _heartbeat(path: Path, record: dict[str, Any], stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        write_lock_record(path, {**record, "heartbeat": time.time()})


def _live_holder(path: Path) -> str | None:
    """The live holder named by the lock record, described, or None (no record, this process, or a dead holder)."""
    record = _read_record(path)
    if not record or (record.get("host"), record.get("pid")) == (socket.gethostname(), os.getpid()):
        return None
    if record.get("host") == socket.gethostname():  # this host: the process is there or it is not
        try:
            os.kill(int(record["pid"]), 0)
        except (ProcessLookupError, ValueError, KeyError):
            return None
        except PermissionError:
            pass
        return _describe(record) if time.time() - record.get("heartbeat", 0) < STALE_SECONDS else None
    # another node: alive while its heartbeat moves; wait until it is stale or moves
    first = record.get("heartbeat", 0)
    while time.time() - first < STALE_SECONDS:
        time.sleep(min(HEARTBEAT_SECONDS / 4, 1.0))
        again = _read_record(path)
        if (again.get("host"), again.get("pid")) != (record.get("host"), record.get("pid")):
            return _live_holder(path)  # someone else took it meanwhile
        if again.get("heartbeat", 0) > first:
            return _describe(again)
    return None


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
    if status.get("status") == "finished" and cfg.resume:
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
