"""Alpaca-format data: load, template, tokenize once into ``input_ids`` + a 0/1 completion mask, collate.

The prompt loss weight is *not* stored here: it is applied only in :func:`plwlab.loss.prompt_weighted_loss`,
so a PLW sweep reuses the same tokenized data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from plwlab.alpaca import DataError, alpaca_prompt, build_variant, load_records, token_lengths

log = logging.getLogger(__name__)

@dataclass
class TokenizedExample:
    input_ids: list[int]
    completion_mask: list[int]


def tokenize_examples(
    records: Sequence[dict[str, str]], tokenizer: Any, max_length: int
) -> tuple[list[TokenizedExample], int]:
    """Tokenize Alpaca records as Stanford Alpaca does, with one batched call per text kind.

    ``input_ids = [bos] + tok(prompt + output) + [eos]`` truncated on the right to ``max_length``; the first
    ``1 + len(tok(prompt))`` tokens are prompt (mask 0), the rest completion (mask 1).
    Returns the examples and how many of them lost *every* completion token to truncation.
    """
    prompts = [alpaca_prompt(r["instruction"], r["input"]) for r in records]
    full = tokenizer([p + r["output"] for p, r in zip(prompts, records, strict=True)], add_special_tokens=False)
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    examples, n_empty = [], 0
    for ids, p_ids in zip(full["input_ids"], prompt_ids, strict=True):
        n_prompt = len(bos) + len(p_ids)
        ids = (bos + ids + [tokenizer.eos_token_id])[:max_length]
        mask = [0] * min(n_prompt, len(ids)) + [1] * max(len(ids) - n_prompt, 0)
        n_empty += not any(mask)
        examples.append(TokenizedExample(ids, mask))
    return examples, n_empty


def dataset_stats(records: Sequence[dict[str, str]], tokenizer: Any, max_length: int = 512) -> dict[str, float]:
    """Table-1 style statistics: per-field token mean/std, totals, Rg, and truncation shares at ``max_length``."""
    lengths = token_lengths(records, tokenizer, progress=True)
    examples, _ = tokenize_examples(records, tokenizer, max_length=10**9)
    full = np.array([len(e.input_ids) for e in examples])
    prompt = lengths.prompt
    stats: dict[str, float] = {"n": len(records)}
    for field in ("instruction", "input", "output"):
        values = getattr(lengths, field)
        stats[f"{field}_mean"], stats[f"{field}_std"] = float(values.mean()), float(values.std(ddof=1))
    n_prompt_templated = np.array([e.completion_mask.index(1) if 1 in e.completion_mask else len(e.input_ids) for e in examples])
    stats.update(
        prompt_mean=float(prompt.mean()),
        total_tokens=int(prompt.sum() + lengths.output.sum()),
        rg=lengths.rg,
        rg_mean_of_ratios=float(np.mean(lengths.output / np.maximum(prompt, 1))),
        truncated_share=float(np.mean(full > max_length)),
        empty_completion_share=float(np.mean(n_prompt_templated >= max_length)),
    )
    return stats


class TokenizedDataset(Dataset):
    def __init__(self, examples: Sequence[TokenizedExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> TokenizedExample:
        return self.examples[i]


def collate(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``, ``attention_mask``, ``completion_mask`` (B, L)."""
    length = max(len(e.input_ids) for e in examples)
    batch = {k: torch.zeros(len(examples), length, dtype=torch.long) for k in ("attention_mask", "completion_mask")}
    batch["input_ids"] = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        batch["input_ids"][row, :n] = torch.tensor(e.input_ids)
        batch["attention_mask"][row, :n] = 1
        batch["completion_mask"][row, :n] = torch.tensor(e.completion_mask)
    return batch


class AlpacaDataModule(L.LightningDataModule):
    """Alpaca-format instruction data from a local file or an HF hub dataset id, optionally turned into a
    variant first (``variant="short"`` or ``"rg_target"`` with ``target_rg``; see :mod:`plwlab.alpaca`), which is
    written to ``variant_dir`` with a manifest (kept in :attr:`manifest`).

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
        num_workers: int = 0,
        limit: int | None = None,
        empty_completion: Literal["keep", "drop", "error"] = "keep",
        on_invalid: Literal["error", "skip"] = "error",
        variant: str = "as_is",
        target_rg: float | None = None,
        variant_dir: str = "outputs/data",
        seed: int = 42,
    ) -> None:
        super().__init__()
        if empty_completion not in ("keep", "drop", "error"):
            raise ValueError(f"empty_completion must be keep, drop or error, got {empty_completion!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.tokenizer, self.path, self.name = tokenizer, path, name
        self.max_length, self.val_size, self.limit, self.seed = max_length, val_size, limit, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.empty_completion, self.on_invalid = num_workers, empty_completion, on_invalid
        self.variant, self.target_rg, self.variant_dir = variant, target_rg, variant_dir
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
                self.path, self.variant, self.tokenizer, self.variant_dir, self.target_rg, on_invalid=self.on_invalid
            )
            path = str(built)
        records = load_records(path, on_invalid=self.on_invalid)
        if self.limit:
            records = records[: self.limit]
        examples, n_empty = tokenize_examples(records, self.tokenizer, self.max_length)
        if n_empty:
            msg = (
                f"{n_empty} of {len(examples)} examples lost every completion token to truncation at "
                f"max_length={self.max_length} (empty_completion={self.empty_completion})"
            )
            if self.empty_completion == "error":
                raise DataError(msg)
            log.warning(msg)
            if self.empty_completion == "drop":
                examples = [e for e in examples if any(e.completion_mask)]
        n_val = int(self.val_size * len(examples)) if self.val_size < 1 else int(self.val_size)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.val_set = TokenizedDataset(sorted((examples[i] for i in order[:n_val]), key=lambda e: len(e.input_ids)))
        self.train_set = TokenizedDataset([examples[i] for i in sorted(order[n_val:])])
        if len(self.train_set) == 0:
            raise DataError(f"{self.path}: no training examples left (n={len(examples)}, val_size={self.val_size})")
        n_completion = sum(sum(e.completion_mask) for e in examples)
        n_prompt = sum(len(e.input_ids) for e in examples) - n_completion
        self.stats = {
            "n_train": len(self.train_set),
            "n_val": len(self.val_set),
            "n_empty_completion": n_empty,
            "rg": token_lengths(records, self.tokenizer).rg,  # the paper's Rg: output / (instruction + input)
            "rg_templated": n_completion / max(n_prompt, 1),  # what the loss sees: template, bos/eos, truncation
        }
        log.info("data %s: %s", self.name, self.stats)

    def _loader(self, dataset: TokenizedDataset, batch_size: int, sampler: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=partial(collate, pad_token_id=self.tokenizer.pad_token_id),
            persistent_workers=self.num_workers > 0,
        )

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        # The same seeded permutation for any world size: rank r takes every W-th example of it, so a global
        # batch (micro-batch x ranks) holds the same examples on 1 or W processes, and every PLW of a sweep
        # sees the data in the same order.
        world, rank = self._world()
        sampler = DistributedSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return self._loader(self.train_set, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        world, rank = self._world()
        return self._loader(self.val_set, self.eval_batch_size, list(range(rank, len(self.val_set), world)))
