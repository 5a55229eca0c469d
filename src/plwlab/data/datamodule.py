"""InstructionDataModule: instruction data (Alpaca records, prompt/completion pairs or chat conversations) from a
file or the hub, optionally as a built variant, tokenized (cached), split, batched and sharded over ranks for
Lightning."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from functools import partial
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader

from plwlab.data.batching import (
    GlobalBatchSampler, ResumableDataLoader, TokenizedDataset, collate, even_shard, item_segment_counts, pack_examples,
    split_indices,
)  # fmt: skip
from plwlab.data.examples import load_examples
from plwlab.data.rg import cached_rg, ratio
from plwlab.data.segments import SEGMENTS
from plwlab.data.sources import DataError, example_weights, weight_summary
from plwlab.data.tokenization import cached_tokenize_source, tokenizer_fingerprint

log = logging.getLogger(__name__)


class InstructionDataModule(L.LightningDataModule):
    """Instruction data from a local ``.json`` / ``.jsonl`` / ``.parquet`` file or an HF hub dataset id, in one of
    :data:`~plwlab.data.sources.FORMATS`: Alpaca records (``instruction``, ``input``, ``output``) in the Stanford Alpaca template,
    ``prompt_completion`` pairs (no template: ``[bos] prompt completion [eos]``), or chat conversations
    (``messages`` or ShareGPT ``conversations``) rendered by the tokenizer's chat template with a segment per token
    (:mod:`plwlab.data.segments`). ``columns`` maps plwlab's names to the dataset's (e.g. ``{output: response}``,
    ``{messages: dialog, role: speaker, content: text}``), ``roles`` the dataset's role names to
    system/user/assistant, ``think_tags`` the two strings around a reasoning span in assistant turns.

    A variant is built first with ``variant="short"`` or ``"rg_target"`` (``target_rg``; see :mod:`plwlab.data.variants`;
    chat data: single-turn conversations only). Built variants and tokenized data are cached in ``cache_dir``
    (with a manifest; kept in :attr:`manifest`).

    ``batching``: ``length_grouped`` (the default: seeded random chunks sorted by length into batches, then the
    batches shuffled; little padding, the same examples per epoch), ``padded`` (random batches padded to their
    longest example, as the paper's HF Trainer did: ``experiment=paper``) or ``packed`` (several examples per row
    of up to ``max_length`` tokens, attending within themselves only; ``batch_size`` then counts rows).
    ``global_batch_size`` (train.py's, sequences per optimizer step; default ``batch_size`` x devices) is the unit
    length grouping shuffles, so a step holds the same examples whatever the accumulation.
    ``val_size`` is a fraction (< 1) or a count of examples held out (seeded, so identical across a sweep).
    ``empty_completion`` says what to do with examples whose completion was truncated away entirely:
    ``keep`` them (Stanford Alpaca behaviour; they still carry prompt loss), ``drop`` them, or ``error``.
    Either way their number is logged and kept in :attr:`stats`. ``duplicates``: examples that repeat an earlier
    one exactly are counted (``stats['n_duplicates']``, a warning) and either ``keep`` (trained on as often as they
    occur, as Stanford Alpaca did) or ``drop`` (once); twins always fall on the same side of the validation split.
    """

    def __init__(
        self,
        tokenizer: Any,
        path: str,
        name: str = "alpaca",
        format: Literal["alpaca", "prompt_completion", "messages", "sharegpt"] = "alpaca",  # noqa: A002
        split: str = "train",
        columns: dict[str, str] | None = None,
        roles: dict[str, str] | None = None,
        think_tags: list[str] | None = None,
        max_length: int = 512,
        val_size: float = 0.05,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        batching: Literal["padded", "length_grouped", "packed"] = "length_grouped",
        num_workers: int = 0,
        limit: int | None = None,
        empty_completion: Literal["keep", "drop", "error"] = "keep",
        on_invalid: Literal["error", "skip"] = "error",
        empty_output: Literal["keep", "skip"] = "keep",
        duplicates: Literal["keep", "drop"] = "keep",
        variant: str = "as_is",
        target_rg: float | None = None,
        cache_dir: str | None = "outputs/data",
        weight_column: str | None = None,
        seed: int = 42,
        global_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer, self.path, self.name, self.format, self.split = tokenizer, path, name, format, split
        self.columns, self.roles, self.think_tags = columns, roles, think_tags
        self.max_length, self.val_size, self.limit, self.seed = max_length, val_size, limit, seed
        self.batch_size, self.eval_batch_size, self.batching = batch_size, eval_batch_size or batch_size, batching
        self.num_workers, self.empty_completion, self.on_invalid = num_workers, empty_completion, on_invalid
        self.variant, self.target_rg, self.cache_dir = variant, target_rg, cache_dir
        self.empty_output, self.duplicates, self.weight_column = empty_output, duplicates, weight_column
        self.global_batch_size = global_batch_size  # sequences per optimizer step: the unit length grouping keeps
        self.manifest: dict[str, Any] | None = None
        self.train_examples: list[Any] = []  # the source examples of the training split (records or conversations)
        self.train_set: TokenizedDataset | None = None
        self.val_set: TokenizedDataset | None = None
        self.stats: dict[str, float] = {}
        self._order: tuple[Any, list[int]] = (None, [])  # (epoch, world) -> the sampler's order (step_counts)
        self._item_counts: list[list[float]] | None = None  # each train item's segment counts (step_counts)

    def load(self) -> tuple[list[Any], str]:
        """The examples this data module trains on and the path they were read from (:func:`load_examples`)."""
        examples, path, self.manifest = load_examples(
            self.path, self.tokenizer, self.format, self.split, self.columns, self.roles, self.on_invalid,
            self.empty_output, self.variant, self.target_rg, self.cache_dir, self.limit,
        )  # fmt: skip
        return examples, path

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        sources, path = self.load()
        examples, n_empty = cached_tokenize_source(sources, self.tokenizer, self.format, self.max_length,
                                                   self.cache_dir, self.think_tags)  # fmt: skip
        rg = cached_rg(sources, self.tokenizer, self.format, self.cache_dir)
        weights = None
        if self.weight_column:  # every row became an example (validate_train): the weights line up with them
            weights = example_weights(self.path, self.split, self.weight_column)[: len(examples)]
            examples = [replace(e, weight=w) for e, w in zip(examples, weights, strict=True)]
        identity = sources if weights is None else [sources, weights]  # unweighted data: digests as before
        data_sha256 = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        if n_empty:
            msg = (
                f"{n_empty} of {len(examples)} examples lost every completion token to truncation at "
                f"max_length={self.max_length} (empty_completion={self.empty_completion})"
            )
            if self.empty_completion == "error":
                raise DataError(msg)
            log.warning(msg)
            if self.empty_completion == "drop":
                sources = [s for s, e in zip(sources, examples, strict=True) if e.has_completion]
                examples = [e for e in examples if e.has_completion]
        keys = [json.dumps(s if weights is None else [s, e.weight], sort_keys=True) for s, e in zip(sources, examples)]
        n_duplicates = len(keys) - len(set(keys))
        if n_duplicates:
            log.warning("%d of %d examples repeat an earlier one: %s (data.duplicates=%s); twins never straddle "
                        "train and validation", n_duplicates, len(keys),
                        "kept for training" if self.duplicates == "keep" else "dropped", self.duplicates)  # fmt: skip
            if self.duplicates == "drop":
                first: dict[str, int] = {}
                for i, key in enumerate(keys):
                    first.setdefault(key, i)
                kept = sorted(first.values())
                sources, examples, keys = [sources[i] for i in kept], [examples[i] for i in kept], [keys[i] for i in kept]
        val_idx, train_idx = split_indices(keys, self.val_size, self.seed)
        self.val_set = TokenizedDataset(sorted((examples[i] for i in val_idx), key=lambda e: len(e.input_ids)),
                                        padding_id=self.tokenizer.pad_token_id)  # fmt: skip
        self.train_examples = [sources[i] for i in train_idx]
        train = [examples[i] for i in train_idx]
        if not train:
            raise DataError(f"{self.path}: no training examples left (n={len(examples)}, val_size={self.val_size})")
        rows = pack_examples([len(e.input_ids) for e in train], self.max_length) if self.batching == "packed" else None
        self.train_set = TokenizedDataset(train, rows)
        n_completion = sum(e.n_completion for e in examples)
        n_prompt = sum(len(e.input_ids) for e in examples) - n_completion
        self.stats = {
            "n_train": len(train),
            "n_train_rows": len(self.train_set),
            "n_val": len(self.val_set),
            "n_empty_completion": n_empty,
            "n_duplicates": n_duplicates,  # examples repeating an earlier one in the file (before data.duplicates)
            "rg": rg,  # the paper's Rg: output / (instruction + input); chat: assistant / (system + user) contents
            "rg_templated": ratio(n_completion, n_prompt),  # what the loss sees: template, bos/eos, truncation
            "data_format": self.format,  # evaluation prompts a chat-trained model through its chat template
            "data_path": path,  # what this run really read (a built variant's file for a variant)
            "data_sha256": data_sha256,
            "tokenizer_sha256": tokenizer_fingerprint(self.tokenizer),
            **({"example_weights": weight_summary(self.weight_column, [e.weight for e in train])} if weights else {}),
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

    def _step_batch(self, world: int) -> int:
        """Sequences (rows) per optimizer step: ``global_batch_size``, or one micro-batch on every rank."""
        return self.global_batch_size or self.batch_size * world

    def train_sampler(self, world: int = 1, rank: int = 0) -> GlobalBatchSampler:
        lengths = [self.train_set.n_tokens(i) for i in range(len(self.train_set))]
        step = self._step_batch(world)
        group = 50 * step if self.batching == "length_grouped" else 0
        return GlobalBatchSampler(lengths, self.batch_size, world, rank, self.seed, group_size=group, step_batch=step)

    def step_counts(self, epoch: int, step: int, world: int = 1) -> list[float]:
        """The (example-)weighted target count of each segment (:data:`plwlab.data.segments.SEGMENTS`) over the
        sequences of optimizer step ``step`` of ``epoch``, on all ``world`` ranks together: what the "share"
        normalization divides each segment by, known before the step's first micro-batch (the sampler's order is
        seeded, and a step holds the same sequences whatever the micro-batch, accumulation and world size)."""
        if self._order[0] != (epoch, world):
            sampler = self.train_sampler(world, 0)
            sampler.set_epoch(epoch)
            self._order = ((epoch, world), sampler.global_order())
        if self._item_counts is None:
            self._item_counts = [item_segment_counts(self.train_set[i]) for i in range(len(self.train_set))]
        size = self._step_batch(world)
        items = self._order[1][step * size : (step + 1) * size]
        return [sum(self._item_counts[i][s] for i in items) for s in range(len(SEGMENTS))]

    def batches_per_epoch(self, world: int) -> int:
        """Micro-batches each of ``world`` ranks draws per epoch (the last optimizer step is filled by repetition)."""
        step = self._step_batch(world)
        return -(-len(self.train_set) // step) * step // (self.batch_size * world)

    def _progress(self) -> tuple[int, int]:
        loop = self.trainer.fit_loop
        return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        return self._loader(
            self.train_set, self.batch_size, self.train_sampler(*self._world()), progress=self._progress
        )

    def val_dataloader(self) -> DataLoader:
        world, rank = self._world()  # every rank the same number of batches (even_shard): no rank waits alone
        return self._loader(self.val_set, self.eval_batch_size, even_shard(len(self.val_set), world, rank))
