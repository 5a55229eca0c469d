"""The lock of a training run's directory (``<run dir>/.lock``): one training process at a time trains in it, on
one node or across nodes of a parallel filesystem. :func:`run_dir_lock` is held by rank 0 for the whole attempt."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from plwlab.rundir import RunDir, RunError, RunRefused, check_writable, now

log = logging.getLogger(__name__)

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
            record = {"host": socket.gethostname(), "pid": os.getpid(), "since": now()}
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
