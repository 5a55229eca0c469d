"""Alpaca-format data: load, template, tokenize once into ``input_ids`` + a 0/1 completion mask, collate.

The prompt loss weight is *not* stored here: it is applied only in :func:`plwlab.loss.prompt_weighted_loss`,
so a PLW sweep reuses the same tokenized data.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)

# Stanford Alpaca templates (tatsu-lab/stanford_alpaca train.py). The completion follows "### Response:" directly.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
FIELDS = ("instruction", "input", "output")


class DataError(ValueError):
    """Malformed instruction data; the message names the offending record."""


def alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - Alpaca's field name
    """The Stanford Alpaca prompt for one example (the no-input template when ``input`` is empty)."""
    template = ALPACA_PROMPT_INPUT if input else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=input)


def load_records(path: str, split: str = "train") -> list[dict[str, str]]:
    """Alpaca-format records from a local ``.json`` (a list) / ``.jsonl`` file or, failing that, an HF hub id.

    Every record must have string ``instruction`` and ``output`` fields; ``input`` may be missing (= "").
    """
    local = Path(path).expanduser()
    if local.is_file():
        text = local.read_text(encoding="utf-8")
        try:
            if local.suffix == ".jsonl":
                raw = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{local}: invalid JSON ({e})") from e
        if not isinstance(raw, list):
            raise DataError(f"{local}: expected a JSON list of records, got {type(raw).__name__}")
    elif local.exists() or path.startswith((".", "/", "~")) or path.endswith((".json", ".jsonl")):
        raise DataError(f"data file not found: {path}")
    else:
        import datasets

        try:
            raw = list(datasets.load_dataset(path, split=split))
        except Exception as e:  # hub unreachable, unknown id, ...
            raise DataError(f"cannot load dataset {path!r} (not a local file; hub load failed: {e})") from e
    return [_check_record(r, i, path) for i, r in enumerate(raw)]


def _check_record(record: Any, index: int, source: str) -> dict[str, str]:
    if not isinstance(record, dict):
        raise DataError(f"{source}: record {index} is a {type(record).__name__}, not an object")
    out = {}
    for field in FIELDS:
        value = record.get(field, "" if field == "input" else None)
        if value is None:
            raise DataError(f"{source}: record {index} has no {field!r} field")
        if not isinstance(value, str):
            raise DataError(f"{source}: record {index} field {field!r} is {type(value).__name__}, not a string")
        out[field] = value
    return out


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
    """Alpaca-format instruction data from a local file or an HF hub dataset id.

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
        self.num_workers, self.empty_completion = num_workers, empty_completion
        self.train_set: TokenizedDataset | None = None
        self.val_set: TokenizedDataset | None = None
        self.stats: dict[str, float] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        records = load_records(self.path)
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
            "rg": n_completion / max(n_prompt, 1),
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
