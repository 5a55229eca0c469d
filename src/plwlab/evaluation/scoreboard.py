"""The headline of each benchmark: its primary metric (what the analysis fits, :mod:`plwlab.analysis.scores`)
and the table of them that ``evaluate.py`` ends with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from plwlab.evaluation.harness import WMT_TASKS

# The metric the analysis uses for each benchmark of an evaluate.py results table (all higher-is-better).
PRIMARY_METRICS = {
    "arc_challenge": "acc_norm", "piqa": "acc_norm", "truthfulqa_mc2": "acc", "winogrande": "acc",
    "truthfulqa_gen": "bleu_acc", "alpaca_eval": "win_rate", "pandalm": "win_rate",
    **dict.fromkeys(WMT_TASKS, "bleu"),
}  # fmt: skip
# The per-run mechanism metrics beside them (the paper's Fig. 2): name -> (benchmark, metric) rows of the table
MECHANISM_METRICS = {"memorization_bleu": ("memorization", "bleu"), "generation_length": ("alpaca_eval", "generation_length")}


def score_table(rows: Sequence[dict[str, Any]], title: str) -> Table:
    """A row per evaluated run (its PLW and dataset), a column per benchmark's primary metric present in ``rows``,
    then the mechanism metrics; the other metrics stay in the results table."""
    wanted = [*PRIMARY_METRICS.items(), *MECHANISM_METRICS.values()]
    present = {(r["benchmark"], r["metric"]) for r in rows}
    columns = [c for c in wanted if c in present]
    scores: dict[str, dict[tuple[str, str], float]] = {}
    labels: dict[str, tuple[Any, Any]] = {}
    for r in rows:
        scores.setdefault(r["run_id"], {})[(r["benchmark"], r["metric"])] = r["score"]
        labels[r["run_id"]] = (r["plw"], r["dataset"])
    table = Table(title=title)
    for header in ("run", "PLW", "dataset", *(f"{b}\n{m}" for b, m in columns)):
        table.add_column(header, justify="left" if header in ("run", "dataset") else "right")
    for run_id, values in scores.items():
        plw, dataset = labels[run_id]
        table.add_row(run_id.split("/", 1)[-1], f"{plw:g}", str(dataset),
                      *("-" if values.get(c) is None else f"{values[c]:.4g}" for c in columns))  # fmt: skip
    return table
