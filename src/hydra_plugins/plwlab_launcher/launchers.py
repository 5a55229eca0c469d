"""plwlab's Hydra launchers (Hydra finds launchers in ``hydra_plugins``; what they do is :mod:`plwlab.training.launch`).

``hydra/launcher=plwlab`` (train.py's default): the sweep points one after another on this node; a point of one
process runs in this process, a point of several (``trainer.devices`` > 1) in its own torchrun process group.
``hydra/launcher=torchrun``: every point in its own torchrun process group (fresh processes even for one device).
``hydra/launcher=slurm``: one SLURM job per point through submitit, its request derived from the point's trainer,
watched until it ends (no accounting needed), requeued on time limits and preemption.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


class PlwlabLauncher(Launcher):
    def __init__(self, always_torchrun: bool = False, script: str | None = None) -> None:
        self.always_torchrun, self.script = always_torchrun, script

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        # Hydra imports every plugin module at startup (evaluate.py and `plwlab stats` too): torch only from here on
        from plwlab.training.checkpointing import Preempted

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        results = []
        try:
            self._launch(job_overrides, initial_job_idx, sweep_dir, results)
        except (KeyboardInterrupt, Preempted) as e:  # the run under way saved what it could and says so
            print(f"\nsweep stopped ({e}): the points not started are left for a relaunch", file=sys.stderr, flush=True)
        return results  # the summary (sweep.SweepCallback) follows, also after a stop

    def _launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int, sweep_dir: Path,
                results: list[JobReturn]) -> None:  # fmt: skip
        from plwlab.config import ConfigError, batch_geometry
        from plwlab.rundir import record_failure
        from plwlab.training.launch import LaunchError, record_exit, supervise, torchrun_command
        from plwlab.training.sweep import override_dirname

        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("#%d : %s", idx, " ".join(filter_overrides(overrides)))
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(config):
                config.hydra.job.id = config.hydra.job.num = idx
            run_dir = sweep_dir / override_dirname(list(overrides), self.config)
            try:
                geometry = batch_geometry(config)
            except ConfigError:
                geometry = None  # the run itself reports the bad value, in this process
            if geometry is not None and geometry.nodes > 1:
                record_failure(run_dir, LaunchError(f"trainer.num_nodes={geometry.nodes}: this launcher runs on one node; "
                                                    "use hydra/launcher=slurm for several nodes"))  # fmt: skip
                continue
            if geometry is not None and (self.always_torchrun or geometry.world_size > 1):
                command = torchrun_command(self.script or sys.argv[0], overrides, run_dir, geometry.devices)
                code = supervise(command)
                record_exit(run_dir, code)
                results.append(JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=code,
                                         working_dir=str(run_dir), task_name=self.config.hydra.job.name))  # fmt: skip
            else:
                results.append(run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=config,
                                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir"))  # fmt: skip
                configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)


DERIVED = ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb")  # from the trainer, or explicit


class SlurmLauncher(SubmititSlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        # Hydra imports every plugin module at startup: submitit and torch only from here on
        import submitit

        from plwlab.rundir import record_failure
        from plwlab.training.launch import LaunchError, check_slurm_timing, slurm_resources, watch_slurm_jobs
        from plwlab.training.sweep import override_dirname

        params = self.params
        try:
            check_slurm_timing(params["timeout_min"], params["signal_delay_s"], params["max_num_timeout"])
        except LaunchError as e:
            raise SystemExit(f"error: {e}") from None
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        groups: dict[str, list[tuple[int, list[str], Path]]] = {}  # one job array per distinct request
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("#%d : %s", idx, " ".join(filter_overrides(overrides)))
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            # evaluate.py's jobs have no trainer: one task, GPUs as hydra.launcher.gpus_per_node asks
            trainer = OmegaConf.to_container(config.trainer, resolve=True) if "trainer" in config else {}
            request = slurm_resources(trainer, params)
            run_dir = sweep_dir / override_dirname(list(overrides), self.config)
            groups.setdefault(json.dumps(request, sort_keys=True), []).append((idx, list(overrides), run_dir))
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        fixed = {"submitit_folder", "max_num_timeout", *DERIVED}
        settings = {k if k in base else f"slurm_{k}": v for k, v in params.items() if k not in fixed}
        watched: dict[str, tuple[object, Path, dict]] = {}
        order: list[tuple[str, list[str], Path]] = []
        for key, members in groups.items():
            request = json.loads(key)
            executor = submitit.AutoExecutor(folder=params["submitit_folder"], cluster="slurm",
                                             slurm_max_num_timeout=params["max_num_timeout"])  # fmt: skip
            executor.update_parameters(**settings, **{k: v for k, v in request.items() if v is not None})
            arguments = [(o, "hydra.sweep.dir", i, f"job_id_for_{i}", Singleton.get_state()) for i, o, _ in members]
            try:
                jobs = executor.map_array(self, *zip(*arguments))
            except submitit.core.utils.FailedJobError as e:  # sbatch refused the request
                reason = str(e).strip().splitlines()[-1] if str(e).strip() else "sbatch failed"
                asked = ", ".join(f"{k}={v}" for k, v in request.items() if v is not None)
                for _, overrides, run_dir in members:
                    record_failure(run_dir, LaunchError(f"sbatch refused the request ({asked}): {reason}"))
                continue
            for job, (_, overrides, run_dir) in zip(jobs, members):
                log.info("SLURM job %s: %s", job.job_id, run_dir)
                watched[job.job_id] = (job, run_dir, request)
                order.append((job.job_id, overrides, run_dir))
        watch_slurm_jobs(watched, poll_s=float(os.environ.get("PLWLAB_SLURM_POLL_S", 5)),
                         grace_s=float(os.environ.get("PLWLAB_SLURM_GRACE_S", 60)))
        results = []
        for job_id, overrides, run_dir in order:
            job = watched[job_id][0]
            try:  # only a job with a result file: submitit would wait forever for one without (no sacct to ask)
                if job.paths.result_pickle.exists():
                    results.append(job.results()[0])
                    continue
            except Exception as e:  # the job raised
                record_failure(run_dir, LaunchError(f"SLURM job {job_id}: {str(e).strip().splitlines()[-1][:500]}"))
            results.append(JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=None,
                                     working_dir=str(run_dir), task_name=self.config.hydra.job.name))  # fmt: skip
        return results
