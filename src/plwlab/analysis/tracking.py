"""The analysis as one W&B run (``job_type=analysis``, in the sweep's group, beside its training and eval runs):
the tables of an analysis directory as W&B Tables, its figures as images and each fit's headline numbers in the
summary (``plwlab analyze --wandb``, ``plwlab study``). The keys are the ones ``plwlab dashboard``'s report shows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

TABLES = ("glmm", "optimal_plw", "relative_scores")  # <analysis dir>/<name>.csv, logged as analysis/<name>
FIGURES = ("performance_by_wp", "plw_rg_contour", "run_metrics")  # <analysis dir>/<name>.png, as figures/<name>


def table_key(name: str) -> str:
    return f"analysis/{name}"


def figure_key(name: str) -> str:
    return f"figures/{name}"


def fit_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """Each fit's headline numbers, flat: ``glmm/<dataset>/{b1,b2,critical_plw,clean}`` and
    ``gam/optimal_plw/rg=<rg>``."""
    out: dict[str, Any] = {}
    for dataset, fit in summary.get("glmm", {}).items():
        out.update({f"glmm/{dataset}/{k}": fit[k] for k in ("b1", "b2", "critical_plw", "clean")})
    for rg, plw in (summary.get("gam") or {}).get("optimal_plw", {}).items():
        out[f"gam/optimal_plw/rg={rg}"] = plw
    return out


def log_analysis_run(analysis_dir: str | Path, group: str, project: str = "plwlab", mode: str = "offline",
                     entity: str | None = None) -> str:  # fmt: skip
    """Log the analysis in ``analysis_dir`` (``plwlab analyze``'s output) as one W&B run in ``group``; ``mode``
    offline writes it under ``<analysis_dir>/wandb`` for ``wandb sync``. Returns the run's id."""
    import wandb  # imported only when W&B logging is on

    out = Path(analysis_dir)
    summary = json.loads((out / "summary.json").read_text())
    with wandb.init(project=project, entity=entity, group=group, job_type="analysis", name=f"{group}-analysis",
                    dir=str(out), mode=mode, config={"sweep": group, "analysis_dir": str(out.resolve())}) as run:  # fmt: skip
        logged: dict[str, Any] = {}
        for name in TABLES:
            if (out / f"{name}.csv").exists():
                logged[table_key(name)] = wandb.Table(dataframe=pd.read_csv(out / f"{name}.csv"))
        for name in FIGURES:
            if (out / f"{name}.png").exists():
                logged[figure_key(name)] = wandb.Image(str(out / f"{name}.png"))
        run.log(logged)
        run.summary.update(fit_summary(summary))
        return run.id
