"""Sweeps at scale on CPU: resume after kill -9, skip finished runs, failure isolation, plan, launchers, disk errors."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plwlab.config import ConfigError
from plwlab.train import AtomicCheckpointIO, RunError, train

from conftest import ROOT, compose_train
from test_train import QUICK, run_cli, train_losses

RESUMABLE = ["data.limit=100", "data.val_size=4", "trainer.max_epochs=2", "callbacks.checkpoint.every_n_train_steps=5",
             "callbacks.progress=null", "model.config.hidden_size=256", "model.config.intermediate_size=688"]  # fmt: skip


def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run_cli(*RESUMABLE, f"hydra.run.dir={whole}").returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RESUMABLE, f"hydra.run.dir={broken}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while not (broken / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = torch.load(broken / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 0 < step < 24 and json.loads((broken / "status.json").read_text())["status"] == "running"
    resumed = run_cli(*RESUMABLE, f"hydra.run.dir={broken}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, broken))
    assert b["resumed"] and b["global_steps"] == a["global_steps"] == 24
    for key in ("final_train_loss", "param_distance", "loss_rsd", "val/loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), key
    wa, wb = load_file(whole / "hf_model" / "model.safetensors"), load_file(broken / "hf_model" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    status = json.loads((broken / "status.json").read_text())
    assert status["status"] == "finished" and status["attempts"] == 2
    assert list(broken.glob("metrics.attempt1.csv"))  # the first attempt's log is kept, not overwritten


def test_same_seed_same_loss_curve_and_finished_runs_are_skipped(tmp_path):
    a = train(compose_train([*QUICK, "plw=0.3"], tmp_path / "a"))
    b = train(compose_train([*QUICK, "plw=0.3"], tmp_path / "b"))
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")  # bit-identical on CPU
    again = train(compose_train([*QUICK, "plw=0.3"], tmp_path / "a"))
    assert again["skipped"] and again["final_train_loss"] == a["final_train_loss"] == b["final_train_loss"]
    with pytest.raises(ConfigError, match="different config"):
        train(compose_train([*QUICK, "plw=0.3", "optim.lr=0.01"], tmp_path / "a"))


def test_sweep_isolates_failures_summarises_and_relaunch_skips(tmp_path):
    args = ["-m", "plw=0,7", *QUICK, f"paths.output_dir={tmp_path}"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads((tmp_path / "plwlab" / "sweep_summary.json").read_text())
    assert len(summary["finished"]) == 1 and len(summary["failed"]) == 1 and "allow_plw_above_one" in summary["failed"][0]
    plan = run_cli(*args, "plan_only=true")
    assert "1 done (skip); 1 failed (retry)" in plan.stdout.replace("\n", " ") and "nothing launched" in plan.stdout
    again = run_cli(*args)
    summary = json.loads((tmp_path / "plwlab" / "sweep_summary.json").read_text())
    assert len(summary["skipped"]) == 1 and len(summary["failed"]) == 1, again.stdout[-2000:]


def test_paper_grid_plan_has_60_runs():
    plan = run_cli("-m", "experiment=paper_grid", "plan_only=true")
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "Sweep plan: 60 runs" in plan.stdout.replace("\n", " ") and "nothing launched" in plan.stdout


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    ours = run_cli(*QUICK, f"hydra.run.dir={tmp_path / 'hydra'}", f"paths.run_dir={blocker / 'run'}")
    assert ours.returncode != 0 and "Traceback" not in ours.stderr
    assert ours.stderr.strip().splitlines()[-1] == f"error: cannot write to run directory {blocker / 'run'}: Not a directory"
    hydras = run_cli(*QUICK, f"hydra.run.dir={blocker / 'run'}")  # Hydra creates its own output dir first
    assert hydras.returncode != 0 and f"Not a directory: '{blocker / 'run'}'" in hydras.stderr
    assert blocker.read_text() == "not a directory"  # nothing overwritten


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def full_disk(obj, f):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RunError, match="No space left on device; the previous checkpoint is intact"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1} and not list(tmp_path.glob(".*tmp*"))


def test_submitit_local_launcher(tmp_path):
    result = run_cli("-m", "plw=0,1", "hydra/launcher=local", *QUICK, f"paths.output_dir={tmp_path}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = [json.loads(p.read_text())["status"] for p in tmp_path.rglob("status.json")]
    assert statuses == ["finished", "finished"]


def test_two_process_fsdp2_equals_one_process(tmp_path):
    common = ["data.limit=60", "data.val_size=4", "trainer.max_steps=5", "model.dtype=float64", "callbacks.progress=null",
              "callbacks.param_distance.every_n_steps=5", "plw=0.1"]  # fmt: skip
    single = run_cli(*common, "data.batch_size=4", f"hydra.run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = run_cli(*common, "data.batch_size=2", "trainer.devices=2", "strategy=fsdp2", f"hydra.run.dir={tmp_path / 'fsdp2'}")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert train_losses(tmp_path / "fsdp2") == pytest.approx(train_losses(tmp_path / "single"), rel=1e-9)
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("single", "fsdp2"))
    assert b["param_distance"] == pytest.approx(a["param_distance"], rel=1e-9)  # gathered from DTensor shards
    wa, wb = (load_file(tmp_path / d / "hf_model" / "model.safetensors") for d in ("single", "fsdp2"))
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-9
    assert (tmp_path / "fsdp2" / "checkpoints" / "last.ckpt").is_dir()  # a sharded (distributed) checkpoint


def test_fsdp_strategy_config_instantiates(tmp_path):
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = compose_train(["strategy=fsdp", "model=llama2", "trainer=gpu"], tmp_path)
    strategy = instantiate(cfg.strategy)
    assert isinstance(strategy, FSDPStrategy) and strategy.sharding_strategy.name == "FULL_SHARD"
    assert LlamaDecoderLayer in strategy.kwargs["auto_wrap_policy"]._module_classes
    assert cfg.trainer.precision == "bf16-mixed" and cfg.model.dtype == "bfloat16"
