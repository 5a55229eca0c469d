"""hydra/launcher=slurm against a real one-node SLURM cluster (tools/local_slurm.sh start; .ci/run starts it): a PLW
sweep as a user types it, a 2-task FSDP job, scontrol requeue and a time-limit hit mid-run each resuming to the
uninterrupted run's weights, and failures (a failing job, a request SLURM can never start, a cancelled job) in the
summary and the exit code."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLE
from safetensors.torch import load_file
from test_train import QUICK, cli_env, read_metrics_csv, train_losses


def is_test_cluster() -> bool:
    """The one-node cluster of tools/local_slurm.sh is up (ClusterName plwlab: never a shared cluster)."""
    if shutil.which("scontrol") is None:
        return False
    try:
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=10).stdout
    except subprocess.TimeoutExpired:
        return False
    return any(line.split() == ["ClusterName", "=", "plwlab"] for line in config.splitlines())


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(not is_test_cluster(),
                                                    reason="no test SLURM cluster: bash tools/local_slurm.sh start (root)")]  # fmt: skip
# long enough to be interrupted, and to outlast one minute-long attempt (180 optimizer steps, measured 150 s on one
# core of a 2-core AMD EPYC; 240 steps took 210 s); checkpoints only when a signal asks
LONG = ["data.limit=100", "data.val_size=4", "trainer.max_epochs=15", "callbacks.progress=null",
        "model.config.hidden_size=256", "model.config.intermediate_size=688", "callbacks.checkpoint.every_n_steps=1000"]  # fmt: skip


def slurm_env() -> dict[str, str]:
    return {**cli_env(), "PLWLAB_SLURM_POLL_S": "1", "PLWLAB_SLURM_GRACE_S": "5"}


def sweep(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm", *args], env=slurm_env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def start_sweep(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm", *args], env=slurm_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def summary(out: Path) -> dict:
    return json.loads((out / "plwlab" / "sweep_summary.json").read_text())


def only_run(out: Path) -> Path:
    (run,) = [p.parent for p in (out / "plwlab").glob("*/status.json")]
    return run


def jobs() -> dict[str, tuple[str, str]]:
    lines = subprocess.run(["squeue", "-h", "-o", "%i|%T|%r"], capture_output=True, text=True).stdout.splitlines()
    return {i: (s, r) for i, s, r in (line.split("|") for line in lines)}


def wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def running_job() -> str:
    return wait_for(lambda: next((i for i, (s, _) in jobs().items() if s == "RUNNING"), None), 180, "a running job")


def release_requeued(job: str) -> None:
    """A requeued job waits ~2 minutes (SLURM's BeginTime): start it now."""
    wait_for(lambda: jobs().get(job, ("",))[0] == "PENDING", 120, f"job {job} back in the queue")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)


@pytest.fixture(autouse=True)
def empty_queue():
    """Each test starts and ends with no job on the test cluster (a failed test leaves none behind)."""
    subprocess.run(["scancel", "--full", *jobs()], capture_output=True)
    yield
    subprocess.run(["scancel", "--full", *jobs()], capture_output=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of LONG, trained here (no SLURM) beside the SLURM jobs: its final weights."""
    out = tmp_path_factory.mktemp("reference")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *LONG, "plw=0.1", f"hydra.run.dir={out}"],
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def weights() -> dict:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        return load_file(out / "hf_model" / "model.safetensors")

    return weights


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_a_plw_sweep_as_typed(tmp_path):
    result = sweep("plw=0,1", *QUICK, f"paths.output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(summary(tmp_path)["finished"]) == 2
    assert sorted(json.loads(p.read_text())["plw"] for p in tmp_path.rglob("metrics.json")) == [0.0, 1.0]


def test_a_two_task_fsdp_job_equals_one_process(tmp_path):
    args = ["plw=0.1", "data.limit=40", "data.val_size=4", "trainer.max_steps=4", "model.dtype=float64",
            "callbacks.progress=null", "global_batch_size=4"]  # fmt: skip
    result = sweep(*args, "trainer.devices=2", "strategy=fsdp", "data.batch_size=2", f"paths.output_dir={tmp_path / 'slurm'}")
    assert result.returncode == 0, result.stderr[-3000:]
    single = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "data.batch_size=4",
                             f"hydra.run.dir={tmp_path / 'single'}"], env=cli_env(), capture_output=True, text=True)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    run = only_run(tmp_path / "slurm")
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["strategy"]) == (2, "FSDP2Strategy")
    assert train_losses(run) == pytest.approx(train_losses(tmp_path / "single"), rel=1e-9)


def test_scontrol_requeue_mid_run_resumes_to_the_uninterrupted_weights(tmp_path, reference):
    proc = start_sweep(*LONG, "plw=0.1", f"paths.output_dir={tmp_path}")
    run = wait_for(lambda: next((p.parent for p in tmp_path.rglob("metrics.csv")), None), 180, "training to start")
    wait_for(lambda: len(train_losses(run)) >= 10, 180, "10 steps")
    job = running_job()
    subprocess.run(["scontrol", "requeue", job], check=True)  # SIGTERM now, then the job is queued again
    wait_for(lambda: json.loads((run / "status.json").read_text())["status"] == "requeued", 120, "status requeued")
    release_requeued(job)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "finished" and status["attempts"] == 2 and status["stopped_by"] == "SIGTERM"
    assert max_diff(load_file(run / "hf_model" / "model.safetensors"), reference()) <= 1e-6


def test_a_time_limit_hit_saves_requeues_and_resumes(tmp_path, reference):
    """timeout_min=2, signal_delay_s=60: SIGUSR2 about a minute in, before the run can finish; the run saves its
    step and submitit requeues the job, which resumes where it stopped, as often as the time limit comes (each
    attempt trains ~45 s of LONG's ~150 s: 5 attempts measured here; max_num_timeout=10 leaves room for a slower machine)."""
    proc = start_sweep(*LONG, "plw=0.1", "hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=60",
                       "hydra.launcher.max_num_timeout=10", f"paths.output_dir={tmp_path}")  # fmt: skip
    job = running_job()
    run = wait_for(lambda: next((p.parent for p in (tmp_path / "plwlab").glob("*/status.json")), None), 180, "the run")
    wait_for(lambda: json.loads((run / "status.json").read_text()).get("stopped_by") == "SIGUSR2", 240, "SIGUSR2")
    while proc.poll() is None:  # each time limit requeues it (a second one may come on a loaded machine)
        if jobs().get(job, ("",))[0] == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        time.sleep(1)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "finished" and status["attempts"] >= 2 and status["resumed_from"]
    starts = [int(r["step"]) for r in read_metrics_csv(run) if r.get("train/loss")]
    assert starts == list(range(180))  # each attempt went on from the step the last one saved: no step lost or repeated
    assert max_diff(load_file(run / "hf_model" / "model.safetensors"), reference()) <= 1e-6


def test_failures_are_failures_in_the_summary_and_the_exit_code(tmp_path):
    bad = sweep(f"data.path={SAMPLE},{tmp_path / 'missing.json'}", *QUICK, f"paths.output_dir={tmp_path / 'bad'}")
    assert bad.returncode == 1
    assert len(summary(tmp_path / "bad")["finished"]) == 1 and "data file not found" in summary(tmp_path / "bad")["failed"][0]
    start = time.time()
    never = sweep("plw=0", *QUICK, "hydra.launcher.cpus_per_task=64", f"paths.output_dir={tmp_path / 'never'}")
    assert never.returncode == 1 and time.time() - start < 60
    assert "pending with reason PartitionConfig; cancelled" in summary(tmp_path / "never")["failed"][0]
    proc = start_sweep("plw=0", *LONG, f"paths.output_dir={tmp_path / 'cancelled'}")
    job = running_job()
    subprocess.run(["scancel", "--signal=KILL", job], check=True)  # killed outright: no result, no accounting
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err[-3000:]
    assert "ended without a result" in summary(tmp_path / "cancelled")["failed"][0]


def test_the_launcher_checks_the_time_limit_against_the_signal(tmp_path):
    result = sweep("plw=0", *QUICK, "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=90",
                   f"paths.output_dir={tmp_path}")  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "signal_delay_s=90 is not well below the time limit timeout_min=1" in result.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.rglob(".submitit"))  # nothing submitted
