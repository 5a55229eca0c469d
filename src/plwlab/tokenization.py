"""Alpaca records -> token ids: ``input_ids`` plus the prompt length (the 0/1 completion mask), tokenized as Stanford
Alpaca does but batched, and cached on disk so that every run of a sweep after the first loads it.

The prompt loss weight is *not* stored here: it is applied only in :func:`plwlab.loss.prompt_weighted_loss`,
so a PLW sweep reuses the same tokenized data (and the same cache file).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from plwlab.alpaca import (
    ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, alpaca_prompt, token_lengths, tokenizer_fingerprint,
)  # fmt: skip
from plwlab.files import atomic_write

log = logging.getLogger(__name__)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    n_prompt: int  # the first n_prompt tokens are prompt, the rest completion

    @property
    def completion_mask(self) -> list[int]:
        n = min(self.n_prompt, len(self.input_ids))
        return [0] * n + [1] * (len(self.input_ids) - n)

    @property
    def has_completion(self) -> bool:
        return self.n_prompt < len(self.input_ids)


def sentencepiece_normalizer() -> Any:
    """SentencePiece's dummy prefix and space marker as a ``tokenizers`` normalizer (the legacy LLaMA
    ``tokenizer.json``'s): "▁" prepended to every text, every space turned into "▁"."""
    from tokenizers import normalizers

    return normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])


def _newline_safe_backend(tokenizer: Any) -> tuple[Any, Any, int] | None:
    """For a SentencePiece-style BPE fast tokenizer (LLaMA's) in which no vocabulary piece contains a newline, BPE
    never merges across ``\n``: a text's tokens are exactly its ``\n``-separated segments' tokens joined by the
    newline token, where only the first segment gets the "▁" prefix. Two layouts qualify: a Metaspace
    pre-tokenizer (transformers 5's LLaMA) and the Prepend + Replace normalizer of SentencePiece itself
    (:func:`plwlab.model.sentencepiece_tokenizer`). Returns (backend for first segments, backend for later
    segments, newline id), else None."""
    from tokenizers import normalizers, pre_tokenizers

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


def tokenize_examples(
    records: Sequence[dict[str, str]], tokenizer: Any, max_length: int
) -> tuple[list[TokenizedExample], int]:
    """Tokenize Alpaca records as Stanford Alpaca does, but batched (:func:`batch_token_ids`).

    ``input_ids = [bos] + tok(prompt + output) + [eos]`` truncated on the right to ``max_length``; the first
    ``1 + len(tok(prompt))`` tokens are prompt (mask 0), the rest completion (mask 1).
    Returns the examples and how many of them lost *every* completion token to truncation.
    """
    prompts = [alpaca_prompt(r["instruction"], r["input"]) for r in records]
    ids = batch_token_ids(tokenizer, prompts + [p + r["output"] for p, r in zip(prompts, records, strict=True)])
    prompt_ids, full = ids[: len(prompts)], ids[len(prompts) :]
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    examples = [
        TokenizedExample((bos + f + [tokenizer.eos_token_id])[:max_length], len(bos) + len(p))
        for f, p in zip(full, prompt_ids, strict=True)
    ]
    return examples, sum(not e.has_completion for e in examples)


def _cache_key(records: Sequence[dict[str, str]], tokenizer: Any, *extra: Any) -> str:
    """Key of a cache entry: the records' content, the tokenizer's vocabulary and whatever else it depends on."""
    text = json.dumps([records, *extra], ensure_ascii=False)
    return hashlib.sha256(f"{text}|{tokenizer_fingerprint(tokenizer)}".encode()).hexdigest()[:16]


def cached_rg(records: Sequence[dict[str, str]], tokenizer: Any, cache_dir: str | Path | None) -> float:
    """The paper's Rg of ``records`` (fields tokenized alone, :func:`plwlab.alpaca.token_lengths`), cached in
    ``cache_dir`` beside the tokenized data: runs 2..N of a sweep do not tokenize the dataset again for it."""
    if cache_dir is None:
        return token_lengths(records, tokenizer).rg
    path = Path(cache_dir) / f"rg-{_cache_key(records, tokenizer)}.json"
    if path.exists():
        return json.loads(path.read_text())["rg"]
    rg = token_lengths(records, tokenizer).rg
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps({"rg": rg}) + "\n")
    return rg


def cached_tokenize(
    records: Sequence[dict[str, str]], tokenizer: Any, max_length: int, cache_dir: str | Path | None
) -> tuple[list[TokenizedExample], int]:
    """:func:`tokenize_examples`, cached in ``cache_dir`` under a key of the records' content, the tokenizer's
    vocabulary, the prompt template and ``max_length``: every run of a sweep after the first loads it."""
    if cache_dir is None:
        return tokenize_examples(records, tokenizer, max_length)
    key = _cache_key(records, tokenizer, ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, max_length)
    path = Path(cache_dir) / f"tokenized-{key}.npz"
    if path.exists():
        data = np.load(path)
        ids, lengths, n_prompt = data["ids"].tolist(), data["lengths"], data["n_prompt"]
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        examples = [TokenizedExample(ids[a:b], int(p)) for a, b, p in zip(bounds[:-1], bounds[1:], n_prompt)]
        log.info("loaded tokenized data from %s", path)
        return examples, sum(not e.has_completion for e in examples)
    examples, n_empty = tokenize_examples(records, tokenizer, max_length)
    with atomic_write(path) as tmp, tmp.open("wb") as f:  # concurrent runs of a sweep never read half a cache
        np.savez(
            f,
            ids=np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int32),
            lengths=np.array([len(e.input_ids) for e in examples], dtype=np.int32),
            n_prompt=np.array([e.n_prompt for e in examples], dtype=np.int32),
        )
    return examples, n_empty
