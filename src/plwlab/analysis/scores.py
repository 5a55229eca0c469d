"""The scores the analysis models: one primary score per run and benchmark, min-max relative scores, and wp (the
paper's transformed PLW)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from plwlab.evaluation.scoreboard import PRIMARY_METRICS

log = logging.getLogger(__name__)
WP_EXPONENT = 0.30103  # log10(2), so wp(0.1) = 0.5


def wp(plw: np.ndarray | float) -> np.ndarray | float:
    """The paper's transformed PLW, ``PLW ** 0.30103`` (0 -> 0, 0.1 -> 0.5, 1 -> 1)."""
    return np.power(plw, WP_EXPONENT)


def primary_scores(results: pd.DataFrame, metrics: dict[str, str] | None = None) -> pd.DataFrame:
    """One score per run and benchmark from an evaluate.py table (which has a ``metric`` column): the rows of
    ``PRIMARY_METRICS`` updated by ``metrics``; other rows (memorization, generation length, secondary metrics) are
    dropped, as are benchmarks not in either (with a warning); NaN scores (e.g. a judge with no parseable verdict)
    stay for :func:`relative_scores` to count and leave out. The ``metric`` column is kept (it says which scores are
    percentages). A table without it is returned as is."""
    if "metric" not in results.columns:
        return results
    chosen = {**PRIMARY_METRICS, **(metrics or {})}
    unknown = sorted(set(results["benchmark"]) - set(chosen) - {"memorization"})
    if unknown:
        log.warning("benchmarks without a chosen metric are left out (add --metric BENCHMARK=METRIC): %s", unknown)
    keep = results["metric"] == results["benchmark"].map(chosen)
    return results[keep].reset_index(drop=True)


PERCENT_METRICS = ("win_rate", "bleu", "chrf", "ter")  # reported on 0-100; accuracies on 0-1
# The values a metric can take; a score outside is a wrong table (another scale, a bad join), not data. Metrics
# not named here (counts, lengths, TruthfulQA-gen's bleu_max and differences) are not range-checked.
METRIC_RANGES = {
    **dict.fromkeys(("acc", "acc_norm", "bleu_acc", "rouge1_acc", "rouge2_acc", "rougeL_acc"), (0.0, 1.0)),
    # first_position_rate: a judge's share (%) of decisive verdicts for the output shown first (evaluation.verdicts)
    **dict.fromkeys(("win_rate", "bleu", "chrf", "first_position_rate"), (0.0, 100.0)),
    "ter": (0.0, float("inf")),
}  # fmt: skip


def _rows(table: pd.DataFrame, mask: pd.Series, limit: int = 3) -> str:
    """The first rows under ``mask``, named by their line in the CSV (header = line 1) and their run."""
    who = table["run_id"] if "run_id" in table.columns else table["model"].astype(str) + " " + table["dataset"].astype(str)
    lines = [f"line {i + 2} ({who[i]} {table['benchmark'][i]})" for i in table.index[mask][:limit]]
    return ", ".join(lines) + (f" and {int(mask.sum()) - limit} more" if mask.sum() > limit else "")


def check_scores(table: pd.DataFrame) -> None:
    """Refuse (ValueError, one line naming the rows) a results table whose numbers a fit would silently
    misread: a non-finite rg or plw, one dataset name over several Rg values, data files or training lengths, a row
    repeated for one (run, benchmark, metric) (a table concatenated with itself would be fitted as
    twice the data), a PLW outside [0, 1], a score outside its metric's range (:data:`METRIC_RANGES`; without a
    ``metric`` column the benchmark's :data:`PRIMARY_METRICS` entry). A run is its ``run_id``, or in another
    tool's table its (model, dataset, rg, plw[, seed][, data_sha256][, train_steps]). Rows are named by their line
    in the CSV, in the table's order."""
    table = table.reset_index(drop=True)
    for column in ("rg", "plw"):
        values = pd.to_numeric(table[column], errors="coerce")
        if not np.isfinite(values).all():
            bad = str(table.loc[~np.isfinite(values), column].iloc[0])
            raise ValueError(f"results table: {column} must be a finite number in every row, got {bad} "
                             f"({(~np.isfinite(values)).sum()} rows)")  # fmt: skip
    for column, what, fix in (("rg", "Rg values", "give each data file its own data.name"),
                              ("data_sha256", "data files (content hashes)", "give each data file its own data.name"),
                              ("train_steps", "training lengths (steps)", "analyse one study at a time")):  # fmt: skip
        if column not in table.columns:
            continue
        mixed = table.groupby(["dataset", "model"])[column].nunique()
        if (mixed > 1).any():
            (dataset, model), n = mixed.idxmax(), mixed.max()
            raise ValueError(f"dataset {dataset!r} has {n} different {what} for model {model!r}: different runs "
                             f"would be fitted as one group; {fix}")  # fmt: skip
    run = ["run_id"] if "run_id" in table.columns else [
        c for c in ("model", "dataset", "rg", "plw", "seed", "data_sha256", "train_steps") if c in table]
    key = [*run, "benchmark", *(["metric"] if "metric" in table.columns else [])]
    repeated = table.duplicated(key, keep=False)
    if repeated.any():
        n_keys = table[repeated].drop_duplicates(key).shape[0]
        raise ValueError(f"results table: {int(repeated.sum())} rows repeat {n_keys} ({', '.join(key)}) keys, e.g. "
                         f"{_rows(table, repeated)}; a run's score would count more than once: keep one row per key "
                         "(evaluate.py replaces, never appends, a re-evaluated row)")  # fmt: skip
    plw = pd.to_numeric(table["plw"], errors="coerce")
    outside = (plw < 0) | (plw > 1)
    if outside.any():
        raise ValueError(f"results table: plw must lie in [0, 1] (wp = plw^{WP_EXPONENT} is the model's scale), got "
                         f"{plw[outside].iloc[0]:g} in {_rows(table, outside)}")  # fmt: skip
    metric = table["metric"] if "metric" in table.columns else table["benchmark"].map(PRIMARY_METRICS)
    bounds = metric.map(METRIC_RANGES)
    checked = bounds.notna()
    if checked.any():
        lo = bounds[checked].map(lambda b: b[0]).reindex(table.index)
        hi = bounds[checked].map(lambda b: b[1]).reindex(table.index)
        score = pd.to_numeric(table["score"], errors="coerce")
        bad = checked & np.isfinite(score) & ((score < lo) | (score > hi))  # NaN and inf: left out, counted
        if bad.any():
            i = table.index[bad][0]
            raise ValueError(f"results table: {metric[i]} scores lie in [{lo[i]:g}, {hi[i]:g}], got {score[i]:g} in "
                             f"{_rows(table, bad)} ({int(bad.sum())} rows); a score on another scale (a percentage "
                             "for a fraction?) would be fitted as it is")  # fmt: skip


def unit_scores(results: pd.DataFrame) -> pd.Series:
    """Scores on one 0-1 scale for averaging across benchmarks: percentages (win rates, BLEU) divided by 100.
    Uses the ``metric`` column, or each benchmark's :data:`PRIMARY_METRICS` entry where there is none."""
    metric = results["metric"] if "metric" in results.columns else results["benchmark"].map(PRIMARY_METRICS)
    return results["score"].where(~metric.isin(PERCENT_METRICS), results["score"] / 100)


def relative_scores(results: pd.DataFrame) -> pd.DataFrame:
    """Add ``y_mm`` (score min-max scaled within each (dataset, benchmark)) and ``wp`` to a results table with
    columns model, dataset, rg, plw, benchmark, score. A constant group gets 0.5. Rows whose score is not a finite
    number (NaN, inf, empty) are left out, with a warning that counts them; a non-finite rg or plw is an error."""
    missing = {"model", "dataset", "rg", "plw", "benchmark", "score"} - set(results.columns)
    if missing:
        raise ValueError(f"results table lacks columns {sorted(missing)}")
    check_scores(results)
    scores = pd.to_numeric(results["score"], errors="coerce")
    finite = np.isfinite(scores)
    if not finite.all():
        log.warning("%d of %d scores are not finite numbers (NaN, inf or empty): left out of the fits",
                    (~finite).sum(), len(scores))  # fmt: skip
    out = results[finite].assign(score=scores[finite], rg=results["rg"].astype(float), plw=results["plw"].astype(float))
    group = out.groupby(["dataset", "benchmark"])["score"]
    lo, hi = group.transform("min"), group.transform("max")
    out["y_mm"] = np.where(hi > lo, (out["score"] - lo) / (hi - lo).where(hi > lo, 1.0), 0.5)
    out["wp"] = wp(out["plw"].to_numpy(float))
    return out
