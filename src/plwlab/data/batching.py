"""Batching of tokenized examples: the seeded train/validation split, packing several examples per row, collation
(padded or packed rows), the global-batch sampler that gives every world size the same batches, and the
mid-epoch resumable training DataLoader."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from plwlab.data.segments import PROMPT_ID, SEGMENTS
from plwlab.data.tokenization import TokenizedExample


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


def split_indices(keys: Sequence[str], val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """The seeded validation / training split of examples identified by ``keys``: (validation indices, sorted
    training indices). ``val_size`` is a fraction (< 1) or a count of examples. Examples with equal keys (duplicates)
    fall on the same side: the distinct keys are shuffled and taken whole into validation until it holds
    ``val_size`` examples; without duplicates this is a plain seeded permutation of the examples."""
    n = len(keys)
    n_val = int(val_size * n) if val_size < 1 else int(val_size)
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    members = list(groups.values())
    val: list[int] = []
    train: list[int] = []
    for g in torch.randperm(len(members), generator=torch.Generator().manual_seed(seed)).tolist():
        (val if len(val) < n_val else train).extend(members[g])
    return val, sorted(train)


PADDING = -1  # the index of an empty item: one token, so no prediction target (see even_shard)


def even_shard(n: int, world: int, rank: int) -> list[int]:
    """Items ``rank, rank + world, ...`` of ``n``, padded with :data:`PADDING` to ``ceil(n / world)``: every rank draws
    the same number of batches. Sharded models need every rank in every forward; the padding items have no targets,
    so losses and counts are those of the ``n`` items alone."""
    mine = list(range(rank, n, world))
    return mine + [PADDING] * (-(-n // world) - len(mine))


class TokenizedDataset(Dataset):
    """Examples, or packed rows of examples (``rows``: lists of example indices). Index :data:`PADDING` is an empty
    item: ``padding_id`` alone, which predicts nothing."""

    def __init__(self, examples: Sequence[TokenizedExample], rows: list[list[int]] | None = None,
                 padding_id: int = 0) -> None:  # fmt: skip
        self.examples = list(examples)
        self.rows = rows
        self.padding = TokenizedExample([padding_id], [PROMPT_ID])

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.examples)

    def __getitem__(self, i: int) -> list[TokenizedExample]:
        if i == PADDING:
            return [self.padding]
        return [self.examples[j] for j in self.rows[i]] if self.rows is not None else [self.examples[i]]

    def n_tokens(self, i: int) -> int:
        return sum(len(e.input_ids) for e in self[i])


def item_segment_counts(item: Sequence[TokenizedExample]) -> list[float]:
    """Each segment's (example-)weighted count of prediction targets in a dataset item (one example or a packed
    row): every token but the first of each example, as :func:`collate`'s ``token_mask`` marks them."""
    counts = [0.0] * len(SEGMENTS)
    for e in item:
        for s in e.segment_ids[1:]:
            counts[s] += e.weight
    return counts


def collate(items: Sequence[list[TokenizedExample]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest: ``input_ids``, ``segment_ids`` (:mod:`plwlab.data.segments`), ``token_mask`` (B, L).

    A row of one example also gets ``attention_mask`` (= ``token_mask``). Packed rows (several examples in a row)
    get ``position_ids`` restarting at 0 for each example and no attention mask, so HF models attend within each
    example only (``sdpa``: a block-diagonal causal mask built from the position ids), and ``cu_seqlens``
    (int32): the examples' boundaries over the flattened B·L tokens, the trailing padding of a row an example of
    its own, for varlen kernels (:mod:`plwlab.training.attention`, flash-attention) without a host sync.
    ``token_mask`` is 0 on padding and on the first token of every packed example, so no example is trained to
    predict the next one's first token. A batch holding an example whose ``weight`` is not 1 (``data.weight_column``)
    also gets ``example_weights`` (float64, B x L): each token's example weight.
    """
    packed = any(len(row) > 1 for row in items)
    length = max(sum(len(e.input_ids) for e in row) for row in items)
    batch = {k: torch.zeros(len(items), length, dtype=torch.long) for k in ("segment_ids", "token_mask")}
    weighted = any(e.weight != 1.0 for row in items for e in row)
    if weighted:  # data.weight_column: every token carries its example's weight
        batch["example_weights"] = torch.ones(len(items), length, dtype=torch.float64)
    batch["input_ids"] = torch.full((len(items), length), pad_token_id, dtype=torch.long)
    if packed:
        batch["position_ids"] = torch.zeros(len(items), length, dtype=torch.long)
    bounds = [0]
    for r, row in enumerate(items):
        start = 0
        for k, e in enumerate(row):
            end = start + len(e.input_ids)
            bounds.append(r * length + end)
            batch["input_ids"][r, start:end] = torch.tensor(e.input_ids)
            batch["segment_ids"][r, start:end] = torch.tensor(e.segment_ids)
            batch["token_mask"][r, start + (k > 0) : end] = 1
            if weighted:
                batch["example_weights"][r, start:end] = e.weight
            if packed:
                batch["position_ids"][r, start:end] = torch.arange(len(e.input_ids))
            start = end
        if packed and start < length:
            batch["position_ids"][r, start:] = torch.arange(length - start)  # padding: a document of its own
            bounds.append((r + 1) * length)
    if packed:
        batch["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
    else:
        batch["attention_mask"] = batch["token_mask"]
    return batch


class GlobalBatchSampler(Sampler[int]):
    """Seeded per-epoch order of a dataset, sharded over ranks so that every *global* batch (micro-batch x
    ranks) holds the same items on 1 or W processes, and every PLW of a sweep sees the same order.

    ``group_size`` > 0 (length-grouped batching) sorts each chunk of ``group_size`` items of the permutation by
    length, cuts it into optimizer steps of ``step_batch`` items (default: one global micro-batch) and shuffles the
    whole steps (a last, partial one stays last), so batches hold similar lengths (less padding) and each
    optimizer step holds the same examples whatever the micro-batch, device count and accumulation.
    The order is padded by repetition to a multiple of ``step_batch`` (as ``DistributedSampler`` pads to the
    world size), so every rank draws the same number of micro-batches and every optimizer step is full.
    """

    def __init__(self, lengths: Sequence[int], micro_batch: int, world: int = 1, rank: int = 0, seed: int = 42,
                 group_size: int = 0, step_batch: int | None = None) -> None:  # fmt: skip
        self.lengths, self.micro_batch, self.world, self.rank = np.asarray(lengths), micro_batch, world, rank
        self.seed, self.group_size, self.epoch = seed, group_size, 0
        self.global_batch = micro_batch * world
        self.step_batch = step_batch or self.global_batch
        if self.step_batch % self.global_batch:
            raise ValueError(f"step_batch={self.step_batch} is not a multiple of micro_batch x world = {self.global_batch}")
        self.total = -(-len(self.lengths) // self.step_batch) * self.step_batch
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
            steps = [order[i : i + self.step_batch] for i in range(0, len(order), self.step_batch)]
            full = len(steps) - (len(steps[-1]) < self.step_batch)
            order = [i for s in torch.randperm(full, generator=g).tolist() for i in steps[s]]
            order += [i for s in steps[full:] for i in s]
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
