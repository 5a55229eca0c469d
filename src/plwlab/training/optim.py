"""The optimizer of Stanford Alpaca's recipe: AdamW in its fastest implementation for the parameters' device, and
the cosine schedule with linear warmup (HF's ``get_cosine_schedule_with_warmup``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.optim.optimizer import _default_to_fused_or_foreach
from transformers import get_cosine_schedule_with_warmup


def adamw_impl(params: list[torch.Tensor], requested: str = "auto") -> str:
    """The AdamW implementation to use: ``requested``, or with ``auto`` the fused kernel where every parameter is
    a floating-point tensor on a device that has it (CPU and CUDA do; HF Trainer and TRL default to it too), else
    the multi-tensor ``foreach`` one where supported, else the per-parameter loop (PyTorch's own CPU default,
    about 8x slower here). All three compute the same update up to float rounding."""
    if requested != "auto":
        return requested
    fused, _ = _default_to_fused_or_foreach(params, differentiable=False, use_fused=True)
    if fused:
        return "fused"
    _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    return "foreach" if foreach else "for_loop"


def adamw(params: list[torch.Tensor], lr: float, betas: Sequence[float], eps: float, weight_decay: float,
          impl: str) -> torch.optim.AdamW:  # fmt: skip
    """AdamW over ``params`` in implementation ``impl`` (one of :data:`plwlab.config.OPTIMIZER_IMPLS` but ``auto``)."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             fused=impl == "fused", foreach=impl == "foreach")  # fmt: skip


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_ratio: float, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over the first ``ceil(warmup_ratio x total_steps)`` steps, then cosine decay to 0."""
    warmup = math.ceil(warmup_ratio * total_steps)
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
