"""Where training examples come from: raw rows of a local ``.json`` (a list) / ``.jsonl`` / ``.parquet`` file or an
HF hub dataset id, the column mapping that renames a dataset's own columns to the names plwlab reads, the data
formats (:data:`FORMATS`), and a data config's examples with its variant built (:func:`load_examples`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from plwlab.alpaca import DataError, build_variant, load_records

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
FORMATS = ("alpaca", "prompt_completion", "messages", "sharegpt")
CHAT_FORMATS = ("messages", "sharegpt")


def prompt_template(format: str) -> str:  # noqa: A002
    """The prompt template of a single-turn format (:func:`plwlab.tokenization.prompt_text`): ``none`` for
    prompt/completion pairs, the Stanford Alpaca template otherwise."""
    return "none" if format == "prompt_completion" else "alpaca"


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
            import pyarrow.parquet as pq

            return pq.read_table(local).to_pylist()
        return read_json_records(local)
    if local.is_dir():  # a local dataset folder (data files, or a dataset repository cloned for offline use)
        path = str(local)
    elif local.exists() or path.startswith((".", "/", "~")) or path.endswith(LOCAL_SUFFIXES):
        raise DataError(f"data file not found: {path}")
    import datasets

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


def load_source(path: str, format: str = "alpaca", split: str = "train", columns: dict[str, str] | None = None,  # noqa: A002
                roles: dict[str, str] | None = None, on_invalid: str = "error", empty_output: str = "keep") -> list[Any]:  # fmt: skip
    """The examples of a data source: Alpaca-style records (``alpaca``; ``prompt_completion`` pairs become records
    with the prompt as instruction and the completion as output) or conversations (``messages``, ``sharegpt``:
    lists of ``{"role", "content"}``). ``columns`` maps plwlab's names to the dataset's."""
    if format not in FORMATS:
        raise DataError(f"data.format must be one of {FORMATS}, got {format!r}")
    if format in CHAT_FORMATS:
        from plwlab.chat import load_conversations

        return load_conversations(path, format, on_invalid, split, columns, roles)
    if format == "prompt_completion":  # the prompt as instruction, the completion as output, no input
        names = {"prompt": "prompt", "completion": "completion", **(columns or {})}
        try:
            records = load_records(path, split, on_invalid, empty_output,
                                   {"instruction": names["prompt"], "output": names["completion"]})  # fmt: skip
        except DataError as e:  # name the fields as this format calls them
            message = str(e).replace("'instruction'", repr(names["prompt"])).replace("'output'", repr(names["completion"]))
            raise DataError(message) from None
        return [{**r, "input": ""} for r in records]
    return load_records(path, split, on_invalid, empty_output, columns)


def as_single_turn(conversations: list[list[dict[str, str]]]) -> list[dict[str, str]]:
    """Single-turn conversations as Alpaca records (instruction = the user turn, output = the assistant turn), the
    form the paper's variants (Short, rg_target) invert; a multi-turn conversation or a system prompt raises."""
    records = []
    for i, messages in enumerate(conversations):
        roles = [m["role"] for m in messages]
        if roles != ["user", "assistant"]:
            what = "a system prompt" if "system" in roles else f"{roles.count('assistant')} assistant turns"
            raise DataError(f"conversation {i} has {what}: the Short/rg_target inversion is defined for single-turn "
                            "data (one user turn, one assistant turn); use data.variant=as_is for this dataset")  # fmt: skip
        records.append({"instruction": messages[0]["content"], "input": "", "output": messages[1]["content"]})
    return records


def as_conversations(records: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """Alpaca records as single-turn conversations (the input, if any, after the instruction)."""
    return [[{"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")},
             {"role": "assistant", "content": r["output"]}] for r in records]  # fmt: skip


def load_built_variant(path: str, format: str) -> list[Any]:  # noqa: A002
    """The examples of a built variant's file (Alpaca records; single-turn conversations again for chat data)."""
    records = load_records(path)
    return as_conversations(records) if format in CHAT_FORMATS else records


def load_examples(
    path: str, tokenizer: Any, format: str = "alpaca", split: str = "train",  # noqa: A002
    columns: dict[str, str] | None = None, roles: dict[str, str] | None = None, on_invalid: str = "error",
    empty_output: str = "keep", variant: str = "as_is", target_rg: float | None = None,
    cache_dir: str | None = "outputs/data", limit: int | None = None,
) -> tuple[list[Any], str, dict[str, Any] | None]:  # fmt: skip
    """What a data config trains on: the source's examples (:func:`load_source`), or a built variant of them
    (:func:`plwlab.alpaca.build_variant`; chat data: single-turn only), the first ``limit`` of them. Returns the
    examples, the path they were read from (a built variant's file for a variant) and the variant's manifest."""
    source = load_source(path, format, split, columns, roles, on_invalid, empty_output)
    manifest = None
    if variant != "as_is":
        records = as_single_turn(source) if format in CHAT_FORMATS else source
        built, manifest = build_variant(path, variant, tokenizer, cache_dir or "outputs/data", target_rg, records=records)
        path = str(built)
        source = load_built_variant(path, format)
    return (source[:limit] if limit else source), path, manifest
