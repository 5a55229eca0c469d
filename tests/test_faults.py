"""Faults and bad input: nothing lost, mixed or mislabeled, and every bad input is one clear line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SAMPLE, compose_train
from test_train import QUICK, cli_env, run_cli

from plwlab.data.sources import DataError
from plwlab.rundir import RunRefused, run_dir_lock
from plwlab.training.config import ConfigError
from plwlab.training.model import ModelLoadError
from plwlab.training.module import TrainingDiverged
from plwlab.training.train import train


def test_a_refused_relaunch_leaves_finished_runs_untouched_and_exits_non_zero(tmp_path):
    args = ["-m", "plw=0,1", *QUICK, f"paths.output_dir={tmp_path}"]
    assert run_cli(*args).returncode == 0
    runs = sorted((tmp_path / "plwlab").glob("*/status.json"))
    first = runs[0]
    status = json.loads(first.read_text())
    status["config_digest"] = "0123456789abcdef"  # as if a yaml default had changed since this run finished
    first.write_text(json.dumps(status))

    def run_files():  # the run's own files (Hydra's .hydra/ and job log, and the lock, are the launcher's)
        return {p: p.read_bytes() for p in first.parent.rglob("*")
                if p.is_file() and ".hydra" not in p.parts and p.suffix not in (".log", ".lock") and p.name != ".lock"}  # fmt: skip

    before = run_files()
    assert {"status.json", "metrics.json", "metrics.csv", "model.safetensors"} <= {p.name for p in before}
    again = run_cli(*args)
    assert again.returncode == 1 and "REFUSED" in again.stdout
    assert {p: b for p, b in run_files().items() if p.name != "refused.json"} == before
    assert "different config" in json.loads((first.parent / "refused.json").read_text())["error"]
    summary = json.loads((tmp_path / "plwlab" / "sweep_summary.json").read_text())
    assert len(summary["refused"]) == 1 and len(summary["skipped"]) == 1


def test_a_run_being_trained_elsewhere_is_refused(tmp_path):
    cfg = compose_train(QUICK, tmp_path)
    (tmp_path / "status.json").write_text('{"status": "running", "attempts": 1}')
    with run_dir_lock(tmp_path):  # another launcher's live run
        with pytest.raises(RunRefused, match="in use by another training process"):
            train(cfg)
    assert json.loads((tmp_path / "status.json").read_text()) == {"status": "running", "attempts": 1}
    assert train(cfg)["global_steps"] == 6  # once the other process is gone, the run goes ahead


def test_diverging_training_stops_as_failed_naming_the_step(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"is (nan|inf) at step \d+"):
        train(compose_train([*QUICK, "optim.lr=1e30"], tmp_path))
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "failed" and "TrainingDiverged" in status["error"]
    assert not (tmp_path / "hf_model").exists()  # nothing exported for evaluation


def test_a_failure_before_fit_is_recorded(tmp_path):
    with pytest.raises(ModelLoadError):
        train(compose_train([*QUICK, "model.config=null", f"model.name_or_path={tmp_path / 'missing'}"], tmp_path))
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "failed"


def test_ctrl_c_is_recorded_as_interrupted(tmp_path):
    args = ["data.limit=100", "data.val_size=4", "trainer.max_epochs=50", "callbacks.progress=null"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={tmp_path}"], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while not (tmp_path / "metrics.csv").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) != 0
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "interrupted"


def _bad_inputs(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "invalid.json").write_text('[{"instruction": "", "output": "x"}]')
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops\n')
    (tmp_path / "empty_model").mkdir()
    return {
        "empty file": ([f"data.path={tmp_path / 'empty.json'}"], DataError, "no usable records (0 in the file, 0 invalid)"),
        "nothing valid": ([f"data.path={tmp_path / 'invalid.json'}", "data.on_invalid=skip"], DataError,
                          "no usable records (1 in the file, 1 invalid)"),
        "broken JSONL line": ([f"data.path={tmp_path / 'broken.jsonl'}"], DataError, "invalid JSON on line 2"),
        "max_length 1": (["data.max_length=1"], ConfigError, "data.max_length must be >= 2"),
        "global batch 0": (["global_batch_size=0"], ConfigError, "global_batch_size=0 is not a positive multiple"),
        "plw nan": (["plw=nan"], ConfigError, "plw must be a finite number, got nan"),
        "plw inf": (["plw=inf", "allow_plw_above_one=true"], ConfigError, "plw must be a finite number, got inf"),
        "missing model dir": (["model=llama2", f"model.name_or_path={tmp_path / 'nope'}"], ModelLoadError,
                              f"model directory {tmp_path / 'nope'} does not exist"),
        "empty model dir": (["model=llama2", f"model.name_or_path={tmp_path / 'empty_model'}"], ModelLoadError,
                            "has no config.json"),
    }  # fmt: skip


@pytest.mark.parametrize("case", ["empty file", "nothing valid", "broken JSONL line", "max_length 1", "global batch 0",
                                  "plw nan", "plw inf", "missing model dir", "empty model dir"])  # fmt: skip
def test_bad_input_is_one_clear_error(tmp_path, case):
    overrides, error, message = _bad_inputs(tmp_path)[case]
    with pytest.raises(error) as raised:
        train(compose_train([*QUICK, *overrides], tmp_path / "run"))
    assert message in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["recommend", "--rg", "nan"], "error: Rg must be a finite number > 0, got nan"),
        (["analyze", "{header_only}"], "has no result rows"),
        (["stats", "data.path={empty}"], "no usable records"),
    ],
)
def test_cli_bad_input_is_one_clear_error(tmp_path, argv, message):
    from plwlab.cli import main as cli

    (tmp_path / "results.csv").write_text("run_id,model,dataset,plw,rg,benchmark,metric,score,stderr,n\n")
    (tmp_path / "empty.json").write_text("[]")
    argv = [a.format(header_only=tmp_path / "results.csv", empty=tmp_path / "empty.json") for a in argv]
    with pytest.raises(SystemExit) as raised:
        cli(argv)
    assert message in str(raised.value) and str(raised.value).startswith("error: ")


def test_a_lookup_does_not_import_torch_or_lightning():
    code = ("import sys; from plwlab.cli import main; main(['recommend', '--rg', '0.5']); "
            "print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), check=True).stdout
    lines = out.splitlines()
    assert lines[0] == "Rg 0.5: PLW 0.155  [paper Table 4, column all]" and lines[-1] == "[]"


def test_a_path_valued_override_gives_a_flat_run_dir_that_records_its_data(tmp_path):
    data = tmp_path / "my data" / "alpaca.json"
    data.parent.mkdir()
    data.write_text(SAMPLE.read_text())
    result = run_cli("-m", "plw=0", f"data.path='{data}'", *QUICK, f"paths.output_dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = [p for p in (tmp_path / "out" / "plwlab").iterdir() if p.is_dir()]
    assert run.name.startswith("data.limit=48,data.path=_") and run.name.endswith("my_data_alpaca.json_,data.val_size=4,plw=0,trainer.max_epochs=1-" + run.name[-8:])  # one level, no nesting
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data_path"] == str(data) and len(metrics["data_sha256"]) == 16
    summary = json.loads((tmp_path / "out" / "plwlab" / "sweep_summary.json").read_text())
    assert summary["finished"] == [run.name]  # the plan and summary name the same directory


def test_analyze_refuses_two_datasets_under_one_name():
    import pandas as pd

    from plwlab.analysis.scores import relative_scores

    rows = pd.DataFrame({"model": "m", "dataset": "alpaca_sample", "rg": [3.0, 3.0, 0.5], "plw": [0, 1, 0],
                         "benchmark": "piqa", "score": [0.5, 0.6, 0.55]})  # fmt: skip
    with pytest.raises(ValueError, match="dataset 'alpaca_sample' has 2 different Rg values for model 'm'"):
        relative_scores(rows)
    rows["rg"], rows["data_sha256"] = 3.0, ["a1", "a1", "b2"]  # same Rg by chance, different files
    with pytest.raises(ValueError, match="has 2 different data files"):
        relative_scores(rows)
    rows["data_sha256"], rows["train_steps"] = "a1", [18, 18, 6]  # a 3-epoch and a 1-epoch study in one table
    with pytest.raises(ValueError, match="has 2 different training lengths"):
        relative_scores(rows)
    assert len(relative_scores(rows.assign(train_steps=18))) == 3


def test_a_new_run_prints_no_warning_about_deleting_old_logs(tmp_path):
    result = run_cli(*QUICK, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exists and is not empty" not in result.stderr  # Hydra's own files are there; nothing is deleted
    assert (tmp_path / "metrics.csv").exists()


def test_the_cli_help_points_at_the_real_layout():
    import plwlab.cli

    assert "sweeps/" not in plwlab.cli.__doc__  # run dirs are outputs/<name>/<overrides> and outputs/<name>/runs/<time>
    assert "--runs outputs/plwlab]" in plwlab.cli.__doc__
