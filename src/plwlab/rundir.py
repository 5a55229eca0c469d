"""The run directory's state machine: a run directory holds one config (its digest), and ``status.json`` says
whether the run is new, running, interrupted, failed or finished, how many attempts it took and what it resumed
from. :func:`prepare_run_dir` decides whether to start, resume from ``checkpoints/last.ckpt`` or skip."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from plwlab.config import to_dict
from plwlab.files import atomic_write

# keys that do not change what a run computes: they may differ between a run and its resumption
NON_IDENTITY_KEYS = ("paths", "logger", "resume", "plan_only", "name")


class RunError(RuntimeError):
    """A run could not be written or resumed (unwritable directory, full disk, corrupt checkpoint)."""


class RunRefused(RunError):
    """A run directory holds another config's run, or another process is training in it: it is left untouched."""


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically replace ``path`` with ``data`` as JSON."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def record_failure(run_dir: Path, error: BaseException) -> None:
    """Mark a run failed in its ``status.json`` (kept for the sweep summary), if the directory is writable. A
    refusal is recorded beside the run (``refused.json``), never in it, and a finished run is never marked failed."""
    try:
        if isinstance(error, RunRefused):
            write_json(run_dir / "refused.json", {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "error": str(error)})
            return
        status_file = run_dir / "status.json"
        status = json.loads(status_file.read_text()) if status_file.exists() else {"attempts": 1}
        if status.get("status") == "finished":
            return
        status.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000])
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(status_file, status)
    except OSError:
        pass


def config_digest(cfg: DictConfig) -> str:
    """Hash of everything that determines what a run computes (not where it writes or how it logs)."""
    identity = {k: v for k, v in to_dict(cfg).items() if k not in NON_IDENTITY_KEYS}
    for name in ("progress", "checkpoint"):  # how a run shows progress and how often it checkpoints
        identity.get("callbacks", {}).pop(name, None)
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _usable_checkpoint(path: Path) -> bool:
    """A torch checkpoint is a zip archive (a truncated one has no readable central directory); a distributed
    (sharded) checkpoint is a directory with its ``.metadata``. ``last.ckpt`` is a link to one of them."""
    if path.is_dir():
        return (path / ".metadata").exists()
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class OutputDirCheck(Callback):
    """Hydra callback: an output directory that cannot be created is one line of error before Hydra tries (and
    fails with a traceback)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(config.hydra.sweep.dir)


def _check_writable(directory: str) -> None:
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot write to run directory {directory}: {e.strerror or e}") from None


@contextmanager
def run_dir_lock(run_dir: Path, rank: int = 0) -> Iterator[None]:
    """Hold ``<run_dir>/.lock`` (rank 0; the OS releases it when the process dies, even by kill -9) while a run
    trains there: a second launcher of the same run is refused instead of resuming from a live checkpoint."""
    if rank != 0:
        yield
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / ".lock", "a+")
    except OSError as e:
        raise RunError(f"cannot write to run directory {run_dir}: {e.strerror or e}") from e
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise RunRefused(f"{run_dir} is in use by another training process ({handle.read().strip()}); skipped") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
        raise RunRefused(
            f"{run_dir} holds a run of a different config (digest {status['config_digest']} != {digest}); "
            "use another name/run dir, or delete it"
        )
    status["config_digest"] = digest
    if status.get("status") == "finished" and cfg.resume:
        return "skip", None, status
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.resume and (last.exists() or last.is_symlink()):
        if not _usable_checkpoint(last):
            raise RunError(f"{last} is unreadable (truncated?); delete it to restart this run from scratch")
        return "resume", last, status
    return "start", None, status
