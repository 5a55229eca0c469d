"""Launching the runs of a sweep, on this node or on SLURM: the logic of the two Hydra launchers.

- ``hydra/launcher=plwlab`` (the default; ``torchrun``): a run of one process in the launcher's own process (as
  Hydra's basic launcher does), a run of several in its own torchrun process group (:func:`torchrun_command`,
  :func:`supervise`), so that its exit code counts, a signal to the launcher reaches every rank, and the ranks
  never outlive the launcher (:func:`die_with_parent`).
- ``hydra/launcher=slurm``: one job array per distinct resource request derived from the trainer
  (:func:`slurm_resources`), its timing checked against requeues (:func:`check_slurm_timing`), and the jobs
  watched with ``squeue`` until they end (:func:`watch_slurm_jobs`).

The launcher classes themselves are in ``src/hydra_plugins/plwlab_launcher/launchers.py``: Hydra discovers
launchers only in the ``hydra_plugins`` namespace package. docs/cluster.md shows both in use.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args as parse_torchrun_args
from torch.distributed.run import run as run_torchrun

from plwlab.rundir import SWEEP_ID, RunDir, RunState, record_failure

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
DIE_WITH_PARENT = "PLWLAB_DIE_WITH_PARENT"  # set for the processes a launcher starts: see die_with_parent()


class LaunchError(RuntimeError):
    """A run could not be launched as configured."""


def die_with_parent() -> None:
    """In a process a plwlab launcher started (:data:`DIE_WITH_PARENT` set: torchrun's ranks), ask Linux to send it
    SIGTERM when its parent dies, so that a killed launcher or torchrun agent leaves no rank training unsupervised."""
    if os.environ.get(DIE_WITH_PARENT):
        _pdeathsig()


def _pdeathsig() -> None:
    if sys.platform.startswith("linux"):  # prctl(PR_SET_PDEATHSIG, SIGTERM)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def torchrun_command(script: str, overrides: Sequence[str], run_dir: Path, nproc_per_node: int) -> list[str]:
    """torchrun starting ``script`` (train.py) as one run with ``overrides`` in ``run_dir``, one process per device."""
    return [sys.executable, "-m", "plwlab.training.launch", "--standalone", f"--nproc-per-node={nproc_per_node}",
            script, *overrides, f"hydra.run.dir='{run_dir}'"]  # fmt: skip


def torchrun(argv: Sequence[str]) -> None:
    """torchrun (``torch.distributed.run``) with ``argv``, ending in one line instead of torchrun's traceback when
    a rank fails or a signal stops the group (the ranks' own lines say why; the exit code is 1)."""
    try:
        run_torchrun(parse_torchrun_args(list(argv)))
    except SignalException as e:
        raise SystemExit(f"torchrun: stopped by {signal.Signals(e.sigval).name}, and its ranks with it") from None
    except ChildFailedError as e:
        ranks = "; ".join(f"rank {rank}: exit code {f.exitcode}" for rank, f in sorted(e.failures.items()))
        raise SystemExit(f"torchrun: {ranks}") from None


def supervise(command: list[str]) -> int:
    """Run ``command`` in its own process group and return its exit code. SIGINT and SIGTERM sent to this process
    are passed to the whole group (torchrun and every rank); if this process dies, torchrun is sent SIGTERM and
    its ranks follow it (:func:`die_with_parent`). A forwarded signal ends the sweep after the group has stopped."""
    env = {**os.environ, DIE_WITH_PARENT: "1"}
    proc = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_pdeathsig)
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        _signal_group(proc.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:  # this process is being torn down by an exception: take the group with it
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        _signal_group(proc.pid, signal.SIGKILL)  # ranks that outlived torchrun
    if received:
        raise KeyboardInterrupt(f"stopped by {signal.Signals(received[0]).name}")
    return code


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def record_exit(run_dir: Path, code: int) -> None:
    """After a run's process group exited with ``code``: a run that did not say why it failed (an error before
    training started, a crash on another rank than 0, a killed rank) is marked failed with the exit code."""
    if code == 0:
        return
    run = RunDir(run_dir)
    status = run.state
    if status is RunState.FAILED or run.finished or run.refusal(os.environ.get(SWEEP_ID)):
        return
    what = f"exit code {code}" if code > 0 else f"killed by {signal.Signals(-code).name}"
    reason = f"its processes ended with {what}" + (f" while the run was {status}" if status else " before it started")
    record_failure(run_dir, LaunchError(f"{reason} (see the job's log in {run_dir})"))


# -- SLURM (hydra/launcher=slurm, through submitit)

# pending reasons SLURM gives a job it can never start as requested (squeue %r)
UNSATISFIABLE = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidAccount",
                 "InvalidQOS", "QOSMaxCpuPerJobLimit", "QOSMaxGRESPerJob", "QOSMaxMemoryPerJob", "QOSMaxNodePerJobLimit")  # fmt: skip
GPU_ACCELERATORS = ("gpu", "cuda")
CPUS_PER_GPU_TASK, CPUS_PER_CPU_TASK = 8, 1  # defaults of cpus_per_task
GB_PER_GPU, GB_PER_CPU_TASK = 64, 4  # defaults of mem_gb, per node


def slurm_resources(trainer: dict, params: dict) -> dict:
    """The SLURM request of a job from its trainer (``trainer.num_nodes`` nodes, one task per device, GPUs only
    for a GPU trainer) and the launcher's explicit settings, which win. Defaults: ``cpus_per_task`` 8 per GPU task,
    1 per CPU task; ``mem_gb`` 64 per GPU, 4 per CPU task (per node)."""
    gpus = params.get("gpus_per_node")
    on_gpu = str(trainer.get("accelerator")) in GPU_ACCELERATORS or bool(gpus)
    tasks = int(gpus) if gpus else int(trainer.get("devices", 1))
    return {
        "nodes": int(trainer.get("num_nodes", 1)),
        "tasks_per_node": tasks,
        "gpus_per_node": tasks if on_gpu else None,
        "cpus_per_task": params.get("cpus_per_task") or (CPUS_PER_GPU_TASK if on_gpu else CPUS_PER_CPU_TASK),
        "mem_gb": params.get("mem_gb") or tasks * (GB_PER_GPU if on_gpu else GB_PER_CPU_TASK),
    }


def check_slurm_timing(timeout_min: int, signal_delay_s: int, max_num_timeout: int) -> None:
    """The time-limit warning must come before the limit and leave the job time to run: SIGUSR2 arrives
    ``signal_delay_s`` before ``timeout_min`` (SLURM may send it up to ~30 s earlier), and the run then saves a
    checkpoint and requeues itself (up to ``max_num_timeout`` times)."""
    if signal_delay_s < 30:
        raise LaunchError(f"hydra.launcher.signal_delay_s={signal_delay_s} leaves no time to save a checkpoint before "
                          "the time limit; use at least 30 (300 for a 7B FSDP checkpoint)")  # fmt: skip
    if signal_delay_s + 30 >= timeout_min * 60:
        raise LaunchError(f"hydra.launcher.signal_delay_s={signal_delay_s} is not well below the time limit "
                          f"timeout_min={timeout_min} ({timeout_min * 60} s): the checkpoint signal would come before "
                          "training starts; raise timeout_min or lower signal_delay_s")  # fmt: skip
    if max_num_timeout < 0:
        raise LaunchError(f"hydra.launcher.max_num_timeout={max_num_timeout} must be >= 0")


def squeue(job_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """SLURM's state and pending reason of those of ``job_ids`` it still lists (pending, running, completing);
    a job that ended is absent."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    done = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(arrays)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    if done.returncode != 0 and "Invalid job id" not in done.stderr:
        raise LaunchError(f"squeue failed: {done.stderr.strip()}")
    rows = (line.split("|") for line in done.stdout.splitlines() if line.count("|") == 2)
    return {job_id: (state, reason) for job_id, state, reason in rows}


def watch_slurm_jobs(jobs: dict[str, tuple[Any, Path, dict]], poll_s: float = 5.0, grace_s: float = 60.0) -> None:
    """Wait until every job (id -> (submitit job, run dir, request)) has a result, or has ended without one, or
    can never start: those are recorded as failed in their run directory and cancelled. A job seen running and then
    pending again was requeued, and its run says so. Needs no accounting (sacct): SLURM's queue and the result
    files tell it all, so a job that vanishes ends the wait after ``grace_s``."""
    waiting = dict(jobs)
    ran: set[str] = set()
    gone: dict[str, float] = {}
    while waiting:
        queue = squeue(list(waiting))
        for job_id, (job, run_dir, request) in list(waiting.items()):
            if job.paths.result_pickle.exists():
                del waiting[job_id]
                continue
            state, reason = queue.get(job_id, (None, None))
            if state is None:
                gone.setdefault(job_id, time.monotonic())
                if time.monotonic() - gone[job_id] > grace_s:
                    record_failure(run_dir, LaunchError(f"SLURM job {job_id} ended without a result (killed, out of "
                                                        f"memory or its node failed; see {job.paths.stderr})"))  # fmt: skip
                    del waiting[job_id]
                continue
            gone.pop(job_id, None)
            if state == "RUNNING":
                ran.add(job_id)
            elif state == "PENDING" and reason in UNSATISFIABLE:
                subprocess.run(["scancel", job_id], capture_output=True, timeout=60)
                asked = ", ".join(f"{k}={v}" for k, v in request.items() if v is not None)
                record_failure(run_dir, LaunchError(f"SLURM cannot start job {job_id} as requested ({asked}): pending "
                                                    f"with reason {reason}; cancelled. Fit the request to the partition "
                                                    "(sinfo -o '%P %c %m %G %l') with hydra.launcher.*"))  # fmt: skip
                del waiting[job_id]
            elif state == "PENDING" and job_id in ran:
                ran.discard(job_id)
                RunDir(run_dir).requeue()
                log.info("SLURM job %s was requeued", job_id)
        if waiting:
            time.sleep(poll_s)


if __name__ == "__main__":  # a run's process group: python -m plwlab.training.launch <torchrun arguments>
    torchrun(sys.argv[1:])
