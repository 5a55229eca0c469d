"""Hydra launcher ``hydra/launcher=torchrun``: the jobs of a sweep one after another, each in its own torchrun
process group (one process per device), so every sweep point gets fresh processes and all of the node's GPUs."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class TorchrunLauncher(Launcher):
    def __init__(self, nproc_per_node: int, script: str | None = None) -> None:
        self.nproc_per_node, self.script = int(nproc_per_node), script

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from plwlab.training.sweep import override_dirname

        sweep_dir = Path(self.config.hydra.sweep.dir)
        script = self.script or sys.argv[0]
        results = []
        for i, overrides in enumerate(job_overrides):
            run_dir = sweep_dir / override_dirname(list(overrides), self.config)
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc-per-node={self.nproc_per_node}", script, *overrides, f"hydra.run.dir='{run_dir}'"]  # fmt: skip
            log.info("job %d: %s", initial_job_idx + i, " ".join(overrides))
            code = subprocess.run(command).returncode
            # a failed job is recorded in its status.json (the sweep summary lists it); the sweep goes on
            results.append(JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=code,
                                     working_dir=str(run_dir), task_name=self.config.hydra.job.name))  # fmt: skip
        return results
