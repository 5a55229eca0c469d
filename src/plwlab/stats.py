"""Table-1 style token statistics of an instruction dataset (``plwlab stats``): Alpaca records, prompt/completion
pairs or chat conversations, with Rg per dataset and, for conversations, per turn."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.progress import track

from plwlab.alpaca import token_lengths
from plwlab.tokenization import TokenizedExample, alpaca_rg, tokenize_chats, tokenize_examples

MAX_TURNS = 5  # Rg of the first exchanges, one column each


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
        return float(self.completion.sum() / max(self.prompt.sum(), 1))

    def rg_per_turn(self) -> list[float]:
        """Rg of the j-th exchange over the conversations that have one, j = 1, 2, ..."""
        return [float(self.completion[:, j].sum() / max(self.prompt[:, j].sum(), 1)) for j in range(self.prompt.shape[1])]


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


def rg_measure(format: str) -> Callable[[Sequence[Any], Any], float]:  # noqa: A002
    """The paper's Rg for a data ``format``: :func:`chat_rg` for conversations, else
    :func:`plwlab.tokenization.alpaca_rg` (output over instruction + input)."""
    from plwlab.sources import CHAT_FORMATS

    return chat_rg if format in CHAT_FORMATS else alpaca_rg


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def dataset_stats(records: Sequence[dict[str, str]], tokenizer: Any, max_length: int = 512,
                  template: str = "alpaca") -> dict[str, float]:  # fmt: skip
    """Table-1 style statistics: per-field token mean/std, totals, Rg, and truncation shares at ``max_length``.
    ``rg_within_max_length`` is Rg of what training sees: output tokens left inside the ``max_length`` window of the
    templated sequence (EOS not counted) over prompt tokens."""
    lengths = token_lengths(records, tokenizer, progress=True)
    examples, _ = tokenize_examples(records, tokenizer, max_length=10**9, template=template)
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
        rg_mean_of_ratios=float(np.mean(lengths.output / np.maximum(prompt, 1))),
        rg_within_max_length=float(kept_output.sum() / max(prompt.sum(), 1)),
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
        rg_mean_of_ratios=float(np.mean(completion / np.maximum(prompt, 1))),
        rg_templated=float(n_completion.sum() / max(full.sum() - n_completion.sum(), 1)),
        **{f"rg_turn_{j + 1}": rg for j, rg in enumerate(lengths.rg_per_turn()[:MAX_TURNS])},
        truncated_share=float(np.mean(full > max_length)),
        empty_completion_share=float(np.mean([not TokenizedExample(e.input_ids[:max_length], e.segment_ids[:max_length])
                                              .has_completion for e in examples])),  # fmt: skip
    )
    return stats
