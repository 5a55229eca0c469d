"""A judge's verdicts and what they add up to: AlpacaEval's win rate with its standard error, PandaLM's win / tie /
lose counts, and the share of decisive verdicts that chose the output shown first (position bias)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Verdict:
    preference: float | None  # 1: first better, 2: second better, 1.5: tie, None: unparseable
    raw: str
    shown: float | None = None  # the preference between the outputs in the order the judge saw them


def first_position_rate(verdicts: Sequence[Verdict]) -> tuple[float, int]:
    """Share (%) of the judge's decisive verdicts that chose the output it was shown first, and their number.
    Near 100 or 0 the judge follows the position, not the outputs: its win rate then only reflects the order
    coin (50 with a balanced coin). NaN with no decisive verdict."""
    decisive = [v.shown for v in verdicts if v.shown in (1.0, 2.0)]
    return (100 * decisive.count(1.0) / len(decisive) if decisive else math.nan), len(decisive)


def win_rate(preferences: Sequence[float | None]) -> tuple[float, float | None, int]:
    """AlpacaEval's win rate of the second output: mean(preference - 1) × 100 over parseable verdicts, its
    standard error (× 100, pandas ``sem``) and their number. NaN with no parseable verdict."""
    valid = [p - 1 for p in preferences if p is not None]
    n = len(valid)
    if n == 0:
        return math.nan, None, 0
    mean = sum(valid) / n
    stderr = math.sqrt(sum((v - mean) ** 2 for v in valid) / (n - 1) / n) * 100 if n > 1 else None
    return mean * 100, stderr, n


def win_tie_lose(preferences: Sequence[float | None]) -> tuple[int, int, int]:
    """PandaLM's counts for the second output: wins (2), ties (1.5) and losses (1)."""
    counts = Counter(preferences)
    return counts[2.0], counts[1.5], counts[1.0]
