"""The prompt-loss-weighted (PLW) language-model loss. Everything in plwlab that needs a loss calls
:func:`segment_weighted_loss` (a weight per token segment; :func:`prompt_weighted_loss` is its Alpaca form, prompt
weighing PLW and completion 1), on per-token NLLs from :func:`next_token_nll` (full logits) or
:func:`chunked_next_token_nll` (memory-lean, fused with the LM head)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from plwlab.config import NORMALIZATIONS
from plwlab.data.segments import COMPLETION_IDS

Normalization = Literal["weight_sum", "nonzero", "completion", "share"]


class PLWLoss(NamedTuple):
    """Result of :func:`prompt_weighted_loss`. Sums and counts are over the batch given."""

    loss: torch.Tensor  # Σ w·ℓ / D  (differentiable)
    weighted_sum: torch.Tensor  # Σ w·ℓ  (differentiable)
    denominator: torch.Tensor  # D actually used (never 0)
    prompt_nll: torch.Tensor  # Σ ℓ over prompt targets (unweighted, detached)
    n_prompt: torch.Tensor  # number of prompt targets
    completion_nll: torch.Tensor  # Σ ℓ over completion targets (unweighted, detached)
    n_completion: torch.Tensor  # number of completion targets


IGNORE_INDEX = -100  # a target that is not predicted (cross_entropy's default)
ROW_BLOCK_ELEMENTS = 1 << 18  # CPU: logits elements upcast at a time by the NLL (1 MB in float32: stays in cache)
GPU_BLOCK_ELEMENTS = 1 << 24  # CUDA: 64 MB in float32, a few kernels per micro-batch instead of thousands


def block_rows(logits: torch.Tensor) -> int:
    """Rows of a (N, V) logits matrix that :class:`_TokenNLL` upcasts at a time on the logits' device: a block of
    :data:`ROW_BLOCK_ELEMENTS` on CPU, :data:`GPU_BLOCK_ELEMENTS` elsewhere. Results do not depend on it."""
    elements = ROW_BLOCK_ELEMENTS if logits.device.type == "cpu" else GPU_BLOCK_ELEMENTS
    return max(1, elements // max(logits.shape[1], 1))


class _TokenNLL(torch.autograd.Function):
    """Per-row NLL ``logsumexp(x) - x[target]`` of a (N, V) logits matrix, with no full-size temporary.

    ``F.cross_entropy`` keeps a (N, V) log-softmax for backward and builds two more in it (the gradient of the
    log-softmax, then of the logits); upcasting bf16 logits adds another. Here the forward keeps only the row
    log-sum-exps, upcasting a block of logits at a time (:func:`block_rows`), and the backward writes
    ``g · (softmax(x) - onehot(target))`` block by block into the one (N, V) gradient it must return. Same values
    as ``F.cross_entropy(x.float(), t, reduction="none")`` to float rounding; rows with target ``IGNORE_INDEX`` get 0.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        rows = block_rows(logits)
        lse = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            lse[start : start + rows] = torch.logsumexp(logits[start : start + rows].to(dtype), dim=-1)
        valid = targets != IGNORE_INDEX
        safe = torch.where(valid, targets, 0)
        picked = logits.gather(1, safe[:, None]).squeeze(1).to(dtype)
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.rows = rows
        return (lse - picked) * valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_nll: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, safe, valid, lse = ctx.saved_tensors
        g = grad_nll.to(lse.dtype) * valid
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.rows):
            end = start + ctx.rows
            block = torch.sub(logits[start:end].to(lse.dtype), lse[start:end, None]).exp_().mul_(g[start:end, None])
            block.scatter_add_(1, safe[start:end, None], -g[start:end, None])
            grad[start:end] = block
        return grad, None


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``nll[b, t] = -log p(input_ids[b, t+1] | input_ids[b, :t+1])`` from full logits (B, L, V) -> (B, L-1).

    Computed in at least float32 (bf16/fp16 logits are upcast block by block; fp64 stays fp64). The *targets* are
    shifted, not the logits: the last position gets target ``IGNORE_INDEX`` and is dropped from the result, so no
    (B, L-1, V) copy of the logits is made, and :class:`_TokenNLL` makes no full-size temporary either: the loss's
    peak memory is the logits' gradient, which backward must return anyway.
    """
    targets = F.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX)
    return _TokenNLL.apply(logits.flatten(0, 1), targets.flatten()).view_as(targets)[:, :-1]


def chunked_next_token_nll(
    hidden: torch.Tensor, head_weight: torch.Tensor, input_ids: torch.Tensor, chunk_tokens: int = 1024
) -> torch.Tensor:
    """:func:`next_token_nll` without materialising the logits of the whole batch.

    ``hidden`` (B, L, H) are the final hidden states and ``head_weight`` (V, H) the LM head, so
    ``logits = hidden @ head_weight.T``. The target positions are processed ``chunk_tokens`` at a time: each chunk's
    logits exist only while its NLL is computed, and are recomputed in the backward pass (activation
    checkpointing), so extra memory is O(chunk_tokens x V) instead of O(B x L x V). Same values as the full path.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    h = hidden.flatten(0, 1)  # a view: targets are shifted instead (see next_token_nll)
    targets = F.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
    dtype = torch.promote_types(hidden.dtype, torch.float32)

    def chunk_nll(h_chunk: torch.Tensor, t_chunk: torch.Tensor) -> torch.Tensor:
        logits = (h_chunk @ head_weight.T).to(dtype)
        return F.cross_entropy(logits, t_chunk, reduction="none")

    pieces = []
    for start in range(0, h.shape[0], chunk_tokens):
        end = start + chunk_tokens
        if torch.is_grad_enabled() and (h.requires_grad or head_weight.requires_grad):
            pieces.append(checkpoint(chunk_nll, h[start:end], targets[start:end], use_reentrant=False))
        else:
            pieces.append(chunk_nll(h[start:end], targets[start:end]))
    return torch.cat(pieces).view_as(input_ids)[:, :-1]


def prompt_weighted_loss(
    nll: torch.Tensor,
    completion_mask: torch.Tensor,
    token_mask: torch.Tensor,
    plw: float,
    normalization: Normalization = "weight_sum",
    denominator: torch.Tensor | float | None = None,
) -> PLWLoss:
    r"""Next-token cross-entropy where prompt tokens weigh ``plw`` and completion tokens weigh 1.

    ``nll`` (B, L-1) holds the NLL of each next token (:func:`next_token_nll` from logits, or
    :func:`chunked_next_token_nll`); ``completion_mask`` (1 = completion token, 0 = prompt token) and
    ``token_mask`` (1 = a real token that is a prediction target; 0 = padding, or the first token of a document
    packed behind another) are (B, L). For every target position t = 1..L-1 (token t predicted from tokens < t)

    .. math::

        \ell_t = -\log p(x_t \mid x_{<t}), \qquad
        w_t = a_t \,\bigl(c_t + \mathrm{PLW}\,(1 - c_t)\bigr)

    with :math:`a_t` the token mask and :math:`c_t` the completion mask of the *target* token. The loss is

    .. math::

        \mathcal{L} = \frac{\sum_t w_t \ell_t}{D}, \qquad D = \begin{cases}
            \sum_t w_t = \mathrm{PLW}\,N_p + N_c & \text{normalization = "weight\_sum"} \\
            \#\{t : w_t > 0\} = N_c + N_p [\mathrm{PLW} > 0] & \text{normalization = "nonzero"} \\
            N_c & \text{normalization = "completion"}
        \end{cases}

    where :math:`N_p, N_c` count prompt and completion targets. All three agree at PLW = 0, where the loss is
    the Alpaca (completion-masked) loss; at PLW = 1 "weight_sum" and "nonzero" give the ordinary unmasked loss.
    If ``D`` is 0 (no token has a non-zero weight, e.g. every completion token was truncated and PLW = 0),
    1 is used instead, so the loss is 0 (or Σ w ℓ) and never NaN.

    ``denominator`` overrides D: pass 1 to get the plain weighted sum (the caller then divides by the
    denominator of the whole optimizer step, summed over micro-batches and ranks; see
    :class:`plwlab.training.module.PLWModule`).
    """
    if plw < 0:
        raise ValueError(f"plw must be >= 0, got {plw}")
    return segment_weighted_loss(nll, completion_mask, token_mask, (plw, 1.0), (1,), normalization, denominator)


def segment_weighted_loss(
    nll: torch.Tensor,
    segment_ids: torch.Tensor,
    token_mask: torch.Tensor,
    segment_weights: tuple[float, ...],
    completion_segments: tuple[int, ...],
    normalization: Normalization = "weight_sum",
    denominator: torch.Tensor | float | None = None,
    example_weights: torch.Tensor | None = None,
    share_counts: Sequence[float] | None = None,
) -> PLWLoss:
    r"""The general form of :func:`prompt_weighted_loss`: each target token weighs its segment's weight, times its
    example's weight.

    ``segment_ids`` (B, L) hold an index into ``segment_weights`` per token (chat data: template, system, user,
    assistant, reasoning; Alpaca: 0 = prompt, 1 = completion); ``example_weights`` (B, L; default all 1) hold each
    token's example weight :math:`e_t` (``data.weight_column``). With :math:`s_t` the segment of target t,

    .. math::

        w_t = a_t\, W[s_t]\, e_t, \qquad \mathcal{L} = \frac{\sum_t w_t \ell_t}{D}, \qquad D = \begin{cases}
            \sum_s W[s]\, E_s = \sum_t w_t & \text{"weight\_sum"} \\
            \sum_{s : W[s] > 0} \#\{t \in s : e_t > 0\} = \#\{t : w_t > 0\} & \text{"nonzero"} \\
            \sum_{s \in C} E_s & \text{"completion"}
        \end{cases}

    where :math:`E_s = \sum_{t \in s} a_t e_t` is segment s's (example-)weighted target count (its plain count
    :math:`N_s` without example weights) and C is ``completion_segments`` (the tokens a model is trained to produce;
    the PLWLoss "completion" sums run over them, the "prompt" sums over the rest). "weight_sum" and "completion"
    are unchanged when every example weight is scaled alike; "nonzero" counts tokens, so it scales with them.

    ``normalization="share"`` makes the weights set each segment's *share* of the loss instead of a per-token weight
    (the form in which PLW is the prompt's share, whatever the prompt and completion lengths):

    .. math::

        \mathcal{L} = \frac{\sum_{s : E_s > 0} W[s]\, \bar\ell_s}{\sum_{s : E_s > 0} W[s]}, \qquad
        \bar\ell_s = \frac{\sum_{t \in s} a_t e_t \ell_t}{E_s},

    i.e. per-token weights :math:`w_t = W[s_t]\, e_t / (E_{s_t} Z)` with :math:`Z = \sum_{s : E_s > 0} W[s]` and
    D = 1. On Alpaca data the prompt's share is PLW / (PLW + λr): with ``completion_weight`` λr = 1 - PLW it is PLW
    itself; PLW 0 is the Alpaca loss again. The counts :math:`E_s` are ``share_counts`` when given (those of the whole
    optimizer step: :class:`plwlab.training.module.PLWModule` passes them), else this batch's.

    ``prompt_weighted_loss`` is this with W = (PLW, 1), C = {1} and no example weights, and gives the same bits as
    before segments or example weights existed.
    """
    if normalization == "share":
        counts = share_counts if share_counts is not None else segment_counts(
            segment_ids, token_mask, len(segment_weights), example_weights)[0].tolist()  # fmt: skip
        segment_weights = share_weights(segment_weights, counts)
        denominator = 1.0 if denominator is None else denominator
    real = token_mask[:, 1:].bool()
    segments = segment_ids[:, 1:].long()
    completion = torch.zeros_like(real)
    for s in completion_segments:
        completion |= segments == s
    completion &= real
    prompt = real & ~completion
    nll = nll * real  # padding targets may hold any id; zero them explicitly
    table = torch.tensor(segment_weights, dtype=nll.dtype, device=nll.device)
    weights = table[segments] * real
    if example_weights is not None:
        weights = weights * example_weights[:, 1:].to(nll.dtype)
    weighted_sum = (weights * nll).sum()

    n_prompt, n_completion = prompt.sum(), completion.sum()
    if denominator is None:
        weighted, nonzero = segment_counts(segment_ids, token_mask, len(segment_weights), example_weights)
        denominator = segment_denominator(weighted, segment_weights, completion_segments, normalization, nonzero)
    denominator = torch.as_tensor(denominator, dtype=nll.dtype, device=nll.device)
    detached = nll.detach()
    return PLWLoss(
        loss=weighted_sum / denominator,
        weighted_sum=weighted_sum,
        denominator=denominator,
        prompt_nll=(detached * prompt).sum(),
        n_prompt=n_prompt,
        completion_nll=(detached * completion).sum(),
        n_completion=n_completion,
    )


def share_weights(segment_weights: Sequence[float], counts: Sequence[float]) -> tuple[float, ...]:
    """The per-token segment weights of the "share" normalization: ``W[s] / (E_s Z)`` with ``Z`` the sum of the
    weights of the segments present (``E_s > 0``); 0 for an absent segment."""
    z = sum(w for w, c in zip(segment_weights, counts) if c > 0)
    return tuple(w / (c * z) if c > 0 and z > 0 else 0.0 for w, c in zip(segment_weights, counts))


def segment_counts(segment_ids: torch.Tensor, token_mask: torch.Tensor, n_segments: int,
                   example_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per segment, over a batch's targets (float64, on its device): the example-weighted count :math:`E_s` and the
    count of targets whose example weight is not 0 (both the plain count :math:`N_s` without example weights);
    what :func:`segment_denominator` needs, summable over micro-batches and ranks."""
    targets = token_mask[:, 1:].flatten().double()
    index = segment_ids[:, 1:].flatten().long()
    e = targets if example_weights is None else targets * example_weights[:, 1:].flatten().double()
    weighted = targets.new_zeros(n_segments).index_add_(0, index, e)
    nonzero = weighted if example_weights is None else targets.new_zeros(n_segments).index_add_(0, index, (e > 0).double())
    return weighted, nonzero


def completion_mask(segment_ids: torch.Tensor, completion_segments: tuple[int, ...] | None = None) -> torch.Tensor:
    """1 where a token's segment is a completion segment (default: :data:`plwlab.data.segments.COMPLETION_IDS`), else
    0: the ``completion_mask`` of :func:`prompt_weighted_loss` from a batch's ``segment_ids``."""
    ids = torch.tensor(COMPLETION_IDS if completion_segments is None else completion_segments, device=segment_ids.device)
    return torch.isin(segment_ids, ids).long()


def segment_denominator(counts: torch.Tensor, segment_weights: tuple[float, ...], completion_segments: tuple[int, ...],
                        normalization: Normalization, nonzero_counts: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The normalizer D of :func:`segment_weighted_loss` from per-segment target counts (float64): ``counts`` the
    example-weighted ones :math:`E_s`, ``nonzero_counts`` those of targets with a non-zero example weight (default:
    ``counts``; both are the plain counts :math:`N_s` without example weights)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    nonzero_counts = counts if nonzero_counts is None else torch.as_tensor(nonzero_counts, dtype=torch.float64)
    if normalization == "share":  # its weights carry the normalization (share_weights)
        d = 1.0
    elif normalization == "weight_sum":
        d = sum(w * counts[s] for s, w in enumerate(segment_weights))
    elif normalization == "nonzero":
        d = sum(nonzero_counts[s] for s, w in enumerate(segment_weights) if w > 0)
    elif normalization == "completion":
        d = sum(counts[s] for s in completion_segments)
    else:
        raise ValueError(f"unknown loss normalization {normalization!r}; choose one of {NORMALIZATIONS}")
    d = torch.as_tensor(d, dtype=torch.float64)
    return torch.where(d > 0, d, torch.ones_like(d))
