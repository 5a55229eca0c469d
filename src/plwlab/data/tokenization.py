"""Examples -> token ids with a segment per token (:mod:`plwlab.data.segments`), cached on disk so that every run of
a sweep after the first loads them. Alpaca records and prompt/completion pairs are tokenized as Stanford Alpaca does
(``[bos] + tok(prompt + completion) + [eos]``) but batched; chat conversations through the model's chat template
(:func:`plwlab.data.chat.tokenize_conversation`). What a tokenizer is (its fingerprint, SentencePiece's normalizer)
is known here too.

The prompt loss weight is *not* stored here: it is applied only in
:func:`plwlab.training.loss.segment_weighted_loss`,
so a PLW sweep reuses the same tokenized data (and the same cache file).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import track
from tokenizers import normalizers, pre_tokenizers

from plwlab.data.alpaca import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, prompt_text
from plwlab.data.chat import tokenize_conversation
from plwlab.data.segments import COMPLETION_ID, COMPLETION_IDS, PROMPT_ID
from plwlab.data.sources import CHAT_FORMATS
from plwlab.files import atomic_write

log = logging.getLogger(__name__)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    segment_ids: list[int]  # plwlab.data.segments: the segment id of each token
    weight: float = 1.0  # the example's weight (data.weight_column), multiplying every token weight of it

    @classmethod
    def from_prompt_length(cls, input_ids: list[int], n_prompt: int) -> TokenizedExample:
        """A single-turn example whose first ``n_prompt`` tokens are prompt (``user``), the rest completion."""
        n = min(n_prompt, len(input_ids))
        return cls(input_ids, [PROMPT_ID] * n + [COMPLETION_ID] * (len(input_ids) - n))

    @property
    def completion_mask(self) -> list[int]:
        """1 for a completion (assistant) token, 0 for the rest."""
        return [int(s in COMPLETION_IDS) for s in self.segment_ids]

    @property
    def n_completion(self) -> int:
        return sum(s in COMPLETION_IDS for s in self.segment_ids)

    @property
    def has_completion(self) -> bool:
        return any(s in COMPLETION_IDS for s in self.segment_ids)


def sentencepiece_normalizer() -> Any:
    """SentencePiece's dummy prefix and space marker as a ``tokenizers`` normalizer (the legacy LLaMA
    ``tokenizer.json``'s): "▁" prepended to every text, every space turned into "▁"."""
    return normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])


def _newline_safe_backend(tokenizer: Any) -> tuple[Any, Any, int] | None:
    """For a SentencePiece-style BPE fast tokenizer (LLaMA's) in which no vocabulary piece contains a newline, BPE
    never merges across ``\n``: a text's tokens are exactly its ``\n``-separated segments' tokens joined by the
    newline token, where only the first segment gets the "▁" prefix. Two layouts qualify: a Metaspace
    pre-tokenizer (transformers 5's LLaMA) and the Prepend + Replace normalizer of SentencePiece itself
    (:func:`plwlab.training.model.sentencepiece_tokenizer`). Returns (backend for first segments, backend for later
    segments, newline id), else None."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return None
    pre, norm = backend.pre_tokenizer, backend.normalizer
    metaspace = type(pre).__name__ == "Metaspace" and norm is None
    sentencepiece = pre is None and norm is not None and repr(norm) == repr(sentencepiece_normalizer())
    if not (metaspace or sentencepiece):
        return None
    vocab = tokenizer.get_vocab()
    newline = vocab.get("<0x0A>")
    if newline is None or "\n" in vocab or any("\n" in piece for piece in vocab):
        return None
    backend = copy.deepcopy(backend)  # without the truncation/padding a previous call may have left on it
    backend.no_truncation()
    backend.no_padding()
    later = copy.deepcopy(backend)
    if metaspace:
        later.pre_tokenizer = pre_tokenizers.Metaspace(replacement=pre.replacement, prepend_scheme="never", split=pre.split)
    else:
        later.normalizer = normalizers.Replace(" ", "▁")
    return backend, later, newline


def batch_token_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids (no special tokens) of many texts, each distinct text segment tokenized once.

    With a tokenizer that never merges across newlines (see :func:`_newline_safe_backend`; LLaMA's
    SentencePiece BPE qualifies), texts are cut at ``\n`` and every distinct segment (the Alpaca template's
    lines recur in every example, a prompt recurs inside its full text) is encoded once in a batch; the result
    is identical to encoding each text whole. Any other tokenizer: one plain batched call.
    """
    safe = _newline_safe_backend(tokenizer)
    if safe is None:
        return tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    first_backend, later_backend, newline = safe
    split = [t.split("\n") for t in texts]
    # A text starting with a newline keeps the prepended "▁" as a token of its own: encode those whole.
    leading = [i for i, parts in enumerate(split) if parts[0] == "" and len(parts) > 1]
    encoded = first_backend.encode_batch_fast([texts[i] for i in leading], add_special_tokens=False)
    whole = {i: e.ids for i, e in zip(leading, encoded)}
    firsts = list(dict.fromkeys(parts[0] for parts in split))
    laters = list(dict.fromkeys(p for parts in split for p in parts[1:]))
    first_ids = dict(zip(firsts, (e.ids for e in first_backend.encode_batch_fast(firsts, add_special_tokens=False))))
    later_ids = dict(zip(laters, (e.ids for e in later_backend.encode_batch_fast(laters, add_special_tokens=False))))
    out = []
    for i, parts in enumerate(split):
        if i in whole:
            out.append(whole[i])
            continue
        ids = list(first_ids[parts[0]])
        for part in parts[1:]:
            ids.append(newline)
            ids.extend(later_ids[part])
        out.append(ids)
    return out


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Short hash of how a tokenizer tokenizes: its whole ``tokenizer.json`` (vocabulary, merges, normalizer,
    pre-tokenizer, special tokens) for a fast tokenizer, else its vocabulary. Data tokenized or measured with
    another tokenizer, or the same vocabulary merged differently, is rebuilt."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        if backend.truncation is not None or backend.padding is not None:  # left on by a previous call: not part
            backend = copy.deepcopy(backend)  # of how it tokenizes, so hashed as off (the copy costs, rarely)
            backend.no_truncation()
            backend.no_padding()
        return hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]


def tokenize_examples(
    records: Sequence[dict[str, str]], tokenizer: Any, max_length: int, format: str = "alpaca"  # noqa: A002
) -> tuple[list[TokenizedExample], int]:
    """Tokenize single-turn records as Stanford Alpaca does, but batched (:func:`batch_token_ids`).

    ``input_ids = [bos] + tok(prompt + output) + [eos]`` truncated on the right to ``max_length``, the prompt from
    :func:`plwlab.data.alpaca.prompt_text` in the data ``format``; the first ``1 + len(tok(prompt))`` tokens are prompt (``user``), the rest completion
    (``assistant``). Returns the examples and how many of them lost *every* completion token to truncation.
    """
    prompts = [prompt_text(r, format) for r in records]
    ids = batch_token_ids(tokenizer, prompts + [p + r["output"] for p, r in zip(prompts, records, strict=True)])
    prompt_ids, full = ids[: len(prompts)], ids[len(prompts) :]
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    examples = [
        TokenizedExample.from_prompt_length((bos + f + [tokenizer.eos_token_id])[:max_length], len(bos) + len(p))
        for f, p in zip(full, prompt_ids, strict=True)
    ]
    return examples, sum(not e.has_completion for e in examples)


def tokenize_chats(
    conversations: Sequence[Sequence[dict[str, str]]], tokenizer: Any, max_length: int,
    think_tags: Sequence[str] | None = None,
) -> tuple[list[TokenizedExample], int]:  # fmt: skip
    """Tokenize conversations with the tokenizer's chat template (:func:`plwlab.data.chat.tokenize_conversation`),
    truncated on the right to ``max_length``. Returns the examples and how many lost every assistant token."""
    tags = tuple(think_tags) if think_tags else None
    examples = []
    for i, messages in enumerate(track(conversations, description="tokenizing conversations", transient=True,
                                       disable=len(conversations) < 2000)):  # fmt: skip
        chat = tokenize_conversation(tokenizer, messages, tags, name=f"conversation {i}")
        examples.append(TokenizedExample(chat.input_ids[:max_length], chat.segment_ids[:max_length]))
    return examples, sum(not e.has_completion for e in examples)


def cache_key(records: Sequence[Any], tokenizer: Any, *extra: Any) -> str:
    """Key of a cache entry: the records' content, the tokenizer's fingerprint and whatever else it depends on."""
    text = json.dumps([records, *extra], ensure_ascii=False)
    return hashlib.sha256(f"{text}|{tokenizer_fingerprint(tokenizer)}".encode()).hexdigest()[:16]


def cached_tokenize(
    records: Sequence[dict[str, str]], tokenizer: Any, max_length: int, cache_dir: str | Path | None,
    format: str = "alpaca",  # noqa: A002
) -> tuple[list[TokenizedExample], int]:  # fmt: skip
    """:func:`tokenize_examples`, cached in ``cache_dir`` under a key of the records' content, the tokenizer's
    vocabulary, the prompt template and ``max_length``: every run of a sweep after the first loads it."""
    key = [ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, max_length] + (["none"] if format == "prompt_completion" else [])
    return _cached(records, tokenizer, key, cache_dir, partial(tokenize_examples, records, tokenizer, max_length, format))


def cached_tokenize_chats(
    conversations: Sequence[Sequence[dict[str, str]]], tokenizer: Any, max_length: int, cache_dir: str | Path | None,
    think_tags: Sequence[str] | None = None,
) -> tuple[list[TokenizedExample], int]:  # fmt: skip
    """:func:`tokenize_chats`, cached like :func:`cached_tokenize` (the chat template and think tags in the key)."""
    key = ["chat", tokenizer.chat_template, list(think_tags or []), max_length]
    build = partial(tokenize_chats, conversations, tokenizer, max_length, think_tags)
    return _cached(conversations, tokenizer, key, cache_dir, build)


def cached_tokenize_source(
    examples: Sequence[Any], tokenizer: Any, format: str, max_length: int, cache_dir: str | Path | None,  # noqa: A002
    think_tags: Sequence[str] | None = None,
) -> tuple[list[TokenizedExample], int]:  # fmt: skip
    """The examples of a data ``format`` (:data:`plwlab.data.sources.FORMATS`) tokenized and cached: conversations
    through the chat template (:func:`cached_tokenize_chats`), records in their prompt template (:func:`cached_tokenize`)."""
    if format in CHAT_FORMATS:
        return cached_tokenize_chats(examples, tokenizer, max_length, cache_dir, think_tags)
    return cached_tokenize(examples, tokenizer, max_length, cache_dir, format)


def _cached(
    records: Sequence[Any], tokenizer: Any, key: list[Any], cache_dir: str | Path | None,
    build: Callable[[], tuple[list[TokenizedExample], int]],
) -> tuple[list[TokenizedExample], int]:  # fmt: skip
    if cache_dir is None:
        return build()
    # "segments": the file layout (a segment id per token), so a cache of an older layout is never read
    path = Path(cache_dir) / f"tokenized-{cache_key(records, tokenizer, 'segments', *key)}.npz"
    if path.exists():
        try:
            with np.load(path) as data:
                ids, segments, lengths = data["ids"].tolist(), data["segments"].tolist(), data["lengths"]
            if len(ids) != len(segments) or len(ids) != int(np.sum(lengths)):
                raise ValueError("its arrays disagree in length")
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:  # truncated, or not ours
            log.warning("tokenized-data cache %s is unreadable (%s: %s); rebuilding it", path, type(e).__name__, e)
        else:
            bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
            examples = [TokenizedExample(ids[a:b], segments[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
            log.info("loaded tokenized data from %s", path)
            return examples, sum(not e.has_completion for e in examples)
    examples, n_empty = build()
    with atomic_write(path) as tmp, tmp.open("wb") as f:  # concurrent runs of a sweep never read half a cache
        np.savez(
            f,
            ids=np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int32),
            segments=np.fromiter((s for e in examples for s in e.segment_ids), dtype=np.int8),
            lengths=np.array([len(e.input_ids) for e in examples], dtype=np.int32),
        )
    return examples, n_empty
