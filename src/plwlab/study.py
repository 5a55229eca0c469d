"""``plwlab study`` (``make study``): the whole PLW study in one command: train a grid (Hydra multirun), evaluate
every run, analyse the results table, and write the figures and a short report into one study directory.

By default it runs ``experiment=study`` on the embedded offline default (tiny model, bundled sample, CPU); any
train.py override narrows or changes it (e.g. ``trainer.max_steps=2`` for a smoke test, or another experiment).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # train.py and evaluate.py live at the repository root


def _run(step: str, command: list[str]) -> float:
    """Run one stage as its own process (its output streams through); raise naming the stage if it fails."""
    print(f"== {step}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        raise RuntimeError(f"study stage '{step}' failed (command above); fix it and run the study again: finished "
                           "runs are skipped, evaluations are redone")  # fmt: skip
    return time.perf_counter() - start


def run_study(out_dir: str | Path, train_overrides: list[str] = (), eval_overrides: list[str] = ()) -> dict[str, Any]:
    """Train, evaluate and analyse a study into ``out_dir`` (runs under ``out_dir/runs``, the results table
    ``out_dir/runs/results.csv``, fits and figures under ``out_dir/analysis``, and ``out_dir/REPORT.md``)."""
    import pandas as pd

    from plwlab.analysis import primary_scores
    from plwlab.report import analyze, collect_runs, run_metrics

    out = Path(out_dir).resolve()
    runs = out / "runs"
    seconds = {}
    seconds["train"] = _run("train", [sys.executable, "train.py", "-m", "experiment=study", f"hydra.sweep.dir={runs}",
                                      "name=study", *train_overrides])  # fmt: skip
    table_path = runs / "results.csv"
    if table_path.exists():
        table_path.unlink()  # a rerun evaluates again: one fresh table, never rows of two studies
    seconds["evaluate"] = _run("evaluate", [sys.executable, "evaluate.py", f"run_dir='{runs}/*'", *eval_overrides])
    start = time.perf_counter()
    table = pd.read_csv(table_path)
    summary = analyze(primary_scores(table), out / "analysis", run_metrics(table, collect_runs(runs)))
    seconds["analyze"] = time.perf_counter() - start
    write_report(out, table, summary, seconds, list(train_overrides))
    print(f"== study written to {out} (REPORT.md)", flush=True)
    return summary


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
        "With the embedded default (a tiny randomly initialised model, 400 examples) the numbers check the pipeline; "
        "they say nothing about PLW.", "",
        "| dataset | Rg |", "|---|---|", *(f"| {d} | {rg:.3g} |" for d, rg in datasets.itertuples(index=False)), "",
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
