"""``plwlab analyze``: a results table (+ optionally the run directories) -> fitted tables, the GAM file and figures."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from plwlab.analysis import figures
from plwlab.analysis.gam import fit_te_gam
from plwlab.analysis.glmm import GLMMFit, fit_beta_glmm
from plwlab.analysis.scores import check_scores, primary_scores, relative_scores
from plwlab.evaluation.scoreboard import MECHANISM_METRICS
from plwlab.files import spreadsheet_safe
from plwlab.results import read_table
from plwlab.rundir import find_runs

log = logging.getLogger(__name__)
RG_GRID = np.round(np.arange(0.5, 8.01, 0.5), 1)


def collect_runs(root: str | Path) -> pd.DataFrame:
    """One row per training run below ``root``: its ``metrics.json`` plus model and dataset from its export and its
    ``run_id`` (run metrics such as loss_rsd and param_distance, for the box plots)."""
    rows = []
    for run in find_runs(root, "metrics.json"):
        row: dict[str, Any] = {"run_dir": str(run.path), **run.metrics()}
        if run.is_exported:
            meta = run.export_meta()
            row.update(model=meta.get("model"), dataset=meta.get("dataset"))
        row["run_id"] = run.run_id
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no metrics.json below {root}")
    return pd.DataFrame(rows)


# Per-run metrics that evaluate.py writes into the results table (the paper's Fig. 2 mechanism panels).
RESULT_RUN_METRICS = MECHANISM_METRICS


def run_metrics(table: pd.DataFrame, runs: pd.DataFrame | None = None) -> pd.DataFrame | None:
    """One row per run with its plw and the run metrics for the box plots: memorization BLEU and AlpacaEval
    generation length from the results ``table`` (evaluate.py's, with a metric column), joined on run_id with
    ``runs`` (:func:`collect_runs`: loss RSD, weight distance) when given. None when there is nothing to plot."""
    parts = []
    if "metric" in table.columns and "run_id" in table.columns:
        for column, (benchmark, metric) in RESULT_RUN_METRICS.items():
            rows = table[(table["benchmark"] == benchmark) & (table["metric"] == metric)]
            parts.append(rows.set_index("run_id")["score"].rename(column))
    found = pd.concat(parts, axis=1) if parts and any(len(p) for p in parts) else None
    if found is not None:
        keys = table.drop_duplicates("run_id").set_index("run_id")[["model", "dataset", "plw", "rg"]]
        found = keys.join(found, how="inner").reset_index()
    if runs is None:
        return found
    if found is None or "run_id" not in runs.columns:
        return runs
    return runs.merge(found.drop(columns=["model", "dataset", "plw", "rg"]), on="run_id", how="outer")


R_SCRIPT = Path(__file__).parent / "r" / "fit.R"


def fit_with_r(results_csv: str | Path, out_json: str | Path) -> dict[str, Any]:
    """The same GLMMs and GAM fitted by R's glmmTMB and mgcv (``Rscript``; Debian: r-base-core, r-cran-glmmtmb,
    r-cran-mgcv, r-cran-jsonlite). Writes and returns a JSON in the layout of plwlab's own ``summary.json``."""
    if shutil.which("Rscript") is None:
        raise RuntimeError("Rscript not found: install R with glmmTMB, mgcv and jsonlite for the R backend")
    result = subprocess.run(["Rscript", str(R_SCRIPT), str(results_csv), str(out_json)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"R backend failed: {result.stderr.strip()[-2000:]}")
    return json.loads(Path(out_json).read_text())


def _markdown(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, floatfmt=".4g") + "\n"


def analysis_inputs(results: str | Path, metrics: dict[str, str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The results table at ``results`` (:func:`plwlab.results.read_table`) checked (:func:`check_scores`), and the
    scores the fits use: one primary metric per run and benchmark (:func:`primary_scores`, ``metrics`` overriding)."""
    table = read_table(results)
    if table.empty:
        raise ValueError(f"{results} has no result rows (run evaluate.py on trained runs first)")
    check_scores(table)
    return table, primary_scores(table, metrics)


def analyze_table(results: str | Path, out_dir: str | Path, runs: str | Path | None = None,
                  metrics: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """The analysis of a results table, as ``plwlab analyze``, ``plwlab study`` and the notebook run it: checked
    inputs (:func:`analysis_inputs`), the fits and figures of :func:`analyze`, and the run-metric box plots from the
    table's memorization and generation-length rows joined with the runs below ``runs`` (a sweep directory)."""
    table, scores = analysis_inputs(results, metrics)
    return analyze(scores, out_dir, run_metrics(table, collect_runs(runs) if runs else None))


def analyze(results: pd.DataFrame, out_dir: str | Path, runs: pd.DataFrame | None = None) -> dict[str, Any]:
    """Fit the beta GLMM per dataset and the te(PLW, Rg) GAM (plus its wp-scale robustness fit), and write:
    ``relative_scores.csv``, ``glmm.csv/.md`` (coefficients, SEs, p-values, critical PLW, convergence flags),
    ``gam.json`` (optimal PLW per Rg; usable by ``plwlab recommend --model-file``), ``optimal_plw.csv/.md``,
    and the figures ``performance_by_wp``, ``plw_rg_contour`` and (with ``runs``) ``run_metrics`` as PNG + PDF
    (their names in the summary's ``figures``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rel = relative_scores(results)
    rel.map(spreadsheet_safe).to_csv(out / "relative_scores.csv", index=False)  # run names are text cells

    fits: dict[str, GLMMFit] = {}
    skipped: dict[str, str] = {}
    for dataset, part in rel.groupby("dataset", sort=True):
        try:
            fits[dataset] = fit_beta_glmm(part, dataset=dataset)
        except ValueError as e:  # too few PLW values or rows: say so, fit the others
            skipped[dataset] = str(e)
            log.warning("GLMM skipped: %s", e)
            continue
        log.info("GLMM %s: %s", dataset, fits[dataset].to_dict())
    summary: dict[str, Any] = {"glmm": {d: f.to_dict() for d, f in fits.items()}, "glmm_skipped": skipped,
                               "figures": ["performance_by_wp"]}  # fmt: skip
    if fits:
        glmm = pd.DataFrame([f.to_dict() for f in fits.values()])
        glmm.insert(1, "rg", [rel.loc[rel["dataset"] == d, "rg"].iloc[0] for d in glmm["dataset"]])
        glmm.sort_values("rg").map(spreadsheet_safe).to_csv(out / "glmm.csv", index=False)
        # the headline columns (the messages and diagnostics are in glmm.csv, REPORT.md says what they mean)
        columns = ["dataset", "rg", "b1", "se_b1", "p_b1", "b2", "se_b2", "p_b2", "critical_plw", "clean"]
        (out / "glmm.md").write_text(_markdown(glmm.sort_values("rg")[columns]))

    gams = {}
    n_rg, n_plw = rel["rg"].nunique(), rel["plw"].nunique()
    if n_rg >= 3 and n_plw >= 3:
        for transform in ("identity", "wp"):
            gam = fit_te_gam(rel, x_transform=transform)
            gams[transform] = gam
            lo, hi = gam.rg_range
            summary["gam" if transform == "identity" else "gam_wp"] = {
                "formula": f"y_mm ~ te({'plw' if transform == 'identity' else 'wp'}, rg, k=3) + factor(benchmark)",
                "optimal_plw": {f"{rg:g}": v for rg, v in gam.optimal_plw(RG_GRID).items()},
                "rg_range": [lo, hi],  # the data's; optimal PLW outside it is an extrapolation
                "extrapolated": [f"{rg:g}" for rg in RG_GRID if not lo <= rg <= hi],
                "edf": gam.edf, "te_edf": gam.te_edf, "gcv": gam.gcv, "log_lambda": gam.log_lambda.tolist(),
            }  # fmt: skip
        (out / "gam.json").write_text(json.dumps(summary["gam"], indent=2) + "\n")
        (out / "gam_wp.json").write_text(json.dumps(summary["gam_wp"], indent=2) + "\n")
        lo, hi = gams["identity"].rg_range
        optimal = pd.DataFrame({
            "rg": RG_GRID,
            "optimal_plw": [summary["gam"]["optimal_plw"][f"{r:g}"] for r in RG_GRID],
            "optimal_plw_wp_fit": [summary["gam_wp"]["optimal_plw"][f"{r:g}"] for r in RG_GRID],
            "extrapolated": [not lo <= r <= hi for r in RG_GRID],
        })  # fmt: skip
        optimal.to_csv(out / "optimal_plw.csv", index=False)
        (out / "optimal_plw.md").write_text(_markdown(optimal) + f"\nThe data span Rg {lo:.3g} to {hi:.3g}; rows marked "
                                            "extrapolated lie outside it.\n")  # fmt: skip
        figures.plw_rg_contour(gams["identity"], out / "plw_rg_contour")
        summary["figures"].append("plw_rg_contour")
    else:
        summary["gam_skipped"] = (f"the GAM te(PLW, Rg, k=3) needs at least 3 distinct Rg and 3 distinct PLW values, "
                                  f"got {n_rg} and {n_plw}")  # fmt: skip
        log.warning("GAM skipped: %s", summary["gam_skipped"])
    figures.performance_by_wp(rel, fits, out / "performance_by_wp")
    if runs is not None:
        figures.run_metric_panels(runs, out / "run_metrics")
        summary["figures"].append("run_metrics")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
