"""The results table: one tidy CSV row per (run, benchmark, metric). Evaluation writes it through
:func:`append_results`; ``plwlab analyze``, ``plwlab study`` and the notebook read it through :func:`read_table`.

Columns (:data:`COLUMNS`): run_id (``<training name>/<run dir>``, :attr:`plwlab.rundir.RunDir.run_id`), model,
dataset, plw, rg, benchmark, metric, score, stderr, n, config_digest, train_steps and data_sha256 (which run
exactly, trained how long, on which data). A row's key is (run_id, benchmark, metric). A table of another tool
with at least the columns the analysis needs (:data:`ANALYSIS_COLUMNS`) is read too. Text cells that a spreadsheet
would run as a formula (a run named ``=HYPERLINK(...)``) are written with a leading ``'``
(:func:`plwlab.files.spreadsheet_safe`) and read back as they were.
"""

from __future__ import annotations

import csv
import fcntl
import io
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from plwlab.files import atomic_write, from_spreadsheet_safe, spreadsheet_safe

log = logging.getLogger(__name__)
COLUMNS = ("run_id", "model", "dataset", "plw", "rg", "benchmark", "metric", "score", "stderr", "n",
           "config_digest", "train_steps", "data_sha256")  # fmt: skip
LEGACY_COLUMNS = COLUMNS[:10]  # tables written before config_digest, train_steps and data_sha256 existed
ROW_KEY = ("run_id", "benchmark", "metric")
ANALYSIS_COLUMNS = ("model", "dataset", "rg", "plw", "benchmark", "score")  # what the GLMM and the GAM need
FILE_NAME = "results.csv"


def sweep_names(table: pd.DataFrame) -> list[str]:
    """The training names (sweeps, W&B groups) of a table's runs: the part of each ``run_id`` before ``/``."""
    return sorted({str(r).split("/", 1)[0] for r in table["run_id"]})


def metric_key(benchmark: str, metric: str) -> str:
    """The tracker key of a result (``<benchmark>/<metric>``, e.g. ``arc_challenge/acc_norm``): what an eval run
    logs and a dashboard panel plots."""
    return f"{benchmark}/{metric}"


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
            rows.append({k: from_spreadsheet_safe(v) for k, v in zip(header, fields)})
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
    table = pd.read_csv(path)
    text = table.select_dtypes(include="object").columns
    table[text] = table[text].map(from_spreadsheet_safe)
    return table


def check_results_path(path: str | Path) -> Path:
    """``path`` as a results table evaluation can write, checked before any work: not a directory, its folder
    creatable and writable, the table itself readable as a plwlab table. Raises ValueError naming the problem."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"results={path} is a directory; name a CSV file in it, e.g. results={path / FILE_NAME}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".{path.name}.write-test{os.getpid()}")
        probe.write_text("")
        probe.unlink()
        if path.exists():
            with path.open("a"):
                pass
    except OSError as e:
        raise ValueError(f"cannot write the results table {path}: {e.strerror or e}") from None
    read_results(path)  # a malformed table is an error now, not after hours of evaluation
    return path


def append_results(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Add ``rows`` to the CSV results table at ``path``: a row with the same (run_id, benchmark, metric) is
    replaced, never duplicated (with a warning if it came from another training config); the file is rewritten
    atomically under an exclusive lock, so the jobs of a multirun can append concurrently and an interruption
    never truncates it. If the table cannot be read or written, the new rows are saved beside it or, where nothing
    can be written (full disk, read-only folder), printed on stderr; the error says where."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
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
        raise RuntimeError(f"{e}; the {len(rows)} new rows are kept in {_keep_pending(path, rows)}") from e


def _keep_pending(path: Path, rows: Sequence[dict[str, Any]]) -> str:
    """Save rows that could not go into the table at ``path``: beside it (``<stem>.pending-<pid>.csv``), else, on
    a full disk or a read-only folder, on stderr (the job's log). Says where."""
    pending = path.with_name(f"{path.stem}.pending-{os.getpid()}.csv")
    text = io.StringIO()
    _write_rows(text, rows)
    try:
        with pending.open("a", newline="") as f:
            f.write(text.getvalue() if f.tell() == 0 else text.getvalue().split("\r\n", 1)[1])
            f.flush()
            os.fsync(f.fileno())
        return str(pending)
    except OSError:
        if pending.exists() and pending.stat().st_size == 0:
            pending.unlink(missing_ok=True)
        sys.stderr.write(f"plwlab: results rows that could not be written to {path}:\n{text.getvalue()}")
        sys.stderr.flush()
        return "this job's stderr (its log), as CSV"


def _write_rows(f: Any, rows: Sequence[dict[str, Any]]) -> None:
    """``rows`` as CSV in plwlab's columns, after the header if ``f`` is at its start."""
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    if f.tell() == 0:
        writer.writeheader()
    writer.writerows({k: spreadsheet_safe(r.get(k)) for k in COLUMNS} for r in rows)
