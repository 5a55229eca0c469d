"""Table-1 style token statistics of an instruction dataset (``plwlab stats``): Alpaca records, prompt/completion
pairs or chat conversations, with Rg per dataset and, for conversations, per turn."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from plwlab.data.rg import chat_token_lengths, ratio, token_lengths
from plwlab.data.sources import CHAT_FORMATS
from plwlab.data.tokenization import TokenizedExample, tokenize_chats, tokenize_examples

MAX_TURNS = 5  # Rg of the first exchanges, one column each


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def dataset_stats(records: Sequence[dict[str, str]], tokenizer: Any, max_length: int = 512,
                  format: str = "alpaca") -> dict[str, float]:  # fmt: skip  # noqa: A002
    """Table-1 style statistics: per-field token mean/std, totals, Rg, and truncation shares at ``max_length``.
    ``rg_within_max_length`` is Rg of what training sees: output tokens left inside the ``max_length`` window of the
    templated sequence (EOS not counted) over prompt tokens."""
    lengths = token_lengths(records, tokenizer, progress=True)
    examples, _ = tokenize_examples(records, tokenizer, max_length=10**9, format=format)
    full = np.array([len(e.input_ids) for e in examples])
    completion = np.array([e.n_completion for e in examples])  # output tokens + EOS, tokenized with the prompt
    templated_prompt = full - completion
    kept_output = np.clip(np.minimum(full, max_length) - templated_prompt, 0, completion - 1)
    prompt = lengths.prompt
    stats: dict[str, float] = {"n": len(records)}
    for field in ("instruction", "input", "output"):
        stats[f"{field}_mean"], stats[f"{field}_std"] = _mean_std(getattr(lengths, field))
    stats.update(
        prompt_mean=float(prompt.mean()),
        total_tokens=int(prompt.sum() + lengths.output.sum()),
        rg=lengths.rg,
        rg_mean_of_ratios=float(np.mean(ratio(lengths.output, prompt))),
        rg_within_max_length=ratio(kept_output.sum(), prompt.sum()),
        truncated_share=float(np.mean(full > max_length)),
        empty_completion_share=float(np.mean(templated_prompt >= max_length)),
    )
    return stats


def chat_stats(conversations: Sequence[Sequence[dict[str, str]]], tokenizer: Any, max_length: int = 512,
               think_tags: Sequence[str] | None = None) -> dict[str, float]:  # fmt: skip
    """:func:`dataset_stats` for conversations: exchanges per conversation, system + user (prompt) and assistant
    (completion) content tokens per conversation, Rg over the dataset and per exchange (``rg_turn_j``, the first :data:`MAX_TURNS`), the
    templated length (the chat template's tokens included) and the truncation shares at ``max_length``."""
    lengths = chat_token_lengths(conversations, tokenizer, progress=True)
    examples, _ = tokenize_chats(conversations, tokenizer, 10**9, think_tags)
    full = np.array([len(e.input_ids) for e in examples])
    n_completion = np.array([e.n_completion for e in examples])
    prompt, completion = lengths.prompt.sum(1), lengths.completion.sum(1)
    stats: dict[str, float] = {"n": len(conversations)}
    stats["exchanges_mean"], stats["exchanges_std"] = _mean_std(lengths.n_exchanges)
    stats["prompt_mean"], stats["prompt_std"] = _mean_std(prompt)
    stats["output_mean"], stats["output_std"] = _mean_std(completion)
    stats["templated_mean"], stats["templated_std"] = _mean_std(full)
    stats.update(
        total_tokens=int(prompt.sum() + completion.sum()),
        rg=lengths.rg,
        rg_mean_of_ratios=float(np.mean(ratio(completion, prompt))),
        rg_templated=ratio(n_completion.sum(), full.sum() - n_completion.sum()),
        **{f"rg_turn_{j + 1}": rg for j, rg in enumerate(lengths.rg_per_turn()[:MAX_TURNS])},
        truncated_share=float(np.mean(full > max_length)),
        empty_completion_share=float(np.mean([not TokenizedExample(e.input_ids[:max_length], e.segment_ids[:max_length])
                                              .has_completion for e in examples])),  # fmt: skip
    )
    return stats


def token_statistics(examples: Sequence[Any], tokenizer: Any, format: str = "alpaca", max_length: int = 512,  # noqa: A002
                     think_tags: Sequence[str] | None = None) -> dict[str, float]:  # fmt: skip
    """The statistics of a data ``format``'s examples: :func:`chat_stats` for conversations, else
    :func:`dataset_stats`."""
    if format in CHAT_FORMATS:
        return chat_stats(examples, tokenizer, max_length, think_tags)
    return dataset_stats(examples, tokenizer, max_length, format)
