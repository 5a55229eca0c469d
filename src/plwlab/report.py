"""``plwlab analyze``: results table (+ optional run directories) -> fitted tables, GAM file and figures."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from plwlab import figures
from plwlab.analysis import GLMMFit, fit_beta_glmm, relative_scores
from plwlab.gam import fit_te_gam

log = logging.getLogger(__name__)
RG_GRID = np.round(np.arange(0.5, 8.01, 0.5), 1)


def collect_runs(root: str | Path) -> pd.DataFrame:
    """One row per training run below ``root``: its ``metrics.json`` plus model/data from ``hf_model/plwlab.json``
    (run metrics such as loss_rsd and param_distance, for the box plots)."""
    rows = []
    for metrics_file in sorted(Path(root).rglob("metrics.json")):
        row: dict[str, Any] = {"run_dir": str(metrics_file.parent), **json.loads(metrics_file.read_text())}
        meta = metrics_file.parent / "hf_model" / "plwlab.json"
        if meta.exists():
            info = json.loads(meta.read_text())
            row.update(model=info.get("model"), dataset=info.get("data"))
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no metrics.json below {root}")
    return pd.DataFrame(rows)


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


def analyze(results: pd.DataFrame, out_dir: str | Path, runs: pd.DataFrame | None = None) -> dict[str, Any]:
    """Fit the beta GLMM per dataset and the te(PLW, Rg) GAM (plus its wp-scale robustness fit), and write:
    ``relative_scores.csv``, ``glmm.csv/.md`` (coefficients, SEs, p-values, critical PLW, convergence flags),
    ``gam.json`` (optimal PLW per Rg; usable by ``plwlab recommend --model-file``), ``optimal_plw.csv/.md``,
    and the figures ``performance_by_wp``, ``plw_rg_contour`` and (with ``runs``) ``run_metrics`` as PNG + PDF.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rel = relative_scores(results)
    rel.to_csv(out / "relative_scores.csv", index=False)

    fits: dict[str, GLMMFit] = {}
    for dataset, part in rel.groupby("dataset", sort=True):
        fits[dataset] = fit_beta_glmm(part, dataset=dataset)
        log.info("GLMM %s: %s", dataset, fits[dataset].to_dict())
    glmm = pd.DataFrame([f.to_dict() for f in fits.values()])
    glmm.insert(1, "rg", [rel.loc[rel["dataset"] == d, "rg"].iloc[0] for d in glmm["dataset"]])
    glmm.sort_values("rg").to_csv(out / "glmm.csv", index=False)
    columns = ["dataset", "rg", "intercept", "b1", "se_b1", "p_b1", "b2", "se_b2", "p_b2", "critical_plw", "loglik",
               "clean", "boundary"]  # fmt: skip
    (out / "glmm.md").write_text(_markdown(glmm.sort_values("rg")[columns]))

    summary: dict[str, Any] = {"glmm": {d: f.to_dict() for d, f in fits.items()}}
    gams = {}
    if rel["rg"].nunique() >= 3 and rel["plw"].nunique() >= 3:
        for transform in ("identity", "wp"):
            gam = fit_te_gam(rel, x_transform=transform)
            gams[transform] = gam
            summary["gam" if transform == "identity" else "gam_wp"] = {
                "formula": f"y_mm ~ te({'plw' if transform == 'identity' else 'wp'}, rg, k=3) + factor(benchmark)",
                "optimal_plw": {f"{rg:g}": v for rg, v in gam.optimal_plw(RG_GRID).items()},
                "edf": gam.edf, "te_edf": gam.te_edf, "gcv": gam.gcv, "log_lambda": gam.log_lambda.tolist(),
            }  # fmt: skip
        (out / "gam.json").write_text(json.dumps(summary["gam"], indent=2) + "\n")
        (out / "gam_wp.json").write_text(json.dumps(summary["gam_wp"], indent=2) + "\n")
        optimal = pd.DataFrame({
            "rg": RG_GRID,
            "optimal_plw": [summary["gam"]["optimal_plw"][f"{r:g}"] for r in RG_GRID],
            "optimal_plw_wp_fit": [summary["gam_wp"]["optimal_plw"][f"{r:g}"] for r in RG_GRID],
        })  # fmt: skip
        optimal.to_csv(out / "optimal_plw.csv", index=False)
        (out / "optimal_plw.md").write_text(_markdown(optimal))
        figures.plw_rg_contour(gams["identity"], out / "plw_rg_contour", rg_max=max(8.0, rel["rg"].max()))
    else:
        log.warning("the GAM needs at least 3 distinct Rg and PLW values; skipped")
    figures.performance_by_wp(rel, fits, out / "performance_by_wp")
    if runs is not None:
        figures.run_metric_boxplots(runs, out / "run_metrics")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
