"""Attention over packed rows without a dense mask: ``attn_implementation="varlen"``.

A packed row holds several documents; each may attend only to its own earlier tokens. With ``sdpa``,
transformers builds a (B, 1, L, L) block-diagonal mask from the position ids, which rules out the flash kernel.
``varlen`` gives every layer the documents' boundaries instead (``cu_seq_lens_q``: the cumulative lengths over
the flattened B·L tokens, computed by :func:`plwlab.data.batching.collate` on the host, so no step waits on the
GPU for them) and runs torch's own varlen flash kernel (``torch.nn.attention.varlen.varlen_attn``) on CUDA in
bf16/fp16; elsewhere (CPU, fp32) it runs SDPA document by document, which is the same math. A padded or
unpacked batch (no boundaries) goes to transformers' SDPA path unchanged, with the mask SDPA would get. The
boundaries must come with packed rows (plwlab's training step passes them): packed position ids alone, as
``sdpa`` takes them, would attend across documents here.

``auto`` (the presets' default) resolves to ``varlen`` where CUDA and ``varlen_attn`` are present, else ``sdpa``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch: CPU path only
    varlen_attn = None

VARLEN = "varlen"


def resolve_attn_implementation(name: str | None, cuda: bool | None = None) -> str | None:
    """``auto`` -> ``varlen`` on CUDA with torch's varlen kernel, else ``sdpa``; any other name (None: the
    model's own default) is returned as is."""
    if name != "auto":
        return name
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return VARLEN if cuda and varlen_attn is not None else "sdpa"


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: ``query`` (B, H, L, D), ``key``/``value`` (B, Hkv, L, D) -> (B, L, H, D).
    With ``cu_seq_lens_q`` (int32, N+1 boundaries over the flattened B·L tokens), causal attention within each
    document; without it, transformers' SDPA attention with ``attention_mask``."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    if dropout:
        raise ValueError("attn_implementation=varlen has no attention dropout; use sdpa")
    b, h, length, d = query.shape
    q, k, v = (t.transpose(1, 2).reshape(b * length, t.shape[1], d) for t in (query, key, value))
    scale = scaling if scaling is not None else d**-0.5
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and varlen_attn is not None:
        out = flash_varlen(q, k, v, cu_seq_lens_q, max_length_q or length, scale)
    else:
        out = document_sdpa(q, k, v, cu_seq_lens_q, scale)
    return out.view(b, length, h, d), None


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float,
                 kernel: Any = None) -> torch.Tensor:  # fmt: skip
    """Causal ``varlen_attn`` (T, H, D) over the documents ``cu``; key/value heads repeated for GQA where the
    installed torch's kernel does not take ``enable_gqa``. ``max_len`` may be an upper bound (the row length), so
    no host sync is needed to find the longest document."""
    kernel = kernel or varlen_attn
    params = inspect.signature(kernel).parameters
    if k.shape[1] != q.shape[1] and "enable_gqa" not in params:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}  # torch 2.11+ / 2.10
    gqa = {"enable_gqa": True} if "enable_gqa" in params and k.shape[1] != q.shape[1] else {}
    return kernel(q, k, v, cu, cu, max_len, max_len, scale=scale, **causal, **gqa)


def document_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float) -> torch.Tensor:
    """The same attention as :func:`flash_varlen`, one causal SDPA per document (the CPU and fp32 path)."""
    bounds, gqa = cu.tolist(), k.shape[1] != q.shape[1]
    docs = [[t[start:end].transpose(0, 1) for t in (q, k, v)] for start, end in zip(bounds[:-1], bounds[1:])]
    return torch.cat([F.scaled_dot_product_attention(*doc, is_causal=True, scale=scale, enable_gqa=gqa).transpose(0, 1)
                      for doc in docs])  # fmt: skip


def varlen_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """transformers' mask interface: no mask for unpadded or packed rows (the boundaries travel as
    ``cu_seq_lens_q``), SDPA's mask for padded ones."""
    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(VARLEN, varlen_attention)
AttentionMaskInterface.register(VARLEN, varlen_mask)
