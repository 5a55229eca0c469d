"""The results table: one tidy CSV row per (run, benchmark, metric). Evaluation writes it through
:func:`append_results`; ``plwlab analyze``, ``plwlab study`` and the notebook read it through :func:`read_table`.

Columns (:data:`COLUMNS`): run_id (``<training name>/<run dir>``, :attr:`plwlab.rundir.RunDir.run_id`), model,
dataset, plw, rg, benchmark, metric, score, stderr, n, config_digest, train_steps and data_sha256 (which run
exactly, trained how long, on which data). A row's key is (run_id, benchmark, metric). A table of another tool
with at least the columns the analysis needs (:data:`ANALYSIS_COLUMNS`) is read too.
"""

from __future__ import annotations

import csv
import fcntl
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from plwlab.files import atomic_write

log = logging.getLogger(__name__)
COLUMNS = ("run_id", "model", "dataset", "plw", "rg", "benchmark", "metric", "score", "stderr", "n",
           "config_digest", "train_steps", "data_sha256")  # fmt: skip
LEGACY_COLUMNS = COLUMNS[:10]  # tables written before config_digest, train_steps and data_sha256 existed
ROW_KEY = ("run_id", "benchmark", "metric")
ANALYSIS_COLUMNS = ("model", "dataset", "rg", "plw", "benchmark", "score")  # what the GLMM and the GAM need
FILE_NAME = "results.csv"


def default_path(run_dirs: Sequence[Path]) -> Path:
    """``results.csv`` in the sweep directory that holds the runs (one table per study, never a global one that
    pools unrelated studies)."""
    parents = {Path(run).parent for run in run_dirs}
    if len(parents) > 1:
        raise ValueError(f"the runs lie in {len(parents)} sweep directories; name the results table: results=PATH.csv")
    return parents.pop() / FILE_NAME


def read_results(path: str | Path) -> list[dict[str, str]]:
    """The rows of a plwlab results table, checked: plwlab's header and every line complete. A malformed table is an
    error naming its first bad line (evaluation reads it before doing any work)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = tuple(next(reader))
        if header not in (COLUMNS, LEGACY_COLUMNS):
            raise ValueError(f"{path}: line 1 is not a plwlab results header (expected {','.join(COLUMNS)})")
        rows = []
        for fields in reader:
            if len(fields) != len(header):
                raise ValueError(f"{path}: line {reader.line_num} has {len(fields)} fields, not {len(header)} "
                                 "(truncated or hand-edited?); fix or remove that line")  # fmt: skip
            rows.append(dict(zip(header, fields)))
    return rows


def read_table(path: str | Path) -> pd.DataFrame:
    """A results table as a DataFrame for the analysis: a plwlab table checked as :func:`read_results` checks it,
    or any CSV with the :data:`ANALYSIS_COLUMNS`. Raises naming what is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"results table {path} not found")
    with path.open(newline="") as f:
        header = tuple(next(csv.reader(f), ()))
    if header in (COLUMNS, LEGACY_COLUMNS):
        read_results(path)  # every line complete
    else:
        missing = [c for c in ANALYSIS_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path} is not a results table: it lacks the columns {missing} "
                             f"(a plwlab table has {','.join(COLUMNS)})")  # fmt: skip
    return pd.read_csv(path)


def append_results(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Add ``rows`` to the CSV results table at ``path``: a row with the same (run_id, benchmark, metric) is
    replaced, never duplicated (with a warning if it came from another training config); the file is rewritten
    atomically under an exclusive lock, so the jobs of a multirun can append concurrently and an interruption
    never truncates it. If the table cannot be read or written, the new rows are saved beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path.with_name(path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            existing = read_results(path)
            new = {tuple(str(r[k]) for k in ROW_KEY): r for r in rows}
            kept = []
            for old in existing:
                replacement = new.get(tuple(old[k] for k in ROW_KEY))
                if replacement is None:
                    kept.append(old)
                elif old.get("config_digest") and old["config_digest"] != str(replacement.get("config_digest")):
                    log.warning("%s: replacing %s %s of %s, which came from another training config (%s, now %s)",
                                path, old["benchmark"], old["metric"], old["run_id"], old["config_digest"],
                                replacement.get("config_digest"))  # fmt: skip
            with atomic_write(path) as tmp, tmp.open("w", newline="") as f:
                _write_rows(f, [*kept, *rows])
    except (OSError, ValueError) as e:
        pending = path.with_name(f"{path.stem}.pending-{os.getpid()}.csv")
        with pending.open("a", newline="") as f:
            _write_rows(f, rows)
        raise RuntimeError(f"{e}; the {len(rows)} new rows are kept in {pending}") from e


def _write_rows(f: Any, rows: Sequence[dict[str, Any]]) -> None:
    """``rows`` as CSV in plwlab's columns, after the header if ``f`` is at its start."""
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    if f.tell() == 0:
        writer.writeheader()
    writer.writerows({k: r.get(k) for k in COLUMNS} for r in rows)
