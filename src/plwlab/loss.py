"""The prompt-loss-weighted (PLW) language-model loss. Everything in plwlab that needs a loss calls
:func:`prompt_weighted_loss`."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

Normalization = Literal["weight_sum", "nonzero", "completion"]
NORMALIZATIONS: tuple[str, ...] = ("weight_sum", "nonzero", "completion")


class PLWLoss(NamedTuple):
    """Result of :func:`prompt_weighted_loss`. Sums and counts are over the batch given."""

    loss: torch.Tensor  # Σ w·ℓ / D  (differentiable)
    weighted_sum: torch.Tensor  # Σ w·ℓ  (differentiable)
    denominator: torch.Tensor  # D actually used (never 0)
    prompt_nll: torch.Tensor  # Σ ℓ over prompt targets (unweighted, detached)
    n_prompt: torch.Tensor  # number of prompt targets
    completion_nll: torch.Tensor  # Σ ℓ over completion targets (unweighted, detached)
    n_completion: torch.Tensor  # number of completion targets


def loss_denominator(
    n_prompt: torch.Tensor | float, n_completion: torch.Tensor | float, plw: float, normalization: Normalization
) -> torch.Tensor:
    """The normalizer D of :func:`prompt_weighted_loss` from token counts (see its docstring)."""
    n_prompt = torch.as_tensor(n_prompt, dtype=torch.float64)
    n_completion = torch.as_tensor(n_completion, dtype=torch.float64)
    if normalization == "weight_sum":
        d = plw * n_prompt + n_completion
    elif normalization == "nonzero":
        d = n_completion + (n_prompt if plw > 0 else 0.0)
    elif normalization == "completion":
        d = n_completion
    else:
        raise ValueError(f"unknown loss normalization {normalization!r}; choose one of {NORMALIZATIONS}")
    return torch.where(d > 0, d, torch.ones_like(d))


def prompt_weighted_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    plw: float,
    normalization: Normalization = "weight_sum",
    denominator: torch.Tensor | float | None = None,
) -> PLWLoss:
    r"""Next-token cross-entropy where prompt tokens weigh ``plw`` and completion tokens weigh 1.

    Shapes: ``logits`` (B, L, V); ``input_ids``, ``completion_mask`` (1 = completion token, 0 = prompt
    token) and ``attention_mask`` (1 = real token, 0 = padding) are (B, L).

    For every target position t = 1..L-1 (token t is predicted from tokens < t)

    .. math::

        \ell_t = -\log p(x_t \mid x_{<t}), \qquad
        w_t = a_t \,\bigl(c_t + \mathrm{PLW}\,(1 - c_t)\bigr)

    with :math:`a_t` the attention mask and :math:`c_t` the completion mask of the *target* token. The loss is

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
    :class:`plwlab.module.PLWModule`). Cross-entropy is computed in at least float32.
    """
    if plw < 0:
        raise ValueError(f"plw must be >= 0, got {plw}")
    logits = logits[:, :-1]
    targets = input_ids[:, 1:]
    real = attention_mask[:, 1:].bool()
    completion = completion_mask[:, 1:].bool() & real
    prompt = real & ~completion

    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32, fp64 stays
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    nll = nll * real  # padding targets may hold any id; zero them explicitly
    weights = completion.to(nll.dtype) + plw * prompt.to(nll.dtype)
    weighted_sum = (weights * nll).sum()

    n_prompt, n_completion = prompt.sum(), completion.sum()
    if denominator is None:
        denominator = loss_denominator(n_prompt, n_completion, plw, normalization)
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
