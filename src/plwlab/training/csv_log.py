"""``metrics.csv`` of a run directory: Lightning's CSV logger, but one file for the whole run across resumptions.

Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts. A resumed run keeps it instead: the
earlier attempts' rows up to the step the new attempt logs first (later ones were recomputed from the checkpoint)
stay, every row says which ``attempt`` of the run (``status.json``'s count) logged it, and the file is rewritten
atomically, so a crash while rewriting leaves the old one.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from plwlab.files import atomic_write
from plwlab.rundir import RunDir


class RunCSVLogger(CSVLogger):
    """:class:`~lightning.pytorch.loggers.CSVLogger` writing ``<save_dir>/metrics.csv`` (and ``hparams.yaml``) for
    the whole run: earlier attempts' rows are kept, with an ``attempt`` column."""

    def __init__(self, save_dir: str, flush_logs_every_n_steps: int = 100) -> None:
        super().__init__(save_dir, name="", version="", flush_logs_every_n_steps=flush_logs_every_n_steps)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = RunMetricsWriter(self.log_dir)
        return self._experiment


class RunMetricsWriter(ExperimentWriter):
    """Lightning's writer, continuing an existing ``metrics.csv`` instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        self.attempt = RunDir(log_dir).status().get("attempts") or 1
        self.earlier: list[dict[str, Any]] | None = None
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning deletes metrics.csv here
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                self.earlier = list(csv.DictReader(file))

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics_dict, step)
        self.metrics[-1]["attempt"] = self.attempt

    def save(self) -> None:
        if self.earlier is None or not self.metrics:
            super().save()
            return
        first = min(m["step"] for m in self.metrics)
        kept = [row for row in self.earlier if row.get("step") not in (None, "") and float(row["step"]) < first]
        self.metrics = [{k: v for k, v in row.items() if v != ""} for row in kept] + self.metrics
        self._record_new_keys()
        with atomic_write(self.metrics_file_path) as tmp, open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(self.metrics)
        self.metrics, self.earlier = [], None
