"""The study's ``REPORT.md``: the grid trained, each dataset's Rg, one primary score per benchmark, the GLMM and
GAM tables with a sentence on each fit that is not clean or not identified, and the figures of an analysis
directory, in one page (``plwlab study``). :func:`fit_notes` is also the W&B report's (``plwlab dashboard``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from plwlab.analysis.analyze import RESULT_RUN_METRICS
from plwlab.analysis.scores import primary_scores

TINY_MODEL = "tiny-llama"  # conf/model/tiny.yaml's name: the caveat above its numbers


def score_table(table: Any) -> str:
    """The primary score of each benchmark (:data:`plwlab.evaluation.scoreboard.PRIMARY_METRICS`, what the fits use) as
    one markdown table: a row per dataset and PLW, a column per benchmark (its metric in the header), then the
    Fig. 2 run metrics (memorization BLEU, AlpacaEval generation length). Diagnostic counts (unparsed verdicts,
    ties, ...) and secondary metrics stay in the results table."""
    fig2 = set(RESULT_RUN_METRICS.values())
    extra = table[[(b, m) in fig2 for b, m in zip(table["benchmark"], table["metric"])]]
    both = pd.concat([primary_scores(table), extra])
    both["column"] = both["benchmark"] + " " + both["metric"]
    wide = both.pivot_table(index=["dataset", "rg", "plw"], columns="column", values="score", aggfunc="first")
    fig2_columns = [f"{b} {m}" for b, m in RESULT_RUN_METRICS.values()]
    wide = wide[[c for c in wide.columns if c not in fig2_columns] + [c for c in fig2_columns if c in wide.columns]]
    wide = wide.sort_index(level=["rg", "plw"]).reset_index()
    wide["rg"] = wide["rg"].map(lambda r: f"{r:.3g}")
    wide["plw"] = wide["plw"].map(lambda p: f"{p:g}")
    return wide.to_markdown(index=False, floatfmt=".3g")


def fit_notes(summary: dict[str, Any]) -> list[str]:
    """A sentence on each GLMM that is not clean (and whether its coefficients are identified at all), each dataset
    that could not be fitted, and a GAM whose optimum sits on a boundary at every Rg."""
    notes = []
    for dataset, fit in summary.get("glmm", {}).items():
        identified = fit.get("se_b1") is not None and fit.get("se_b2") is not None
        if fit["clean"]:
            if fit["critical_plw"] is None:
                notes.append(f"{dataset}: clean fit without an interior optimum (b2 = {fit['b2']:.3g}): the best "
                             "PLW lies at an end of the range sampled.")  # fmt: skip
            continue
        problems = "; ".join(filter(None, [fit.get("message"), fit.get("error")]))
        boundary = f", variance components at their boundary ({fit['boundary']})" if fit.get("boundary") else ""
        if identified:
            notes.append(f"{dataset}: NOT clean ({problems}{boundary}); its coefficients and critical PLW are "
                         "estimates to read with caution.")  # fmt: skip
        else:
            notes.append(f"{dataset}: NOT clean and not identified: the standard errors of b1 and b2 could not be "
                         f"estimated ({problems}{boundary}), so its curve and critical PLW are not evidence; more PLW "
                         "values or benchmarks are needed.")  # fmt: skip
    for dataset, why in summary.get("glmm_skipped", {}).items():
        notes.append(f"{dataset}: no GLMM ({why}).")
    gam = summary.get("gam")
    if gam:
        lo, hi = gam["rg_range"]
        inside = [v for rg, v in gam["optimal_plw"].items() if lo <= float(rg) <= hi]
        if inside and len(set(inside)) == 1 and inside[0] in (0.0, 1.0):
            notes.append(f"GAM: the optimal PLW is {inside[0]:g} at every Rg the data span ({lo:.3g}-{hi:.3g}): the "
                         "fitted surface has no interior optimum there, so the table gives the boundary of the PLW "
                         "range sampled, not a tuned value.")  # fmt: skip
        if gam["extrapolated"]:
            notes.append(f"GAM: {len(gam['extrapolated'])} of {len(gam['optimal_plw'])} Rg values lie outside the "
                         f"data's Rg {lo:.3g}-{hi:.3g} (extrapolated).")  # fmt: skip
    return notes


def judge_notes(table: pd.DataFrame) -> list[str]:
    """A sentence on each judge whose verdicts say little: most of them unparsed, or the decisive ones (nearly) all
    for the output shown first (position bias: its win rate then measures the order coin)."""
    notes = []
    for judge in sorted(set(table.loc[table["metric"] == "unparsed_verdicts", "benchmark"])):
        rows = table[table["benchmark"] == judge]
        unparsed = rows[rows["metric"] == "unparsed_verdicts"]
        share = unparsed["score"].sum() / max(unparsed["n"].sum(), 1)
        first = rows.loc[rows["metric"] == "first_position_rate", "score"].mean()
        if share > 0.5:
            notes.append(f"{judge}: {share:.0%} of the judge's verdicts could not be parsed; its win rates rest on "
                         "the few that could.")  # fmt: skip
        if first >= 90:
            notes.append(f"{judge}: the judge preferred the output shown first in {first:.0f}% of its decisive "
                         "verdicts (position bias): its win rate measures the order coin, not the outputs.")  # fmt: skip
    return notes


def write_report(out: Path, table: Any, summary: dict[str, Any], seconds: dict[str, float], overrides: list[str]) -> Path:
    """``REPORT.md``: the grid, each dataset's Rg, the primary scores, the GLMM and GAM tables with their notes, and
    the figures."""
    analysis = out / "analysis"
    datasets = table.drop_duplicates("dataset").sort_values("rg")[["dataset", "rg"]]
    notes = fit_notes(summary) + (judge_notes(table) if "metric" in table.columns else [])
    lines = [
        "# PLW study", "",
        f"{table['run_id'].nunique()} runs: PLW {', '.join(f'{p:g}' for p in sorted(table['plw'].unique()))} x "
        f"{len(datasets)} datasets, model {', '.join(sorted(table['model'].unique()))}"
        + (f"; overrides: `{' '.join(overrides)}`" if overrides else "") + ".",
        "Stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ".",
        *(["With the embedded default (a tiny randomly initialised model, 400 examples) the numbers check the "
           "pipeline; they say nothing about PLW."] if set(table["model"]) <= {TINY_MODEL} else []), "",
        "| dataset | Rg |", "|---|---|", *(f"| {d} | {rg:.3g} |" for d, rg in datasets.itertuples(index=False)), "",
        "## Scores per PLW", "",
        "The primary score of each benchmark (what the fits use; every metric is in `runs/results.csv`).", "",
        score_table(table), "",
        "## Beta GLMM per dataset (`analysis/glmm.md`)", "",
        (analysis / "glmm.md").read_text() if (analysis / "glmm.md").exists() else "No dataset could be fitted.",
    ]  # fmt: skip
    lines += ["", "## Optimal PLW by Rg (GAM, `analysis/optimal_plw.md`)", ""]
    lines += [(analysis / "optimal_plw.md").read_text() if (analysis / "optimal_plw.md").exists()
              else f"GAM skipped: {summary.get('gam_skipped')}"]  # fmt: skip
    if notes:
        lines += ["", "## What the fits and judges do not say", "", *(f"- {n}" for n in notes)]
    lines += ["", "## Figures", ""]
    lines += [f"![{p.stem}](analysis/{p.name})" for p in sorted(analysis.glob("*.png"))]
    report = out / "REPORT.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "study.json").write_text(json.dumps({"seconds": seconds, "overrides": overrides}, indent=2) + "\n")
    return report
