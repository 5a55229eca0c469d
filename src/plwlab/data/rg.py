"""Rg, the generation ratio: completion tokens over prompt tokens. The one home of that ratio, of the token counts
it is taken from, and of the dataset Rg that runs record and the analysis models.

A dataset's Rg (the paper's) is its mean completion tokens over its mean prompt tokens, each text tokenized on its
own with no template and no special tokens: for Alpaca records the ``output`` over ``instruction`` + ``input``
(:func:`token_lengths`; with the LLaMA tokenizer 3.28 for Alpaca 52K, the paper reports 3.27), for conversations
the assistant turns' content over the system and user turns' (:func:`chat_token_lengths`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import track

from plwlab.data.sources import CHAT_FORMATS
from plwlab.data.tokenization import cache_key
from plwlab.files import atomic_write

# Table 1 of the paper
PAPER_RG = {"alpaca_data": 3.27, "alpaca_data_cleaned": 7.83, "alpaca_data_short": 0.082,
            "alpaca_data_medium": 1.0, "alpaca_data_tiny": 0.042}  # fmt: skip


def ratio(completion_tokens: float | np.ndarray, prompt_tokens: float | np.ndarray) -> float | np.ndarray:
    """Rg of token counts: ``completion / prompt`` (a prompt of 0 tokens counts as 1); element by element for
    arrays (one ratio per example or per candidate subset)."""
    rg = np.asarray(completion_tokens, dtype=np.float64) / np.maximum(prompt_tokens, 1)
    return float(rg) if rg.ndim == 0 else rg


@dataclass
class FieldLengths:
    """Token counts per example of each field (no special tokens, no template)."""

    instruction: np.ndarray
    input: np.ndarray
    output: np.ndarray

    @property
    def prompt(self) -> np.ndarray:
        return self.instruction + self.input

    @property
    def rg(self) -> float:
        return ratio(self.output.sum(), self.prompt.sum())


def token_lengths(
    records: Sequence[dict[str, str]], tokenizer: Any, batch_size: int = 4096, progress: bool = False
) -> FieldLengths:
    """Batched token counts of ``instruction``, ``input`` and ``output`` for every record."""
    out: dict[str, list[int]] = {"instruction": [], "input": [], "output": []}
    starts = range(0, len(records), batch_size)
    for start in track(starts, description="tokenizing", disable=not progress, transient=True):
        chunk = records[start : start + batch_size]
        for field, lengths in out.items():
            ids = tokenizer([r[field] for r in chunk], add_special_tokens=False, return_attention_mask=False)["input_ids"]
            lengths.extend(len(x) for x in ids)
    return FieldLengths(**{k: np.asarray(v, dtype=np.int64) for k, v in out.items()})


@dataclass
class ChatLengths:
    """Content tokens of each conversation's exchanges (messages tokenized alone, no template): exchange j is the
    j-th assistant turn (``completion[i, j]``) and the system and user turns since the previous one
    (``prompt[i, j]``); 0 where a conversation has fewer exchanges."""

    prompt: np.ndarray  # (conversations, max exchanges)
    completion: np.ndarray
    n_exchanges: np.ndarray  # (conversations,)

    @property
    def rg(self) -> float:
        """Assistant tokens over system + user tokens, over the whole dataset."""
        return ratio(self.completion.sum(), self.prompt.sum())

    def rg_per_turn(self) -> list[float]:
        """Rg of the j-th exchange over the conversations that have one, j = 1, 2, ..."""
        return [ratio(self.completion[:, j].sum(), self.prompt[:, j].sum()) for j in range(self.prompt.shape[1])]


def chat_token_lengths(conversations: Sequence[Sequence[dict[str, str]]], tokenizer: Any, batch_size: int = 4096,
                       progress: bool = False) -> ChatLengths:  # fmt: skip
    """Batched content token counts of every message, grouped into exchanges (see :class:`ChatLengths`)."""
    contents = [m["content"] for c in conversations for m in c]
    counts: list[int] = []
    for start in track(range(0, len(contents), batch_size), description="tokenizing", disable=not progress,
                       transient=True):  # fmt: skip
        ids = tokenizer(contents[start : start + batch_size], add_special_tokens=False, return_attention_mask=False)
        counts.extend(len(x) for x in ids["input_ids"])
    n_exchanges = np.array([sum(m["role"] == "assistant" for m in c) for c in conversations])
    prompt = np.zeros((len(conversations), max(n_exchanges.max(initial=0), 1)), dtype=np.int64)
    completion = np.zeros_like(prompt)
    k = 0
    for i, conversation in enumerate(conversations):
        j = 0
        for m in conversation:
            if m["role"] == "assistant":
                completion[i, j] += counts[k]
                j += 1
            elif j < prompt.shape[1]:  # a trailing user turn with no reply is not part of any exchange
                prompt[i, j] += counts[k]
            k += 1
    return ChatLengths(prompt, completion, n_exchanges)


def chat_rg(conversations: list[list[dict[str, str]]], tokenizer: Any) -> float:
    """The paper's Rg for conversations: assistant content tokens over system + user content tokens, each message
    tokenized alone (no template, no special tokens), as Alpaca's fields are."""
    return chat_token_lengths(conversations, tokenizer).rg


def alpaca_rg(records: Sequence[dict[str, str]], tokenizer: Any) -> float:
    """The paper's Rg of records: output tokens over instruction + input tokens, each field tokenized alone."""
    return token_lengths(records, tokenizer).rg


def dataset_rg(examples: Sequence[Any], tokenizer: Any, format: str = "alpaca") -> float:  # noqa: A002
    """The paper's Rg of a data ``format``'s examples: :func:`chat_rg` for conversations, else :func:`alpaca_rg`."""
    return (chat_rg if format in CHAT_FORMATS else alpaca_rg)(examples, tokenizer)


def cached_rg(examples: Sequence[Any], tokenizer: Any, format: str, cache_dir: str | Path | None) -> float:  # noqa: A002
    """:func:`dataset_rg`, cached in ``cache_dir`` beside the tokenized data: runs 2..N of a sweep do not tokenize
    the dataset again for it."""
    if cache_dir is None:
        return dataset_rg(examples, tokenizer, format)
    measure = "chat_rg" if format in CHAT_FORMATS else "alpaca_rg"
    path = Path(cache_dir) / f"rg-{cache_key(examples, tokenizer, measure)}.json"
    if path.exists():
        return json.loads(path.read_text())["rg"]
    rg = dataset_rg(examples, tokenizer, format)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps({"rg": rg}) + "\n")
    return rg
