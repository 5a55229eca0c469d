"""Batched greedy generation and continuation scoring with an HF causal LM (evaluated models and judges)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from rich.progress import Progress


def encode(tokenizer: Any, texts: Sequence[str], add_bos: bool) -> list[list[int]]:
    """Each text's token ids as training tokenized it: ``[bos] + tok(text)`` (no BOS with ``add_bos=False``, for
    texts that hold it already, e.g. from a chat template)."""
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    return [bos + ids for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def pad_id(tokenizer: Any) -> int:
    """The id generation pads with: the tokenizer's pad token, else EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: Sequence[str] | Sequence[list[int]], max_new_tokens: int = 256,
    batch_size: int = 8, progress: bool = True, add_bos: bool = True, description: str = "generating",
    stop_ids: Sequence[int] | None = None, **decoding: Any,
) -> list[list[int]]:  # fmt: skip
    """Greedy completions (token ids, without the prompt, cut at EOS or at any of ``stop_ids``, e.g. a chat
    template's end-of-turn token) for ``prompts``, in their order; ``decoding`` goes to ``model.generate`` (e.g.
    PandaLM's ``num_beams=4, repetition_penalty=1.2``).

    Prompts (texts, or token ids already encoded) are tokenized by :func:`encode`, sorted by length so each batch
    pads little, and left-padded so every row ends at its prompt's last token.
    """
    encoded = [list(p) for p in prompts] if prompts and not isinstance(prompts[0], str) else encode(tokenizer, prompts, add_bos)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad = pad_id(tokenizer)
    stops = list(stop_ids or [tokenizer.eos_token_id])
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in encoded]
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(description, total=len(encoded))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in idx], device=device)
            mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in idx], device=device)
            generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=pad, eos_token_id=stops, **decoding)  # fmt: skip
            for row, i in enumerate(idx):
                tokens = generated[row, width:].tolist()
                out[i] = tokens[: next((k for k, t in enumerate(tokens) if t in stops), len(tokens))]
            bar.advance(task, len(idx))
    return out


MAX_AUTO_BATCH = 256  # on 2 CPU cores, batch 128 still beat 64 (docs/benchmarks.md); memory decides below this


def auto_batch_size(model: Any, lengths: Sequence[int], max_new_tokens: int) -> int:
    """The generation batch chosen from the prompts and the memory: as many sequences as the KV cache of the
    longest prompt plus ``max_new_tokens`` (and a row of logits each) fits in a quarter of the free memory of the
    model's device, at most :data:`MAX_AUTO_BATCH` and at most the number of prompts."""
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    param = next(model.parameters())
    per_token = 2 * cfg.num_hidden_layers * kv_heads * head_dim * param.element_size()
    per_sequence = per_token * (max(lengths, default=1) + max_new_tokens) + 2 * cfg.vocab_size * 4
    if param.device.type == "cuda":
        free = torch.cuda.mem_get_info(param.device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1, min(len(lengths), MAX_AUTO_BATCH, int(free // 4 // per_sequence)))


@torch.no_grad()
def continuation_logprobs(model: Any, tokenizer: Any, prompt: str, continuations: Sequence[str], add_bos: bool = True) -> list[float]:
    """Total log-probability of each of ``continuations`` right after ``prompt`` (one right-padded batch)."""
    context = encode(tokenizer, [prompt], add_bos)[0]
    tails = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    rows = [context + t for t in tails]
    width = max(map(len, rows))
    device = next(model.parameters()).device
    ids = torch.tensor([r + [pad_id(tokenizer)] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    logprobs = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)
    scores = []
    for row, tail in enumerate(tails):
        positions = torch.arange(len(context) - 1, len(context) - 1 + len(tail), device=device)
        scores.append(float(logprobs[row, positions, torch.tensor(tail, device=device)].sum()))
    return scores
