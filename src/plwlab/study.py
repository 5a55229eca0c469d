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
from plwlab.results import FILE_NAME, read_table


def _run(step: str, command: list[str]) -> float:
    """Run one stage as its own process (its output streams through); raise naming the stage if it fails."""
    print(f"== {step}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    if subprocess.run(command).returncode != 0:
        raise RuntimeError(f"study stage '{step}' failed (command above); fix it and run the study again: finished "
                           "runs are skipped, evaluations are redone")  # fmt: skip
    return time.perf_counter() - start


def run_study(out_dir: str | Path, train_overrides: list[str] = (), eval_overrides: list[str] = (),
              experiment: str = "study") -> dict[str, Any]:  # fmt: skip
    """Train, evaluate and analyse the grid of ``experiment`` (conf/experiment/) into ``out_dir`` (runs under
    ``out_dir/runs``, the results table
    ``out_dir/runs/results.csv``, fits and figures under ``out_dir/analysis``, and ``out_dir/REPORT.md``)."""
    out = Path(out_dir).resolve()
    runs = out / "runs"
    seconds = {}
    seconds["train"] = _run("train", [sys.executable, "-m", "plwlab.training.main", "-m", f"experiment={experiment}",
                                      f"hydra.sweep.dir={runs}", f"name={experiment}", *train_overrides])  # fmt: skip
    table_path = runs / FILE_NAME
    if table_path.exists():
        table_path.unlink()  # a rerun evaluates again: one fresh table, never rows of two studies
    seconds["evaluate"] = _run("evaluate", [sys.executable, "-m", "plwlab.evaluation.main", f"run_dir='{runs}/*'",
                                            *eval_overrides])  # fmt: skip
    start = time.perf_counter()
    summary = analyze_table(table_path, out / "analysis", runs)
    table = read_table(table_path)
    seconds["analyze"] = time.perf_counter() - start
    write_report(out, table, summary, seconds, list(train_overrides))
    print(f"== study written to {out} (REPORT.md)", flush=True)
    return summary
