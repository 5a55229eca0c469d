"""Which PLW to use for a dataset's generation ratio Rg: the paper's Table 4 or a fitted model's optimal-PLW table
(``plwlab recommend``). Standard library only, so that a lookup answers at once."""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from pathlib import Path


# Paper Table 4, column "All": optimal PLW by Rg; from Rg 2.5 on, PLW hardly matters.
TABLE4_ALL = {0.5: 0.155, 1.0: 0.155, 1.5: 0.183, 2.0: 0.239}
TABLE4_NEGLIGIBLE_FROM = 2.5


@dataclass
class Recommendation:
    rg: float
    plw: float | None  # None: PLW hardly matters
    source: str
    note: str = ""

    def __str__(self) -> str:
        value = "PLW hardly matters (any value in [0, 1]; 0 = Alpaca masking)" if self.plw is None else f"PLW {self.plw:.3g}"
        return f"Rg {self.rg:.3g}: {value}  [{self.source}]" + (f"  ({self.note})" if self.note else "")


def _interpolate(table: dict[float, float], rg: float) -> tuple[float, str]:
    """Linear interpolation in Rg (the nearest end value outside the table), as ``numpy.interp``."""
    xs = sorted(table)
    if rg <= xs[0] or rg >= xs[-1]:
        end = xs[0] if rg <= xs[0] else xs[-1]
        note = "" if rg in (xs[0], xs[-1]) else f"outside the fitted Rg range {xs[0]:g}..{xs[-1]:g}: nearest value used"
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


def recommend_plw(rg: float, column: str = "all", model_file: str | Path | None = None) -> Recommendation:
    """Suggested PLW for data with generation ratio ``rg``.

    From ``model_file`` when given (linear interpolation in Rg of its optimal-PLW table), else from the paper's
    Table 4 "All" column. The paper's "MC" and "Gen" columns are not bundled: pass a model file fitted on the
    multiple-choice or generation benchmarks for those.
    """
    if not (math.isfinite(rg) and rg > 0):
        raise ValueError(f"Rg must be a finite number > 0, got {rg}")
    if model_file is not None:
        plw, note = _interpolate(load_optimal_plw(model_file), rg)
        return Recommendation(rg, plw, f"fitted model {model_file}", note)
    if column != "all":
        raise ValueError(
            f"the paper's Table 4 '{column}' column is not bundled with plwlab; fit your own results "
            "(GAM over the benchmarks of that kind) and pass it as a model file"
        )
    if rg >= TABLE4_NEGLIGIBLE_FROM:
        return Recommendation(rg, None, "paper Table 4 (All)")
    plw, note = _interpolate(TABLE4_ALL, rg)
    if rg > max(TABLE4_ALL):
        note = f"between the table's last row (Rg 2.0) and Rg {TABLE4_NEGLIGIBLE_FROM}, where PLW stops mattering"
    return Recommendation(rg, plw, "paper Table 4 (All)", note)
