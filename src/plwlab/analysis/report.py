"""The study's ``REPORT.md``: the grid trained, each dataset's Rg, the GLMM and GAM tables and the figures of an
analysis directory, in one page (``plwlab study``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


TINY_MODEL = "tiny-llama"  # conf/model/tiny.yaml's name: the caveat above its numbers


def score_table(table: Any) -> str:
    """Every row of the results table as one markdown table: a line per benchmark and metric (with the largest
    n), a column per dataset and PLW."""
    wide = table.pivot_table(index=["benchmark", "metric"], columns=["dataset", "plw"], values="score", aggfunc="first")
    wide.columns = [f"{d} PLW {p:g}" for d, p in wide.columns]
    wide["n"] = table.groupby(["benchmark", "metric"])["n"].max()
    return wide.reset_index().to_markdown(index=False, floatfmt=".4g")


def write_report(out: Path, table: Any, summary: dict[str, Any], seconds: dict[str, float], overrides: list[str]) -> Path:
    """``REPORT.md``: the grid, each dataset's Rg, the GLMM and GAM tables and the figures."""
    analysis = out / "analysis"
    datasets = table.drop_duplicates("dataset").sort_values("rg")[["dataset", "rg"]]
    lines = [
        "# PLW study", "",
        f"{table['run_id'].nunique()} runs: PLW {', '.join(f'{p:g}' for p in sorted(table['plw'].unique()))} x "
        f"{len(datasets)} datasets, model {', '.join(sorted(table['model'].unique()))}"
        + (f"; overrides: `{' '.join(overrides)}`" if overrides else "") + ".",
        "Stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ".",
        *(["With the embedded default (a tiny randomly initialised model, 400 examples) the numbers check the "
           "pipeline; they say nothing about PLW."] if set(table["model"]) <= {TINY_MODEL} else []), "",
        "| dataset | Rg |", "|---|---|", *(f"| {d} | {rg:.3g} |" for d, rg in datasets.itertuples(index=False)), "",
        "## Scores per PLW", "", score_table(table), "",
        "## Beta GLMM per dataset (`analysis/glmm.md`)", "",
        (analysis / "glmm.md").read_text() if (analysis / "glmm.md").exists() else "No dataset could be fitted.",
    ]  # fmt: skip
    lines += [f"- {d}: skipped: {why}" for d, why in summary.get("glmm_skipped", {}).items()]
    lines += ["", "## Optimal PLW by Rg (GAM, `analysis/optimal_plw.md`)", ""]
    lines += [(analysis / "optimal_plw.md").read_text() if (analysis / "optimal_plw.md").exists()
              else f"GAM skipped: {summary.get('gam_skipped')}"]  # fmt: skip
    lines += ["", "## Figures", ""]
    lines += [f"![{p.stem}](analysis/{p.name})" for p in sorted(analysis.glob("*.png"))]
    report = out / "REPORT.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "study.json").write_text(json.dumps({"seconds": seconds, "overrides": overrides}, indent=2) + "\n")
    return report
