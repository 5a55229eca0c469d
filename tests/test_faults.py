"""Faults and bad input: nothing lost, mixed or mislabeled, and every bad input is one clear line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SAMPLE, compose_train, sigint_default
from test_train import QUICK, cli_env, run_cli

from plwlab.config import ConfigError
from plwlab.data.sources import DataError
from plwlab.rundir import RunError, RunRefused
from plwlab.runlock import run_dir_lock
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
    summary = json.loads((tmp_path / "plwlab" / "sweep_summary.json").read_text())
    assert len(summary["refused"]) == 1 and len(summary["skipped"]) == 1 and "different config" in summary["refused"][0]
    assert not (first.parent / "refused.json").exists()  # the launch summarised its refusal: nothing stale left


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
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=sigint_default)  # fmt: skip
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
    (tmp_path / "fake.parquet").write_text("instruction,output\nhi,there\n")  # a CSV named .parquet
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
        "unknown key": (["+plww=0.1"], ConfigError, "unknown config key 'plww' (did you mean 'plw'?)"),
        "unknown nested key": (["+data.max_lenght=64"], ConfigError,
                               "unknown config key 'data.max_lenght' (did you mean 'data.max_length'?)"),
        "max_steps 0": (["trainer.max_steps=0"], ConfigError, "trainer.max_steps=0 would train nothing"),
        "max_epochs 0": (["trainer.max_epochs=0"], ConfigError, "trainer.max_epochs=0 would train nothing"),
        "empty data.path": (["data.path="], ConfigError, "data.path is empty"),
        "lr nan": (["optim.lr=nan"], ConfigError, "optim.lr must be a finite number > 0, got nan"),
        "lr negative": (["optim.lr=-1e-5"], ConfigError, "optim.lr must be a finite number > 0, got -1e-05"),
        "lora typo": (["model.lora={r:16,lora_alpah:32}"], ConfigError,
                      "model.lora.lora_alpah is not a peft.LoraConfig argument (did you mean 'lora_alpha'?)"),
        "name escapes": (["name=../../etc"], ConfigError, "name='../../etc' must be a plain folder name"),
        "max_length over context": (["data.max_length=4096"], ConfigError,
                                    "data.max_length=4096 exceeds model tiny-llama's context of 1024 tokens"),
        "not parquet": ([f"data.path={tmp_path / 'fake.parquet'}"], DataError,
                        f"{tmp_path / 'fake.parquet'} is not a readable parquet file"),
        "lora r 0": (["model.lora={r:0}"], ConfigError,
                     "model.lora={'r': 0}: r must be a positive integer, got 0"),
        "seed negative": (["seed=-1"], ConfigError, "seed must be an integer in [0, 2^32), got -1"),
        "name too long": (["name=" + "a" * 300], ConfigError, "name is 300 characters long; a folder name may have at "
                                                              "most 200: shorten it"),
    }  # fmt: skip


@pytest.mark.parametrize("case", ["empty file", "nothing valid", "broken JSONL line", "max_length 1", "global batch 0",
                                  "plw nan", "plw inf", "missing model dir", "empty model dir", "unknown key",
                                  "unknown nested key", "max_steps 0", "max_epochs 0", "empty data.path", "lr nan",
                                  "lr negative", "lora typo", "name escapes", "max_length over context",
                                  "not parquet", "lora r 0", "seed negative", "name too long"])  # fmt: skip
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
    assert len(relative_scores(rows.assign(train_steps=18, plw=[0, 1, 0.1]))) == 3  # (plw 0 twice: one run's repeat)


def test_a_new_run_prints_no_warning_about_deleting_old_logs(tmp_path):
    result = run_cli(*QUICK, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exists and is not empty" not in result.stderr  # Hydra's own files are there; nothing is deleted
    assert (tmp_path / "metrics.csv").exists()


def test_the_cli_help_points_at_the_real_layout():
    import plwlab.cli

    assert "sweeps/" not in plwlab.cli.__doc__  # run dirs are outputs/<name>/<overrides> and outputs/<name>/runs/<time>
    assert "--runs outputs/plwlab]" in plwlab.cli.__doc__


# -- the fault table of issue 24: each class below was silent, hung, escaped or lost rows before


@pytest.mark.parametrize("mode", [[], ["-m"]], ids=["run", "multirun"])
def test_a_name_leaving_the_output_directory_is_refused_before_anything_is_written(tmp_path, mode):
    out = tmp_path / "deep" / "out"
    result = run_cli(*mode, "name=../../escaped", *QUICK, f"paths.output_dir={out}")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: name='../../escaped' must be a plain folder name" in result.stderr
    assert not (tmp_path / "escaped").exists() and not list(tmp_path.rglob("metrics.csv"))


def test_an_unknown_key_without_plus_is_one_line_with_a_close_match(tmp_path):
    """`plww=0.1` (no +) used to print Hydra's six lines ("Could not override 'plww'...") and no suggestion."""
    for argv, line in ((["plww=0.1"], "error: unknown config key 'plww' (did you mean 'plw'?) in plww=0.1; the schema is "
                                      "plwlab.config.TrainConfig"),
                       (["-m", "plw=0,1", "data.max_lenght=64"], "error: unknown config key 'data.max_lenght' (did you "
                        "mean 'data.max_length'?) in data.max_lenght=64; the schema is plwlab.config.TrainConfig")):  # fmt: skip
        result = run_cli(*argv, f"paths.output_dir={tmp_path}")
        assert result.returncode == 1 and result.stderr.strip() == line, result.stderr[-2000:]
    assert not list(tmp_path.iterdir())


def test_resume_refuses_data_that_changed_since_the_checkpoint_unless_allowed(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(SAMPLE.read_text())
    args = [*QUICK, f"data.path={data}", "callbacks.checkpoint.every_n_steps=3", "callbacks.checkpoint.keep=true"]
    run = tmp_path / "run"
    train(compose_train(args, run))
    status = {**json.loads((run / "status.json").read_text()), "status": "interrupted"}  # killed after its checkpoint
    (run / "status.json").write_text(json.dumps(status))
    records = json.loads(data.read_text())
    records[0]["output"] += " (edited)"
    data.write_text(json.dumps(records))
    with pytest.raises(RunRefused, match=r"cannot resume: the data file changed since the checkpoint \(data_sha256 "
                                         r"\w{16} -> \w{16}\): .* set allow_data_change=true") as refused:  # fmt: skip
        train(compose_train(args, run))
    assert "\n" not in str(refused.value)
    assert json.loads((run / "status.json").read_text()) == status  # untouched, the refusal beside it
    assert "the data file changed" in json.loads((run / "refused.json").read_text())["single run"]["error"]
    metrics = train(compose_train([*args, "allow_data_change=true"], run))  # the user means it
    assert metrics["resumed"] and json.loads((run / "status.json").read_text())["status"] == "finished"


def test_duplicates_are_counted_kept_or_dropped_and_never_straddle_the_split(tmp_path, tiny):
    import torch

    from plwlab.data.batching import split_indices
    from plwlab.data.datamodule import InstructionDataModule

    records = json.loads(SAMPLE.read_text())[:40]
    assert len({json.dumps(r, sort_keys=True) for r in records}) == 40
    (tmp_path / "twins.json").write_text(json.dumps(records + records[:20]))
    sizes = {}
    for mode in ("keep", "drop"):
        dm = InstructionDataModule(tokenizer=tiny.tokenizer, path=str(tmp_path / "twins.json"), val_size=0.25,
                                   duplicates=mode, cache_dir=None)  # fmt: skip
        dm.setup()
        val = {tuple(e.input_ids) for e in dm.val_set.examples}
        train_ids = [tuple(e.input_ids) for e in dm.train_set.examples]
        assert dm.stats["n_duplicates"] == 20 and not val & set(train_ids)  # no twin on both sides
        sizes[mode] = len(train_ids) + len(dm.val_set.examples)
    assert sizes == {"keep": 60, "drop": 40}
    order = torch.randperm(50, generator=torch.Generator().manual_seed(42)).tolist()
    assert split_indices([str(i) for i in range(50)], 0.1, 42) == (order[:5], sorted(order[5:]))  # as before


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "run"
    train(compose_train(QUICK, path))
    return path


def _evaluate(overrides):
    from hydra import compose, initialize_config_dir

    from plwlab import CONF_DIR
    from plwlab.evaluation.evaluate import evaluate

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=[*overrides, "eval=mechanisms", "eval.memorization.n=2",
                                             "eval.memorization.max_new_tokens=4", "~eval.generations"])  # fmt: skip
    return evaluate(cfg)


def test_evaluation_refuses_a_run_still_training_and_unwritable_results_before_any_work(tmp_path, finished_run):
    import shutil

    run = tmp_path / "sweep" / "run"
    shutil.copytree(finished_run, run)
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "status": "running"}))  # retrained now: hf_model/ is stale
    with pytest.raises(ValueError, match=r"has finished training: run \(training running: its hf_model/ may be stale"):
        _evaluate([f"run_dir={run}"])
    (run / "status.json").write_text(json.dumps(status))
    (tmp_path / "a_file").write_text("")
    for results, message in ((tmp_path, f"results={tmp_path} is a directory; name a CSV file in it"),
                             (tmp_path / "a_file" / "results.csv", "cannot write the results table")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            _evaluate([f"run_dir={run}", f"results={results}"])
    assert not (run / "eval").exists()  # refused before any evaluation
    assert len(_evaluate([f"run_dir={run}"])) == 1


def test_rows_that_cannot_be_written_are_never_lost(tmp_path, capsys):
    from plwlab.results import append_results

    rows = [{"run_id": "s/r", "model": "m", "dataset": "d", "plw": 0.1, "rg": 1.0, "benchmark": "piqa", "metric": "acc",
             "score": 0.61, "stderr": 0.01, "n": 100}]  # fmt: skip
    with pytest.raises(RuntimeError, match=r"the 1 new rows are kept in this job's stderr"):
        append_results("/proc/plwlab-test/results.csv", rows)  # a folder nobody can create (nor a pending file in it)
    assert "s/r,m,d,0.1,1.0,piqa,acc,0.61,0.01,100" in capsys.readouterr().err
    (tmp_path / "results.csv").write_text("not,a,results,table\n")
    with pytest.raises(RuntimeError, match=r"new rows are kept in .*results\.pending-\d+\.csv"):
        append_results(tmp_path / "results.csv", rows)
    (pending,) = tmp_path.glob("results.pending-*.csv")
    assert "s/r,m,d,0.1,1.0,piqa,acc,0.61" in pending.read_text()


def test_formula_cells_are_neutralized_in_csvs_and_read_back_raw(tmp_path):
    from plwlab.results import append_results, read_results, read_table

    raw = {"run_id": '=HYPERLINK("http://x","y")', "model": "+m", "dataset": "@d", "benchmark": "-b", "metric": "'q"}
    rows = [{**raw, "plw": 0.1, "rg": 1.0, "score": -0.5, "stderr": None, "n": 10}]
    path = tmp_path / "results.csv"
    append_results(path, rows)
    append_results(path, [{**rows[0], "run_id": "other"}])  # the first row is read and rewritten
    text = path.read_text()
    assert text.count("'=HYPERLINK") == 1 and "'+m" in text and "'@d" in text and "'-b" in text and "''q" in text
    assert ",-0.5," in text  # numbers stay numbers
    assert {k: read_results(path)[0][k] for k in raw} == raw
    table = read_table(path)
    assert table.loc[0, ["run_id", "model", "dataset", "benchmark", "metric"]].to_dict() == raw
    assert table.loc[0, "score"] == -0.5


def test_analyze_leaves_out_nan_scores_and_refuses_non_finite_rg(tmp_path):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = [{"run_id": f"s/{d},{p}", "model": "tiny", "dataset": d, "rg": rg, "plw": p, "benchmark": b, "metric": m,
             "score": 0.5 + 0.1 * rng.random()} for d, rg in (("short", 0.2), ("long", 3.0)) for p in (0.0, 0.01, 0.1, 1.0)
            for b, m in (("piqa", "acc_norm"), ("winogrande", "acc"), ("arc_challenge", "acc_norm"))]  # fmt: skip
    table = pd.DataFrame(rows)
    table.loc[3, "score"], table.loc[20, "score"] = float("nan"), float("inf")
    table.to_csv(tmp_path / "nan.csv", index=False)
    table.assign(score=0.5, rg=[float("inf")] + [0.2] * (len(table) - 1)).to_csv(tmp_path / "inf_rg.csv", index=False)
    code = "import sys; from plwlab.cli import main; main(sys.argv[1:])"
    ok = subprocess.run([sys.executable, "-c", code, "analyze", str(tmp_path / "nan.csv"), "--out", str(tmp_path / "a")],
                        capture_output=True, text=True, env=cli_env(), timeout=240)  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "2 of 24 scores are not finite numbers (NaN, inf or empty): left out of the fits" in ok.stderr
    assert len(pd.read_csv(tmp_path / "a" / "relative_scores.csv")) == 22
    bad = subprocess.run([sys.executable, "-c", code, "analyze", str(tmp_path / "inf_rg.csv"), "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, env=cli_env(), timeout=240)  # fmt: skip
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "rg must be a finite number in every row, got inf (1 rows)" in bad.stderr


def test_a_dangling_last_checkpoint_names_its_missing_target(tmp_path):
    cfg = compose_train(QUICK, tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").symlink_to("step-3.ckpt")
    from plwlab.rundir import RunError

    with pytest.raises(RunError, match=r"last.ckpt points to step-3.ckpt, which does not exist; delete"):
        train(cfg)


def test_a_truncated_export_is_one_line_at_evaluation(tmp_path, finished_run):
    import shutil

    run = tmp_path / "sweep" / "run"
    shutil.copytree(finished_run, run)
    weights = run / "hf_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"cannot load the exported model .*hf_model: .*; retrain the run") as e:
        _evaluate([f"run_dir={run}"])
    assert "\n" not in str(e.value)


def test_a_run_another_launcher_trains_is_refused_once_and_its_refusal_cleared_when_it_finishes(tmp_path):
    """Two launchers on one sweep: the second is refused the run the first holds and trains the other; each summary
    lists each run once; when the holder has finished the run, no refusal is left and its launcher exits 0."""
    args = ["-m", "plw=0,1", *QUICK, f"paths.output_dir={tmp_path}"]
    held = tmp_path / "plwlab" / "data.limit=48,data.val_size=4,plw=0,trainer.max_epochs=1"
    with run_dir_lock(held):  # the other launcher, training plw=0
        second = run_cli(*args)
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
    summary = json.loads((tmp_path / "plwlab" / "sweep_summary.json").read_text())
    assert [len(summary[k]) for k in ("finished", "refused")] == [1, 1] and "in use by another" in summary["refused"][0]
    assert sum(len(v) for v in summary.values()) == 2  # each run once
    first = run_cli(*args)  # the holder's launch (here after the fact) trains plw=0, skips plw=1
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads((tmp_path / "plwlab" / "sweep_summary.json").read_text())
    assert (len(summary["finished"]), len(summary["skipped"]), summary["refused"]) == (1, 1, [])
    assert not list((tmp_path / "plwlab").glob("*/refused.json"))  # no stale refusal


def test_a_finished_run_leaves_no_handler_or_trainer_behind(tmp_path):
    """Sweep points run one after another in one process: each must free its trainer, model and optimizer. A
    SIGTERM handler left installed (Lightning's, reinstalled by the checkpoint callback) kept every run alive: a
    SmolLM2 sweep grew to 15 GB and was killed by the OOM killer after 5 runs."""
    import gc

    import lightning as L

    before = signal.getsignal(signal.SIGTERM)
    for i in range(2):
        train(compose_train(QUICK, tmp_path / f"run{i}"))
    gc.collect()
    assert signal.getsignal(signal.SIGTERM) == before
    assert not [o for o in gc.get_objects() if isinstance(o, L.Trainer)]


def test_resume_refuses_other_pretrained_weights_and_keeps_each_attempts_inputs(tmp_path):
    """The base weights replaced in place (same shapes) between two attempts: the resume was accepted and
    param_distance measured against the new base. Now refused as changed data is; allowed, every attempt's digests
    stay in status.json and metrics.json."""
    from conftest import tiny_model

    from plwlab.training.model import weights_digest

    base = tmp_path / "base"
    tiny_model(seed=0).model.save_pretrained(base)
    first = weights_digest(base)
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    assert weights_digest(copy) == first  # a copy anywhere is the same model
    args = [*QUICK, "model.config=null", f"model.name_or_path={base}", "callbacks.checkpoint.every_n_steps=3",
            "callbacks.checkpoint.keep=true"]  # fmt: skip
    run = tmp_path / "run"
    train(compose_train(args, run))
    status = {**json.loads((run / "status.json").read_text()), "status": "interrupted"}  # killed after its checkpoint
    (run / "status.json").write_text(json.dumps(status))
    assert status["inputs"]["base_weights_sha256"] == first
    tiny_model(seed=1).model.save_pretrained(base)  # other values, the same shapes and file size
    assert weights_digest(base) != first
    with pytest.raises(RunRefused, match=r"cannot resume: the pretrained weights changed since the checkpoint "
                                         r"\(base_weights_sha256 \w{16} -> \w{16}\)") as refused:  # fmt: skip
        train(compose_train(args, run))
    assert "\n" not in str(refused.value) and json.loads((run / "status.json").read_text()) == status
    metrics = train(compose_train([*args, "allow_data_change=true"], run))
    history = json.loads((run / "status.json").read_text())["input_history"]
    last_step = int(os.readlink(run / "checkpoints" / "last.ckpt").split("-")[1].split(".")[0])
    assert [(h["attempt"], h["base_weights_sha256"]) for h in history] == [(1, first), (2, weights_digest(base))]
    assert history[1]["from_step"] == last_step and history[0]["from_step"] == 0
    assert metrics["input_history"] == history and metrics["base_weights_sha256"] == weights_digest(base)
    # the tiny preset's model is built from its config: no pretrained weights to digest
    assert train(compose_train(QUICK, tmp_path / "plain"))["base_weights_sha256"] is None


def test_a_full_disk_during_the_export_keeps_the_trained_steps_and_a_resume_exports(tmp_path, monkeypatch):
    """No space left while hf_model/ is written: no partial hf_model/ stays, the final step is checkpointed (the
    last periodic checkpoint was step 0 of 4), the error says where, and a resume exports the same weights an
    uninterrupted run does, without training again."""
    import errno

    from safetensors.torch import load_file
    from transformers import PreTrainedModel

    overrides = [*QUICK, "trainer.max_steps=4", "trainer.val_check_interval=4", "callbacks.checkpoint.every_n_steps=100"]
    real = PreTrainedModel.save_pretrained

    def disk_full(self, path, **kwargs):
        (Path(path) / "model.safetensors").write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    run = tmp_path / "run"
    with pytest.raises(RunError, match=r"cannot write the model export .*/run/hf_model: No space left on device; the "
                                       r"trained state is in .*/run/checkpoints/last.ckpt \(step 4\)\. Free space and "
                                       r"resume the run: it exports without training again"):  # fmt: skip
        train(compose_train(overrides, run))
    assert not (run / "hf_model").exists() and [p.name for p in run.iterdir() if "hf_model" in p.name] == []
    assert json.loads((run / "status.json").read_text())["status"] == "failed"
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real)
    resumed = train(compose_train(overrides, run))
    assert resumed["global_steps"] == 4 and (run / "hf_model" / "plwlab.json").exists()
    assert json.loads((run / "status.json").read_text())["status"] == "finished" and not (run / "checkpoints").exists()
    whole = tmp_path / "whole"
    uninterrupted = train(compose_train(overrides, whole))
    a, b = load_file(run / "hf_model" / "model.safetensors"), load_file(whole / "hf_model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.keys() == uninterrupted.keys()  # metrics.json: every key, the trained attempt's values
    for key in ("val/loss", "final_train_loss", "loss_rsd", "param_distance", "rg", "n_train"):
        assert resumed[key] == uninterrupted[key], key
