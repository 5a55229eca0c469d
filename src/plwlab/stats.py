"""Table-1 style token statistics of an instruction dataset (``plwlab stats``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from plwlab.alpaca import token_lengths
from plwlab.tokenization import tokenize_examples


def dataset_stats(records: Sequence[dict[str, str]], tokenizer: Any, max_length: int = 512) -> dict[str, float]:
    """Table-1 style statistics: per-field token mean/std, totals, Rg, and truncation shares at ``max_length``."""
    lengths = token_lengths(records, tokenizer, progress=True)
    examples, _ = tokenize_examples(records, tokenizer, max_length=10**9)
    full = np.array([len(e.input_ids) for e in examples])
    templated_prompt = np.array([e.n_prompt for e in examples])
    prompt = lengths.prompt
    stats: dict[str, float] = {"n": len(records)}
    for field in ("instruction", "input", "output"):
        values = getattr(lengths, field)
        stats[f"{field}_mean"], stats[f"{field}_std"] = float(values.mean()), float(values.std(ddof=1))
    stats.update(
        prompt_mean=float(prompt.mean()),
        total_tokens=int(prompt.sum() + lengths.output.sum()),
        rg=lengths.rg,
        rg_mean_of_ratios=float(np.mean(lengths.output / np.maximum(prompt, 1))),
        truncated_share=float(np.mean(full > max_length)),
        empty_completion_share=float(np.mean(templated_prompt >= max_length)),
    )
    return stats
