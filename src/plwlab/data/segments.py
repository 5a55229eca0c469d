"""Token segments and their loss weights: the one vocabulary of "which part of an example is this token" shared
by every data format, the loss and the statistics.

Chat conversations (:mod:`plwlab.data.chat`): ``template`` (role headers, BOS, separators the chat template adds),
``system``, ``user``, ``assistant`` (the *last* assistant turn, its end-of-turn marker included), ``reasoning``
(a think span inside the last assistant turn), and ``earlier_assistant`` / ``earlier_reasoning`` (the same in
every assistant turn before the last). Alpaca records and prompt/completion pairs have one prompt and one
completion: the prompt (BOS and the Alpaca template included) is ``user``, the completion (EOS included)
``assistant``.

Weights: ``plw`` stays the one knob. By default every assistant segment weighs 1 and every other one ``plw``
(Alpaca: exactly the paper's loss); ``loss.completion_weight`` sets the completion segments' weight instead of 1
(WIT's λr beside ``plw`` as its λp). ``loss.segment_weights`` overrides any of them, e.g. ``{template: 0,
system: 0}`` (no loss on the template or the system prompt), ``{earlier_assistant: ${plw},
earlier_reasoning: ${plw}}`` (train on the last assistant turn only; earlier ones are context), or
``{reasoning: 0.5, earlier_reasoning: 0.5}`` (half weight on thinking).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

SEGMENTS = ("template", "system", "user", "assistant", "reasoning", "earlier_assistant", "earlier_reasoning")
SEGMENT_ID = {name: i for i, name in enumerate(SEGMENTS)}
# what a model is trained to produce: Rg's numerator, the "completion" normalization and the logged completion loss
COMPLETION_SEGMENTS = ("assistant", "reasoning", "earlier_assistant", "earlier_reasoning")
COMPLETION_IDS = tuple(SEGMENT_ID[s] for s in COMPLETION_SEGMENTS)
PROMPT_ID, COMPLETION_ID = SEGMENT_ID["user"], SEGMENT_ID["assistant"]  # Alpaca and prompt/completion pairs


def is_weight(value: object) -> bool:
    """Whether ``value`` can weigh a loss term: a finite number >= 0."""
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def weight_table(plw: float, overrides: Mapping[str, float] | None = None, completion_weight: float = 1.0) -> tuple[float, ...]:
    """The weight of every segment (in :data:`SEGMENTS` order): ``completion_weight`` (default 1; WIT's λr) for
    completion segments, ``plw`` (WIT's λp) for the rest, then ``overrides`` (segment name -> weight >= 0). An unknown
    name or a negative or non-finite weight raises, naming it."""
    if not is_weight(completion_weight):
        raise ValueError(f"loss.completion_weight must be a finite number >= 0, got {completion_weight!r}")
    weights = {s: float(completion_weight) if s in COMPLETION_SEGMENTS else float(plw) for s in SEGMENTS}
    for name, weight in (overrides or {}).items():
        if name not in SEGMENT_ID:
            raise ValueError(f"loss.segment_weights: unknown segment {name!r}; segments are {', '.join(SEGMENTS)}")
        if not is_weight(weight):
            raise ValueError(f"loss.segment_weights.{name} must be a finite number >= 0, got {weight!r}")
        weights[name] = float(weight)
    return tuple(weights[s] for s in SEGMENTS)
