"""Hydra callbacks of train.py: an output directory that cannot be written is one line of error
(:class:`OutputDirCheck`); a sweep prints its plan before launching (``plan_only=true`` stops there) and a summary
of finished / skipped / resumed / failed runs at the end, read from each run's ``status.json`` (so it also works
for jobs that ran elsewhere, e.g. on SLURM) (:class:`SweepCallback`)."""

from __future__ import annotations

import itertools
import json
import os
import secrets
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table

from plwlab.config import ConfigError, check_name, validate_train
from plwlab.files import safe_dirname
from plwlab.rundir import SWEEP_ID, RunDir, RunError, RunState, check_writable, config_digest, find_runs, now

console = Console()


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """The override lists of every job of the sweep, as Hydra's basic sweeper expands them (command-line
    overrides plus ``hydra.sweeper.params``; the command line wins)."""
    task = list(config.hydra.overrides.task)
    given = {o.split("=", 1)[0].lstrip("+~") for o in task}
    params = config.hydra.sweeper.get("params") or {}
    task += [f"{k}={v}" for k, v in params.items() if k not in given]
    parsed = OverridesParser.create().parse_overrides(task)
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in parsed]  # fmt: skip
    return [list(combo) for combo in itertools.product(*choices)]


def override_dirname(overrides: list[str], config: DictConfig) -> str:
    """A job's run-directory name: Hydra's ``override_dirname`` (sorted key=value pairs, excluded keys dropped) made
    flat and safe, as ``hydra.sweep.subdir`` in conf/train.yaml does."""
    spec = config.hydra.job.config.override_dirname
    kept = sorted(o for o in overrides if o.split("=", 1)[0] not in set(spec.exclude_keys))
    return safe_dirname(spec.item_sep.join(kept))


def read_statuses(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """Run directory (relative to ``sweep_dir``) -> its status, for every run below ``sweep_dir``."""
    return {str(run.path.relative_to(sweep_dir)): run.status() for run in find_runs(sweep_dir)}


def job_config(config: DictConfig, job: list[str]) -> DictConfig:
    """The config the job of these overrides gets (what its train() reads: no ``hydra`` node)."""
    composed = GlobalHydra.instance().config_loader().load_sweep_config(config, job)
    with open_dict(composed):
        del composed["hydra"]
    return composed


def check_points(config: DictConfig, jobs: list[list[str]]) -> dict[int, DictConfig]:
    """Every point's config, composed and checked (:func:`plwlab.config.validate_train`) before the first point
    trains: a bad value in any point (``-m plw=0,2.0``) stops the launch with one line naming the points, nothing
    started. Returns point index -> its config."""
    configs, bad = {}, []
    for i, job in enumerate(jobs):
        try:
            configs[i] = job_config(config, job)
            validate_train(configs[i])
        except Exception as e:  # ConfigError, or what Hydra/OmegaConf refuse at composition (plw=abc)
            point = " ".join(o for o in job if not all(o in other for other in jobs))  # what varies
            bad.append(f"#{i} ({point or ' '.join(job)}): {str(e).strip().splitlines()[0]}")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise SystemExit(f"error: sweep point {'; '.join(bad[:3])}{more}; nothing was launched (of {len(jobs)} points, "
                         f"{len(bad)} refused)")  # fmt: skip
    return configs


class OutputDirCheck(Callback):
    """An output directory that cannot be created, or a ``name`` that would put it outside ``paths.output_dir``, is
    one line of error before Hydra creates anything (and fails with a traceback)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(config.hydra.run.dir, config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(config.hydra.sweep.dir, config)


def _check_writable(directory: str, config: DictConfig) -> None:
    try:
        if "name" in config:
            check_name(config.name)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        check_writable(directory)
    except RunError as e:
        raise SystemExit(f"error: {e}") from None


class SweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = now()  # compared with the runs' status timestamps: one format
        self.sweep_id = secrets.token_hex(6)  # this launch: its jobs' refusals carry it (also on SLURM, via env)
        os.environ[SWEEP_ID] = self.sweep_id
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sweep_jobs(config)
        configs = check_points(config, jobs)
        statuses = read_statuses(sweep_dir) if sweep_dir.exists() else {}
        table = Table(title=f"Sweep plan: {len(jobs)} runs in {sweep_dir}")
        table.add_column("#", justify="right")
        table.add_column("run")
        table.add_column("state")
        counts: dict[str, int] = {}
        first: dict[str, int] = {}  # run directory -> the first point that trains in it
        for i, job in enumerate(jobs):
            run = override_dirname(job, config)
            status = statuses.get(run, {})
            state = status.get("status", "new")
            state = {RunState.FINISHED: "done (skip)", RunState.RUNNING: "interrupted (resume)",
                     RunState.INTERRUPTED: "interrupted (resume)", RunState.REQUEUED: "requeued (resume)",
                     RunState.FAILED: "failed (retry)"}.get(state, state)  # fmt: skip
            if "config_digest" in status and status["config_digest"] != config_digest(configs[i]):
                state = "different config (refused)"  # e.g. trainer.devices changed the global batch
            if run in first:
                state = f"repeats #{first[run]} (one run)"  # -m plw=0.1,0.1: the same run directory, trained once
            first.setdefault(run, i)
            counts[state] = counts.get(state, 0) + 1
            table.add_row(str(i), " ".join(job), state)
        console.print(table)
        console.print("; ".join(f"{n} {s}" for s, n in counts.items()))
        if config.get("plan_only"):
            console.print("plan_only=true: nothing launched")
            raise SystemExit(0)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summary: dict[str, list[str]] = {k: [] for k in ("finished", "skipped", "resumed", "failed", "refused", "unfinished")}
        sweep_id = getattr(self, "sweep_id", None)
        runs = {name: RunDir(sweep_dir / name) for name in sorted({override_dirname(job, config) for job in sweep_jobs(config)})}
        stopped_by = None  # the signal that stopped this launch (Ctrl-C, SIGTERM), as the run it stopped says
        for run in runs.values():
            status = run.status()
            if run.state in (RunState.INTERRUPTED, RunState.REQUEUED) and status.get("sweep_id") == sweep_id:
                stopped_by = stopped_by or status.get("stopped_by") or "a signal"
        for name, run in runs.items():
            kind, line = self._outcome(run, name, stopped=stopped_by is not None)
            summary[kind].append(line)
            run.forget_refusal(sweep_id)  # summarised: this launch's refusal is no longer needed
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "sweep_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        launch = {"sweep_id": sweep_id, "started": getattr(self, "started", None),
                  "ended": now(), **summary}  # fmt: skip
        with open(sweep_dir / "sweep_summaries.jsonl", "a") as f:  # every launch's own, one line each (O_APPEND)
            f.write(json.dumps(launch) + "\n")
        console.print("\nSweep summary: " + ", ".join(f"{len(v)} {k}" for k, v in summary.items() if v), markup=False)
        for kind in ("failed", "refused", "unfinished"):
            for line in summary[kind]:
                console.print(f"  {kind.upper()} {line}", markup=False)
        if stopped_by:
            raise SystemExit(f"interrupted (stopped by {stopped_by}): relaunch the same command to resume (finished "
                             "runs are skipped, interrupted ones resume from their last checkpoint)")  # fmt: skip
        if summary["failed"] or summary["refused"] or summary["unfinished"]:  # scripts, SLURM and CI rely on it
            raise SystemExit(1)

    def _outcome(self, run: RunDir, name: str, stopped: bool = False) -> tuple[str, str]:
        """How one run ended for this launch, from its run directory (so also for jobs that ran elsewhere): this
        launch's refusal, failed, finished by this launch (resumed), skipped (finished before, or by another launch
        of the sweep meanwhile) or not finished (no status: it never started; running/interrupted/requeued: its
        processes ended without finishing; with ``stopped``, the launch was stopped before it started the run)."""
        started, status = getattr(self, "started", ""), run.status()
        sweep_id = getattr(self, "sweep_id", None)
        refusal = run.refusal(sweep_id)
        if refusal:
            return "refused", f"{name}: {refusal}"
        if run.state is RunState.FAILED:
            return "failed", f"{name}: {status.get('error')}"
        if run.finished:
            trained_here = status.get("sweep_id") == sweep_id and status.get("started", "") >= started
            if trained_here:  # also when a repeated point of this launch skipped it afterwards
                return ("resumed" if status.get("resumed_from") else "finished"), name
            return "skipped", name
        if run.state is None and stopped:
            return "unfinished", f"{name}: not started (the sweep was stopped first)"
        if run.state is None:
            return "failed", f"{name}: it never started (no status.json; see the launcher's log)"
        return "unfinished", f"{name}: ended while {run.state} (relaunch the sweep to resume it)"
