"""Every tracker a run logs to (logger=csv|wandb|tensorboard|mlflow) holds the same run config and summary and the
values of metrics.csv, read back with each tracker's own reader: TensorBoard's event reader, MLflow's client
against a real ``mlflow server`` on 127.0.0.1, the records of the offline W&B run."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, compose_train, sigint_default
from test_lifecycle import LONG, _stop_when_training
from test_train import QUICK, cli_env, read_metrics_csv
from wandb_records import offline_runs

from plwlab.rundir import RunDir
from plwlab.training.train import train

CONFIG_KEYS = ("run_id", "sweep", "dataset", "rg", "model", "plw", "segment_weight/assistant", "global_batch_size",
               "micro_batch_size", "accumulate_grad_batches", "world_size", "seed", "total_steps", "max_steps")  # fmt: skip


def csv_series(run_dir: Path, key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in read_metrics_csv(run_dir) if r.get(key)}


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (sqlite store), for the whole session."""
    if shutil.which("mlflow", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("mlflow is not installed (pip install -e .[dev])")
    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                             str(port), "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--default-artifact-root", str(root / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=sigint_default)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def test_tensorboard_holds_the_run_config_summary_and_metrics_csv(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = train(compose_train([*QUICK, "logger=tensorboard", "name=tb-sweep"], tmp_path))
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for key in ("train/loss", "train/prompt_loss", "train/completion_loss", "param_distance/total"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx(csv_series(tmp_path, key), rel=1e-6), key
    assert [e.value for e in events.Scalars("summary/loss_rsd")] == pytest.approx([metrics["loss_rsd"]])
    hparams = (tmp_path / "tensorboard" / "hparams.yaml").read_text()
    for key in CONFIG_KEYS:
        assert f"{key}:" in hparams, key
    assert "dataset: alpaca_sample" in hparams and "sweep: tb-sweep" in hparams


def test_mlflow_server_holds_the_run_config_summary_and_metrics_csv(tmp_path, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    metrics = train(compose_train([*QUICK, "logger=mlflow", "name=mlflow-sweep", "plw=0.01"], tmp_path))
    client = MlflowClient(mlflow_server)
    run_id = RunDir(tmp_path).status()["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "mlflow-sweep"
    for key in CONFIG_KEYS:
        assert key in run.data.params, key
    assert run.data.params["dataset"] == "alpaca_sample" and float(run.data.params["plw"]) == 0.01
    for key in ("train/loss", "train/completion_loss", "loss_rsd/window"):
        logged = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert logged == pytest.approx(csv_series(tmp_path, key), rel=1e-6), key
    assert run.data.metrics["summary/loss_rsd"] == pytest.approx(metrics["loss_rsd"])
    artifact = Path(client.download_artifacts(run_id, "metrics.json", str(tmp_path / "dl")))
    assert json.loads(artifact.read_text())["final_train_loss"] == pytest.approx(metrics["final_train_loss"])


def test_wandb_run_config_and_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    metrics = train(compose_train([*QUICK, "logger=wandb", "name=wb-sweep"], tmp_path))
    (run,) = offline_runs(tmp_path / "wandb")
    assert run.group == "wb-sweep" and run.job_type == "train"
    for key in CONFIG_KEYS:
        assert key in run.config, key
    assert run.config["dataset"] == "alpaca_sample" and run.config["rg"] == pytest.approx(metrics["rg"])
    assert run.config["run_id"] == RunDir(tmp_path).run_id
    for key in ("loss_rsd", "param_distance", "final_train_loss", "global_steps", "dataset"):
        assert run.summary[key] == pytest.approx(metrics[key]) if isinstance(metrics[key], float) else metrics[key]
    logged = {int(row["trainer/global_step"]): row["train/loss"] for row in run.history if "train/loss" in row}
    assert logged == pytest.approx(csv_series(tmp_path, "train/loss"), rel=1e-6)


def test_a_resumed_run_continues_its_tracker_runs(tmp_path, mlflow_server):
    """Stopped by SIGTERM and resumed: one MLflow run (the same id), one TensorBoard folder, one W&B run, each
    with the values of the resumed run's metrics.csv."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = {**cli_env(), "MLFLOW_TRACKING_URI": mlflow_server, "WANDB_MODE": "offline"}
    run_dir = tmp_path / "run"
    args = [str(ROOT / "train.py"), *LONG, "trainer.max_epochs=2", "logger=[wandb,tensorboard,mlflow]", "name=resumed",
            f"hydra.run.dir={run_dir}", f"paths.output_dir={tmp_path}"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)  # fmt: skip
    _stop_when_training(proc, tmp_path, signal.SIGTERM)
    first = RunDir(run_dir).status()
    resumed = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    status = RunDir(run_dir).status()
    assert status["attempts"] == 2 and status["mlflow_run_id"] == first["mlflow_run_id"]
    expected = csv_series(run_dir, "train/loss")
    client = MlflowClient(mlflow_server)
    (experiment,) = [e for e in client.search_experiments() if e.name == "resumed"]
    assert len(client.search_runs([experiment.experiment_id])) == 1
    history = sorted(client.get_metric_history(status["mlflow_run_id"], "train/loss"), key=lambda m: m.timestamp)
    assert {m.step: m.value for m in history} == pytest.approx(expected, rel=1e-6)  # the last value of each step
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(expected, rel=1e-6)
    runs = offline_runs(run_dir / "wandb")
    assert len(runs) == 2 and {r.run_id for r in runs} == {status["wandb_id"]}
    assert os.path.exists(run_dir / "metrics.json")
