"""A run's lifecycle in one place (plwlab.rundir.RunState and RunDir's transitions): every stop path says what to
type and ends with the sweep's summary; each launch of a sweep keeps its own outcome."""

import json
import shlex
import signal
import subprocess
import sys
import time

from conftest import ROOT, sigint_default
from test_train import QUICK, cli_env, run_cli, train_losses

from plwlab.rundir import SWEEP_ID, RunDir, RunRefused, RunState
from plwlab.training.sweep import SweepCallback

LONG = ["data.limit=100", "data.val_size=4", "trainer.max_epochs=50", "callbacks.progress=null",
        "callbacks.checkpoint.every_n_steps=1000"]  # fmt: skip


def _stop_when_training(proc: subprocess.Popen, root, signum: int) -> str:
    deadline = time.time() + 180
    while time.time() < deadline and not any(len(train_losses(p.parent)) >= 3 for p in root.rglob("metrics.csv")):
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


def test_a_single_run_stopped_by_sigterm_says_the_command_that_resumes_it(tmp_path):
    """A single run's folder is named by its start time, so "relaunch the same command" started a new run from step
    0 and left the stopped one interrupted for good. The line now gives the command; typed as printed, it resumes
    the same run directory."""
    args = [*LONG, "trainer.max_epochs=2", f"paths.output_dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    last = _stop_when_training(proc, tmp_path, signal.SIGTERM)
    (run,) = [p.parent for p in tmp_path.rglob("status.json")]
    assert last.startswith("stopped by SIGTERM after saving a checkpoint at step "), last
    assert RunDir(run).state is RunState.INTERRUPTED
    command = last.split("; resume it from its last checkpoint with: ", 1)[1]
    assert command.endswith(f" hydra.run.dir={run}")
    words = shlex.split(command)
    assert words[:2] == ["python", str(ROOT / "train.py")]
    resumed = subprocess.run([sys.executable, *words[1:]], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [p.parent for p in tmp_path.rglob("status.json")] == [run]  # no second run directory
    status = RunDir(run).status()
    assert status["status"] == "finished" and status["attempts"] == 2 and status["resumed_from"]


def test_ctrl_c_on_a_one_process_sweep_ends_with_the_summary_and_one_line(tmp_path):
    """Ctrl-C on an in-process sweep ended on a progress-bar fragment: no summary, points never started unlisted."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", "plw=0,1", *LONG, f"paths.output_dir={tmp_path}"],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline and not any(len(train_losses(p.parent)) >= 3 for p in tmp_path.rglob("metrics.csv")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted (stopped by SIGINT): relaunch the same command"), err[-2000:]
    assert "Sweep summary: 2 unfinished" in out, out[-2000:]
    summary = json.loads((tmp_path / "plwlab" / "sweep_summary.json").read_text())
    assert "ended while interrupted" in summary["unfinished"][0] and "not started" in summary["unfinished"][1]


def test_a_repeated_sweep_point_is_trained_once_and_reported_finished(tmp_path):
    """-m plw=0.1,0.1 trained the run and reported "1 skipped", finished: []."""
    result = run_cli("-m", "plw=0.1,0.1", *QUICK, f"paths.output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "repeats #0 (one run)" in result.stdout
    summary = json.loads((tmp_path / "plwlab" / "sweep_summary.json").read_text())
    assert (len(summary["finished"]), summary["skipped"]) == (1, [])


def test_a_launch_keeps_its_refusal_when_another_launch_finishes_the_run(tmp_path, monkeypatch):
    """Two launchers on one sweep: the second is refused a run the first is training; the first finishes it before
    the second summarises. The second said "finished" and exited 0 (finishing deleted the refusal), and
    sweep_summary.json kept only the last launch's list."""
    run = RunDir(tmp_path / "plw=0")
    run.path.mkdir()
    first, second = SweepCallback(), SweepCallback()
    first.started = second.started = time.strftime("%Y-%m-%dT%H:%M:%S")
    first.sweep_id, second.sweep_id = "first", "second"
    monkeypatch.setenv(SWEEP_ID, "first")
    status = run.start_attempt({"attempts": 0}, None)
    monkeypatch.setenv(SWEEP_ID, "second")
    run.refuse(RunRefused(f"{run.path} is in use by another training process (pid 1 on a since b); skipped"))
    monkeypatch.setenv(SWEEP_ID, "first")
    run.finish(status)
    assert second._outcome(run, "plw=0")[0] == "refused" and first._outcome(run, "plw=0") == ("finished", "plw=0")
    run.forget_refusal("second")  # the second launch's summary has read it
    assert not run.refused_file.exists() and second._outcome(run, "plw=0")[0] == "skipped"


def test_each_launch_of_a_sweep_keeps_its_own_summary(tmp_path):
    args = ["-m", "plw=0,1", *QUICK, f"paths.output_dir={tmp_path}"]
    assert run_cli(*args).returncode == 0 and run_cli(*args).returncode == 0
    launches = [json.loads(line) for line in (tmp_path / "plwlab" / "sweep_summaries.jsonl").read_text().splitlines()]
    assert [(len(x["finished"]), len(x["skipped"])) for x in launches] == [(2, 0), (0, 2)]
    assert launches[0]["sweep_id"] != launches[1]["sweep_id"]
