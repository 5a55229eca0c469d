"""``plwlab study`` (``make study``): the whole PLW study in one command: train a grid (Hydra multirun), evaluate
every run, analyse the results table, and write the figures and a short report into one study directory.

By default it runs ``experiment=study`` on the embedded offline default (tiny model, bundled sample, CPU); any
train.py override narrows or changes it (e.g. ``trainer.max_steps=2`` for a smoke test, or another experiment).
Training and evaluation run as their own processes (``python -m plwlab.training.main`` / ``plwlab.evaluation.main``,
what train.py and evaluate.py run), in the current directory.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from plwlab.analysis.analyze import analyze_table
from plwlab.analysis.report import write_report
from plwlab.analysis.tracking import log_analysis_run
from plwlab.results import FILE_NAME, read_table


def _run(step: str, command: list[str]) -> float:
    """Run one stage as its own process (its output streams through); raise naming the stage if it fails."""
    print(f"== {step}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    if subprocess.run(command).returncode != 0:
        raise RuntimeError(f"study stage '{step}' failed (command above); fix it and run the study again: finished "
                           "runs are skipped, evaluations are redone")  # fmt: skip
    return time.perf_counter() - start


def wandb_overrides(mode: str, project: str) -> tuple[list[str], list[str]]:
    """The train.py and evaluate.py overrides that log the study to W&B (``mode`` offline or online; off: none)."""
    if mode == "off":
        return [], []
    offline = str(mode == "offline").lower()
    return (["logger=wandb", f"logger.wandb.project={project}", f"logger.wandb.offline={offline}"],
            ["wandb.enabled=true", f"wandb.project={project}", f"wandb.offline={offline}"])  # fmt: skip


def run_study(out_dir: str | Path, train_overrides: list[str] = (), eval_overrides: list[str] = (),
              experiment: str = "study", wandb: str = "offline", project: str = "plwlab") -> dict[str, Any]:  # fmt: skip
    """Train, evaluate and analyse the grid of ``experiment`` (conf/experiment/) into ``out_dir`` (runs under
    ``out_dir/runs``, the results table
    ``out_dir/runs/results.csv``, fits and figures under ``out_dir/analysis``, and ``out_dir/REPORT.md``). With
    ``wandb`` offline (the default) or online, every training run, every evaluation and the analysis are W&B runs
    of the group ``experiment`` in ``project`` (offline: written beside each for ``wandb sync``; ``plwlab
    dashboard`` builds their view and report)."""
    out = Path(out_dir).resolve()
    runs = out / "runs"
    seconds = {}
    train_wandb, eval_wandb = wandb_overrides(wandb, project)
    seconds["train"] = _run("train", [sys.executable, "-m", "plwlab.training.main", "-m", f"experiment={experiment}",
                                      f"hydra.sweep.dir={runs}", f"name={experiment}", *train_wandb,
                                      *train_overrides])  # fmt: skip
    table_path = runs / FILE_NAME
    if table_path.exists():
        table_path.unlink()  # a rerun evaluates again: one fresh table, never rows of two studies
    seconds["evaluate"] = _run("evaluate", [sys.executable, "-m", "plwlab.evaluation.main", f"run_dir='{runs}/*'",
                                            *eval_wandb, *eval_overrides])  # fmt: skip
    start = time.perf_counter()
    summary = analyze_table(table_path, out / "analysis", runs)
    table = read_table(table_path)
    if wandb != "off":
        log_analysis_run(out / "analysis", experiment, project, wandb)
    seconds["analyze"] = time.perf_counter() - start
    write_report(out, table, summary, seconds, list(train_overrides))
    print(f"== study written to {out} (REPORT.md)" + ("" if wandb == "off" else
          f"; W&B group {experiment} in project {project} ({wandb}); its view and report: plwlab dashboard {out} "
          "--dry-run (or --entity E to save)"), flush=True)  # fmt: skip
    return summary
