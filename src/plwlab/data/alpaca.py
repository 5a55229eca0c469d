"""Alpaca records: the ``instruction`` / ``input`` / ``output`` fields, loaded and checked record by record, and the
prompt text of a single-turn record: the Stanford Alpaca template around instruction and input, or, for
prompt/completion pairs, the prompt as it is."""

from __future__ import annotations

import logging
from typing import Any

from plwlab.data.sources import DataError, read_rows, rename_columns

log = logging.getLogger(__name__)

# Stanford Alpaca templates (tatsu-lab/stanford_alpaca train.py). The completion follows "### Response:" directly.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
FIELDS = ("instruction", "input", "output")


def alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - Alpaca's field name
    """The Stanford Alpaca prompt for one example (the no-input template when ``input`` is empty)."""
    template = ALPACA_PROMPT_INPUT if input else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=input)


def prompt_text(record: dict[str, str], format: str = "alpaca") -> str:  # noqa: A002
    """A single-turn record's prompt in a data ``format``: prompt/completion pairs' prompt as it is (the
    instruction field, then the input, if any, after a blank line); every other format's in the Stanford Alpaca
    template (:func:`alpaca_prompt`)."""
    if format == "prompt_completion":
        return user_text(record["instruction"], record["input"])
    return alpaca_prompt(record["instruction"], record["input"])


def user_text(instruction: str, input: str = "") -> str:  # noqa: A002
    """Instruction and input as one text with no template (a blank line between): the prompt of a
    prompt/completion pair, and the user turn of a record as a single-turn conversation."""
    return instruction + (f"\n\n{input}" if input else "")


def load_records(path: str, split: str = "train", on_invalid: str = "error", empty_output: str = "keep",
                 columns: dict[str, str] | None = None) -> list[dict[str, str]]:  # fmt: skip
    """Alpaca-format records from a local ``.json`` (a list) / ``.jsonl`` / ``.parquet`` file or, failing that, an
    HF hub id (:func:`plwlab.data.sources.read_rows`); ``columns`` maps plwlab's field names to the dataset's
    (``{"output": "response"}``).

    Every record needs string ``instruction`` (non-empty) and ``output`` fields; ``input`` may be missing (= "").
    A malformed record raises :class:`DataError` naming it (``on_invalid="error"``) or is skipped, counted and
    reported (``on_invalid="skip"``). A record with an empty ``output`` (28 in Alpaca 52K) is kept, as Stanford's
    training code keeps it (it trains on EOS alone), or skipped and counted with ``empty_output="skip"``.
    """
    raw = rename_columns(read_rows(path, split), columns)
    records, problems, n_empty = [], [], 0
    for i, record in enumerate(raw):
        problem = _record_problem(record, i)
        if problem is None and empty_output == "skip" and not record["output"].strip():
            n_empty += 1
        elif problem is None:
            records.append({f: record.get(f, "") for f in FIELDS})
        elif on_invalid == "error":
            raise DataError(f"{path}: {problem}")
        else:
            problems.append(problem)
    if n_empty:
        log.warning("%s: skipped %d records with an empty output (empty_output=skip)", path, n_empty)
    if problems:
        log.warning("%s: skipped %d invalid records, e.g. %s", path, len(problems), "; ".join(problems[:3]))
    if not records:
        skipped = f", {n_empty} with an empty output skipped" if n_empty else ""
        raise DataError(f"{path}: no usable records ({len(raw)} in the file, {len(problems)} invalid{skipped})")
    return records


def _record_problem(record: Any, index: int) -> str | None:
    if not isinstance(record, dict):
        return f"record {index} is a {type(record).__name__}, not an object"
    for field in FIELDS:
        value = record.get(field, "" if field == "input" else None)
        if value is None:
            return f"record {index} has no {field!r} field"
        if not isinstance(value, str):
            return f"record {index} field {field!r} is {type(value).__name__}, not a string"
        if field == "instruction" and not value.strip():
            return f"record {index} has an empty {field!r}"
    return None
