"""A data config's examples: the source's rows read in its format (Alpaca records, prompt/completion pairs as records,
or conversations), and, for a variant, the variant built from them (:mod:`plwlab.data.variants`). Training,
``plwlab stats`` / ``build-data`` and evaluation all read their examples here."""

from __future__ import annotations

from typing import Any

from plwlab.data.alpaca import load_records, user_text
from plwlab.data.chat import load_conversations
from plwlab.data.sources import CHAT_FORMATS, FORMATS, DataError
from plwlab.data.variants import build_variant


def load_source(path: str, format: str = "alpaca", split: str = "train", columns: dict[str, str] | None = None,  # noqa: A002
                roles: dict[str, str] | None = None, on_invalid: str = "error", empty_output: str = "keep") -> list[Any]:  # fmt: skip
    """The examples of a data source: Alpaca-style records (``alpaca``; ``prompt_completion`` pairs become records
    with the prompt as instruction and the completion as output) or conversations (``messages``, ``sharegpt``:
    lists of ``{"role", "content"}``). ``columns`` maps plwlab's names to the dataset's."""
    if format in CHAT_FORMATS:
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
    if format == "alpaca":
        return load_records(path, split, on_invalid, empty_output, columns)
    raise DataError(f"data.format must be one of {FORMATS}, got {format!r}")


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
    return [[{"role": "user", "content": user_text(r["instruction"], r["input"])},
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
    (:func:`plwlab.data.variants.build_variant`; chat data: single-turn only), the first ``limit`` of them. Returns the
    examples, the path they were read from (a built variant's file for a variant) and the variant's manifest."""
    source = load_source(path, format, split, columns, roles, on_invalid, empty_output)
    manifest = None
    if variant != "as_is":
        records = as_single_turn(source) if format in CHAT_FORMATS else source
        built, manifest = build_variant(path, variant, tokenizer, cache_dir or "outputs/data", target_rg, records=records)
        path = str(built)
        source = load_built_variant(path, format)
    return (source[:limit] if limit else source), path, manifest
