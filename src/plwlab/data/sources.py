"""Where training examples come from: raw rows of a local ``.json`` (a list) / ``.jsonl`` / ``.parquet`` file or an
HF hub dataset id, the column mapping that renames a dataset's own columns to the names plwlab reads, and the data
formats (:data:`FORMATS`) those rows may be in. :mod:`plwlab.data.examples` turns them into a data config's
examples."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from plwlab.data.segments import is_weight

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
FORMATS = ("alpaca", "prompt_completion", "messages", "sharegpt")
CHAT_FORMATS = ("messages", "sharegpt")  # conversations, rendered by the model's chat template


class DataError(ValueError):
    """Malformed instruction data; the message names the offending file or record."""


def read_json_records(path: Path) -> list[Any]:
    """The records of a local ``.json`` file (a list) or ``.jsonl`` file; a broken line is named by its number."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                rows.extend([json.loads(line)] if line.strip() else [])
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: invalid JSON on line {number} ({e.msg}, column {e.colno})") from e
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    return rows


def read_rows(path: str, split: str = "train") -> list[Any]:
    """Rows of a local ``.json`` / ``.jsonl`` / ``.parquet`` file or, through ``datasets.load_dataset``, the
    ``split`` of a local dataset folder or an HF hub dataset id."""
    local = Path(path).expanduser()
    if local.is_file():
        if local.suffix == ".parquet":
            import pyarrow as pa  # parquet files only
            import pyarrow.parquet as pq

            try:
                return pq.read_table(local).to_pylist()
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{local} is not a readable parquet file: {str(e).splitlines()[0]}") from None
        return read_json_records(local)
    if local.is_dir():  # a local dataset folder (data files, or a dataset repository cloned for offline use)
        path = str(local)
    elif local.exists() or path.startswith((".", "/", "~")) or path.endswith(LOCAL_SUFFIXES):
        raise DataError(f"data file not found: {path}")
    import datasets  # hub ids and dataset folders only: `datasets` is slow to import

    try:
        return list(datasets.load_dataset(path, split=split))
    except Exception as e:  # hub unreachable, unknown id, ...
        raise DataError(f"cannot load dataset {path!r} (not a local file; hub load failed: {e})") from e


def rename_columns(rows: list[Any], columns: Mapping[str, str] | None) -> list[Any]:
    """Rows with the dataset's column ``columns[name]`` available as ``name`` (e.g. ``{"output": "response"}``);
    rows that are not objects are left for the format's own check to name."""
    if not columns:
        return rows
    return [{**row, **{name: row[column] for name, column in columns.items() if column in row}}
            if isinstance(row, dict) else row for row in rows]  # fmt: skip


def example_weights(path: str, split: str, column: str) -> list[float]:
    """The ``column`` of a source's rows as example weights, one per row: each a finite number >= 0 (a missing,
    non-numeric, negative or non-finite value is a :class:`DataError` naming its row)."""
    weights = []
    for i, row in enumerate(read_rows(path, split)):
        value = row.get(column) if isinstance(row, dict) else None
        if value is None:
            raise DataError(f"{path}: record {i} has no weight column {column!r} (data.weight_column)")
        if isinstance(value, bool) or not is_weight(value):  # a JSON true is not a weight
            raise DataError(f"{path}: record {i}: weight column {column!r} must be a finite number >= 0, got {value!r}")
        weights.append(float(value))
    return weights


def weight_summary(column: str, weights: list[float]) -> dict[str, Any]:
    """What a run records of its example weights (``metrics.json``, the run config): the column, their count,
    min, mean and max, and how many are 0 (examples that do not train)."""
    return {"column": column, "n": len(weights), "min": min(weights), "mean": sum(weights) / len(weights),
            "max": max(weights), "n_zero": sum(w == 0 for w in weights)}  # fmt: skip
