"""Which PLW to use for a dataset's generation ratio Rg: the paper's Table 4 or a fitted model's optimal-PLW table
(``plwlab recommend``). Standard library only, so that a lookup answers at once."""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from pathlib import Path

TABLE4_SOURCE = "paper Table 4 (Huerta-Enochian & Ko 2024, appendix B: optimal PLW of the fitted GAMs)"
TABLE4_COLUMNS = {"all": "all 13 benchmarks", "mc": "multiple choice: ARC-C, PIQA, TruthfulQA-MC2, WinoGrande",
                  "gen": "generation: TruthfulQA-Gen, AlpacaEval 1, PandaLM"}  # fmt: skip
# The paper's Table 4: Rg -> {column: (optimal PLW, flat)}. ``flat`` is the paper's asterisk: "the difference
# between the maximum and minimum predicted values at this ratio is less than 5% of the score range".
TABLE4: dict[float, dict[str, tuple[float, bool]]] = {
    rg: {"all": (a, bool(af)), "mc": (m, bool(mf)), "gen": (g, bool(gf))}
    for rg, a, af, m, mf, g, gf in [
        (0.5, 0.155, 0, 0.155, 0, 0.292, 1), (1.0, 0.155, 0, 0.183, 0, 0.321, 1),
        (1.5, 0.183, 0, 0.278, 0, 0.385, 1), (2.0, 0.239, 0, 1.000, 1, 0.679, 1),
        (2.5, 1.000, 1, 1.000, 1, 1.000, 1), (3.0, 1.000, 1, 1.000, 1, 1.000, 1),
        (3.5, 1.000, 1, 1.000, 1, 0.000, 1), (4.0, 1.000, 1, 1.000, 1, 0.000, 1),
        (4.5, 0.000, 1, 1.000, 1, 0.000, 1), (5.0, 0.000, 1, 1.000, 1, 0.000, 1),
        (5.5, 1.000, 1, 1.000, 1, 0.000, 1), (6.0, 1.000, 1, 1.000, 1, 0.000, 1),
        (6.5, 1.000, 1, 1.000, 1, 1.000, 1), (7.0, 1.000, 1, 1.000, 1, 1.000, 1),
        (7.5, 1.000, 1, 1.000, 1, 1.000, 1), (8.0, 1.000, 1, 1.000, 1, 0.654, 0),
    ]
}  # fmt: skip
FLAT = "PLW hardly matters here"


@dataclass
class Recommendation:
    rg: float
    plw: float | None  # None: PLW hardly matters
    source: str
    note: str = ""
    column: str = "all"

    def __str__(self) -> str:
        value = f"{FLAT} (any value in [0, 1]; 0 = Alpaca masking)" if self.plw is None else f"PLW {self.plw:.3g}"
        source = self.source if self.column == "fitted" else f"{self.source}, column {self.column}"
        return f"Rg {self.rg:.3g}: {value}  [{source}]" + (f"  ({self.note})" if self.note else "")


def _interpolate(table: dict[float, float], rg: float) -> tuple[float, str]:
    """Linear interpolation in Rg (the nearest end value outside the table), as ``numpy.interp``."""
    xs = sorted(table)
    if rg <= xs[0] or rg >= xs[-1]:
        end = xs[0] if rg <= xs[0] else xs[-1]
        note = "" if rg in (xs[0], xs[-1]) else f"outside the Rg range {xs[0]:g}..{xs[-1]:g}: nearest value used"
        return table[end], note
    i = bisect.bisect_right(xs, rg)
    x0, x1 = xs[i - 1], xs[i]
    return table[x0] + (table[x1] - table[x0]) * (rg - x0) / (x1 - x0), ""


def load_optimal_plw(path: str | Path) -> dict[float, float]:
    """``{rg: optimal PLW}`` from a fitted-model JSON: ``{"optimal_plw": {"0.5": 0.38, ...}}``, at the top level
    or under ``"gam"`` (the layout plwlab's GAM fit and the R reference fits write)."""
    data = json.loads(Path(path).read_text())
    table = data.get("optimal_plw") or data.get("gam", {}).get("optimal_plw")
    if not table:
        raise ValueError(f"{path}: no 'optimal_plw' table (top level or under 'gam')")
    return {float(rg): float(plw) for rg, plw in table.items()}


def table4_lookup(rg: float, column: str) -> tuple[float | None, str]:
    """Table 4's PLW for ``rg`` in ``column``: None where the nearest row is flat (PLW hardly matters), else the
    linear interpolation between the non-flat rows around ``rg`` (the nearest one beyond them)."""
    nearest = min(TABLE4, key=lambda r: (abs(r - rg), r))
    if TABLE4[nearest][column][1]:
        return None, ""
    plw, note = _interpolate({r: row[column][0] for r, row in TABLE4.items() if not row[column][1]}, rg)
    if note and min(TABLE4) <= rg <= max(TABLE4):
        note = f"nearest row with an optimum: Rg {nearest:g}"
    return plw, note


def recommend_plw(rg: float, column: str = "all", model_file: str | Path | None = None) -> Recommendation:
    """Suggested PLW for data with generation ratio ``rg``.

    From ``model_file`` when given (linear interpolation in Rg of its optimal-PLW table), else from the paper's
    Table 4 ``column`` ("all", "mc" or "gen" benchmarks; see :func:`table4_lookup`).
    """
    if not (math.isfinite(rg) and rg > 0):
        raise ValueError(f"Rg must be a finite number > 0, got {rg}")
    if column not in TABLE4_COLUMNS:
        raise ValueError(f"column must be one of {sorted(TABLE4_COLUMNS)}, got {column!r}")
    if model_file is not None:
        plw, note = _interpolate(load_optimal_plw(model_file), rg)
        data = json.loads(Path(model_file).read_text())
        lo, hi = (data.get("rg_range") or data.get("gam", {}).get("rg_range") or (None, None))
        if lo is not None and not lo <= rg <= hi:
            note = "; ".join(filter(None, [note, f"extrapolated: the fitted data span Rg {lo:g}..{hi:g}"]))
        return Recommendation(rg, plw, f"fitted model {model_file}", note, column="fitted")
    plw, note = table4_lookup(rg, column)
    return Recommendation(rg, plw, "paper Table 4", note, column)


def table4_rows(rg: float) -> str:
    """Table 4 as text, the rows around ``rg`` marked, flat cells starred, its source named (for the CLI)."""
    lines = [f"{TABLE4_SOURCE}; * = {FLAT}",
             f"{'Rg':>5}  " + "  ".join(f"{c:>7}" for c in TABLE4_COLUMNS)]  # fmt: skip
    for r in sorted(TABLE4):
        cells = "  ".join(f"{v:>6.3f}{'*' if flat else ' '}" for v, flat in TABLE4[r].values())
        lines.append(f"{r:>5.1f}  {cells}" + ("   <- nearest" if r == min(TABLE4, key=lambda x: (abs(x - rg), x)) else ""))
    lines.append("columns: " + "; ".join(f"{c} = {d}" for c, d in TABLE4_COLUMNS.items()))
    return "\n".join(lines)
