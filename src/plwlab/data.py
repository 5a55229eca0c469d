"""Alpaca-format data: tokenize once into ``input_ids`` + a prompt length (the 0/1 completion mask), cache,
batch (padded, length-grouped or packed) and collate.

The prompt loss weight is *not* stored here: it is applied only in :func:`plwlab.loss.prompt_weighted_loss`,
so a PLW sweep reuses the same tokenized data (and the same cache file).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from plwlab.alpaca import (
    ALPACA_PROMPT_INPUT,
    ALPACA_PROMPT_NO_INPUT,
    DataError,
    alpaca_prompt,
    build_variant,
    load_records,
    token_lengths,
    tokenizer_fingerprint,
)  # fmt: skip
from plwlab.files import atomic_write

log = logging.getLogger(__name__)
BATCHING = ("padded", "length_grouped", "packed")


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


def _newline_safe_backend(tokenizer: Any) -> tuple[Any, Any, int] | None:
    """For a Metaspace-BPE fast tokenizer (LLaMA's) in which no vocabulary piece contains a newline, BPE never
    merges across ``\n``: a text's tokens are exactly its ``\n``-separated segments' tokens joined by the
    newline token. Returns (backend for first segments, backend for later segments, newline id), else None."""
    backend = getattr(tokenizer, "_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if backend is None or type(pre).__name__ != "Metaspace" or backend.normalizer is not None:
        return None
    vocab = tokenizer.get_vocab()
    newline = vocab.get("<0x0A>")
    if newline is None or "\n" in vocab or any("\n" in piece for piece in vocab):
        return None
    from tokenizers import pre_tokenizers

    later = copy.deepcopy(backend)
    later.pre_tokenizer = pre_tokenizers.Metaspace(replacement=pre.replacement, prepend_scheme="never", split=pre.split)
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


def cached_tokenize(
    records: Sequence[dict[str, str]], tokenizer: Any, max_length: int, cache_dir: str | Path | None
) -> tuple[list[TokenizedExample], int]:
    """:func:`tokenize_examples`, cached in ``cache_dir`` under a key of the records' content, the tokenizer's
    vocabulary, the prompt template and ``max_length``: every run of a sweep after the first loads it."""
    if cache_dir is None:
        return tokenize_examples(records, tokenizer, max_length)
    key_text = json.dumps([records, ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, max_length], ensure_ascii=False)
    key = hashlib.sha256(f"{key_text}|{tokenizer_fingerprint(tokenizer)}".encode()).hexdigest()[:16]
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


def pack_examples(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: example indices grouped into rows of at most ``max_length`` tokens.

    Deterministic (ties by index). Each example goes to the fullest row it still fits in, so rows end up nearly full.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    by_space: list[list[int]] = [[] for _ in range(max_length + 1)]  # remaining space -> row ids
    rows: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens > max_length {max_length}")
        space = next((s for s in range(n, max_length + 1) if by_space[s]), None)
        if space is None:
            rows.append([i])
            row, space = len(rows) - 1, max_length
        else:
            row = by_space[space].pop()
            rows[row].append(i)
        by_space[space - n].append(row)
    return rows


def split_indices(n: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """The seeded validation / training split of ``n`` examples: (validation indices, sorted training indices).
    ``val_size`` is a fraction (< 1) or a count."""
    n_val = int(val_size * n) if val_size < 1 else int(val_size)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[:n_val], sorted(order[n_val:])


class TokenizedDataset(Dataset):
    """Examples, or packed rows of examples (``rows``: lists of example indices)."""

    def __init__(self, examples: Sequence[TokenizedExample], rows: list[list[int]] | None = None) -> None:
        self.examples = list(examples)
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.examples)

    def __getitem__(self, i: int) -> list[TokenizedExample]:
        return [self.examples[j] for j in self.rows[i]] if self.rows is not None else [self.examples[i]]

    def n_tokens(self, i: int) -> int:
        return sum(len(e.input_ids) for e in self[i])


def collate(items: Sequence[list[TokenizedExample]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest: ``input_ids``, ``completion_mask``, ``token_mask`` (B, L).

    A row of one example also gets ``attention_mask`` (= ``token_mask``). A row of several packed examples gets
    ``position_ids`` restarting at 0 for each example and no attention mask: HF models then attend within each
    example only (block-diagonal causal mask; flash-attention varlen). ``token_mask`` is 0 on padding and on
    the first token of every packed example, so no example is trained to predict the next one's first token.
    """
    packed = any(len(row) > 1 for row in items)
    length = max(sum(len(e.input_ids) for e in row) for row in items)
    batch = {k: torch.zeros(len(items), length, dtype=torch.long) for k in ("completion_mask", "token_mask")}
    batch["input_ids"] = torch.full((len(items), length), pad_token_id, dtype=torch.long)
    if packed:
        batch["position_ids"] = torch.zeros(len(items), length, dtype=torch.long)
    for r, row in enumerate(items):
        start = 0
        for k, e in enumerate(row):
            end = start + len(e.input_ids)
            batch["input_ids"][r, start:end] = torch.tensor(e.input_ids)
            batch["completion_mask"][r, start:end] = torch.tensor(e.completion_mask)
            batch["token_mask"][r, start + (k > 0) : end] = 1
            if packed:
                batch["position_ids"][r, start:end] = torch.arange(len(e.input_ids))
            start = end
        if packed:
            batch["position_ids"][r, start:] = torch.arange(length - start)  # padding: a document of its own
    if not packed:
        batch["attention_mask"] = batch["token_mask"]
    return batch


class GlobalBatchSampler(Sampler[int]):
    """Seeded per-epoch order of a dataset, sharded over ranks so that every *global* batch (micro-batch x
    ranks) holds the same items on 1 or W processes, and every PLW of a sweep sees the same order.

    ``group_size`` > 0 (length-grouped batching) sorts each chunk of ``group_size`` items of the permutation by
    length and shuffles the resulting global batches, so batches hold similar lengths (less padding).
    The order is padded by repetition to a multiple of ``global_batch`` (as ``DistributedSampler`` does).
    """

    def __init__(self, lengths: Sequence[int], micro_batch: int, world: int = 1, rank: int = 0, seed: int = 42,
                 group_size: int = 0) -> None:  # fmt: skip
        self.lengths, self.micro_batch, self.world, self.rank = np.asarray(lengths), micro_batch, world, rank
        self.seed, self.group_size, self.epoch = seed, group_size, 0
        self.global_batch = micro_batch * world
        self.total = -(-len(self.lengths) // self.global_batch) * self.global_batch
        self.resume_epoch, self.resume_batches = -1, 0  # see resume_from

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_from(self, epoch: int, batches: int) -> None:
        """Skip the first ``batches`` micro-batches of ``epoch`` (they were trained before an interruption).
        ``len()`` stays the full epoch: Lightning counts the skipped batches as done."""
        self.epoch, self.resume_epoch, self.resume_batches = epoch, epoch, batches

    def global_order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        order += order[: self.total - len(order)]
        if self.group_size:
            chunks = [order[i : i + self.group_size] for i in range(0, len(order), self.group_size)]
            order = [i for chunk in chunks for i in sorted(chunk, key=lambda j: -self.lengths[j])]
            batches = [order[i : i + self.global_batch] for i in range(0, len(order), self.global_batch)]
            order = [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]
        return order

    def __iter__(self) -> Iterator[int]:
        # a generator: the epoch and the resume position are read when the first index is drawn, not when
        # iteration is set up (Lightning may set it up before it restores a checkpoint)
        mine = self.global_order()[self.rank :: self.world]
        if self.epoch == self.resume_epoch:
            mine = mine[self.resume_batches * self.micro_batch :]
        yield from mine

    def __len__(self) -> int:
        return self.total // self.world


class ResumableDataLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch. Lightning keeps :meth:`state_dict` (the epoch and the
    micro-batches of it already trained, read from the fit loop by ``progress``) in every checkpoint and hands it
    back through :meth:`load_state_dict` when it resumes; the :class:`GlobalBatchSampler` then skips what was
    trained, so a resumed run sees exactly the batches the uninterrupted run would have."""

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.progress()
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.resume_from(state_dict["epoch"], state_dict["batches"])


def padding_share(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of padding among the tokens processed when each batch (lists of item indices) is padded to its
    longest item."""
    lengths = np.asarray(lengths)
    processed = sum(len(b) * lengths[list(b)].max() for b in batches)
    return float(1 - lengths.sum() / processed) if processed else 0.0


class AlpacaDataModule(L.LightningDataModule):
    """Alpaca-format instruction data from a local file or an HF hub dataset id, optionally turned into a
    variant first (``variant="short"`` or ``"rg_target"`` with ``target_rg``; see :mod:`plwlab.alpaca`).
    Built variants and tokenized data are cached in ``cache_dir`` (with a manifest; kept in :attr:`manifest`).

    ``batching``: ``padded`` (random batches padded to their longest example), ``length_grouped`` (batches of
    similar lengths: less padding, same examples per epoch) or ``packed`` (several examples per row of up to
    ``max_length`` tokens, attending within themselves only; ``batch_size`` then counts rows).
    ``val_size`` is a fraction (< 1) or a count of examples held out (seeded, so identical across a sweep).
    ``empty_completion`` says what to do with examples whose completion was truncated away entirely:
    ``keep`` them (Stanford Alpaca behaviour; they still carry prompt loss), ``drop`` them, or ``error``.
    Either way their number is logged and kept in :attr:`stats`.
    """

    def __init__(
        self,
        tokenizer: Any,
        path: str,
        name: str = "alpaca",
        max_length: int = 512,
        val_size: float = 0.05,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        batching: Literal["padded", "length_grouped", "packed"] = "padded",
        num_workers: int = 0,
        limit: int | None = None,
        empty_completion: Literal["keep", "drop", "error"] = "keep",
        on_invalid: Literal["error", "skip"] = "error",
        variant: str = "as_is",
        target_rg: float | None = None,
        cache_dir: str | None = "outputs/data",
        seed: int = 42,
    ) -> None:
        super().__init__()
        if empty_completion not in ("keep", "drop", "error"):
            raise ValueError(f"empty_completion must be keep, drop or error, got {empty_completion!r}")
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.tokenizer, self.path, self.name = tokenizer, path, name
        self.max_length, self.val_size, self.limit, self.seed = max_length, val_size, limit, seed
        self.batch_size, self.eval_batch_size, self.batching = batch_size, eval_batch_size or batch_size, batching
        self.num_workers, self.empty_completion, self.on_invalid = num_workers, empty_completion, on_invalid
        self.variant, self.target_rg, self.cache_dir = variant, target_rg, cache_dir
        self.manifest: dict[str, Any] | None = None
        self.train_set: TokenizedDataset | None = None
        self.val_set: TokenizedDataset | None = None
        self.stats: dict[str, float] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        path = self.path
        if self.variant != "as_is":
            built, self.manifest = build_variant(
                self.path, self.variant, self.tokenizer, self.cache_dir or "outputs/data", self.target_rg,
                on_invalid=self.on_invalid,
            )  # fmt: skip
            path = str(built)
        records = load_records(path, on_invalid=self.on_invalid)
        if self.limit:
            records = records[: self.limit]
        examples, n_empty = cached_tokenize(records, self.tokenizer, self.max_length, self.cache_dir)
        if n_empty:
            msg = (
                f"{n_empty} of {len(examples)} examples lost every completion token to truncation at "
                f"max_length={self.max_length} (empty_completion={self.empty_completion})"
            )
            if self.empty_completion == "error":
                raise DataError(msg)
            log.warning(msg)
            if self.empty_completion == "drop":
                examples = [e for e in examples if e.has_completion]
        val_idx, train_idx = split_indices(len(examples), self.val_size, self.seed)
        self.val_set = TokenizedDataset(sorted((examples[i] for i in val_idx), key=lambda e: len(e.input_ids)))
        train = [examples[i] for i in train_idx]
        if not train:
            raise DataError(f"{self.path}: no training examples left (n={len(examples)}, val_size={self.val_size})")
        rows = pack_examples([len(e.input_ids) for e in train], self.max_length) if self.batching == "packed" else None
        self.train_set = TokenizedDataset(train, rows)
        n_completion = sum(len(e.input_ids) - min(e.n_prompt, len(e.input_ids)) for e in examples)
        n_prompt = sum(len(e.input_ids) for e in examples) - n_completion
        self.stats = {
            "n_train": len(train),
            "n_train_rows": len(self.train_set),
            "n_val": len(self.val_set),
            "n_empty_completion": n_empty,
            "rg": token_lengths(records, self.tokenizer).rg,  # the paper's Rg: output / (instruction + input)
            "rg_templated": n_completion / max(n_prompt, 1),  # what the loss sees: template, bos/eos, truncation
        }
        log.info("data %s: %s", self.name, self.stats)

    def _loader(self, dataset: TokenizedDataset, batch_size: int, sampler: Any, **kwargs: Any) -> DataLoader:
        return (ResumableDataLoader if "progress" in kwargs else DataLoader)(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=partial(collate, pad_token_id=self.tokenizer.pad_token_id),
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_sampler(self, world: int = 1, rank: int = 0) -> GlobalBatchSampler:
        lengths = [self.train_set.n_tokens(i) for i in range(len(self.train_set))]
        group = 50 * self.batch_size * world if self.batching == "length_grouped" else 0
        return GlobalBatchSampler(lengths, self.batch_size, world, rank, self.seed, group_size=group)

    def batches_per_epoch(self, world: int) -> int:
        """Micro-batches each of ``world`` ranks draws per epoch (the last global batch is filled by repetition)."""
        return -(-len(self.train_set) // (self.batch_size * world))

    def _progress(self) -> tuple[int, int]:
        loop = self.trainer.fit_loop
        return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, self.train_sampler(*self._world()), progress=self._progress)

    def val_dataloader(self) -> DataLoader:
        world, rank = self._world()
        return self._loader(self.val_set, self.eval_batch_size, list(range(rank, len(self.val_set), world)))
