import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from plwlab.config import ConfigError
from plwlab.train import train

from conftest import ROOT, compose_train

QUICK = ["data.limit=48", "data.val_size=4", "trainer.max_epochs=1", "callbacks.progress=null"]


def read_metrics_csv(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def train_losses(run_dir: Path) -> list[float]:
    return [float(r["train/loss"]) for r in read_metrics_csv(run_dir) if r.get("train/loss")]


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_schema_makes_plw_a_float(tmp_path):
    cfg = compose_train(["plw=0"], tmp_path)
    assert isinstance(cfg.plw, float) and cfg.plw == 0.0
    llama = compose_train(["model=llama2"], tmp_path)
    assert llama.model.name_or_path == "meta-llama/Llama-2-7b-hf" and llama.model.dtype == "bfloat16"
    assert llama.optim.lr == 2e-5 and llama.optim.warmup_ratio == 0.03 and llama.optim.weight_decay == 0
    assert compose_train(["model=llama1"], tmp_path).model.name_or_path == "huggyllama/llama-7b"


@pytest.mark.parametrize(("override", "message"), [("plw=-0.5", "plw must be >= 0"), ("plw=1.5", "allow_plw_above_one")])
def test_invalid_plw(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train(compose_train([override], tmp_path))


def test_end_to_end_run_directory_and_hf_export(tmp_path):
    metrics = train(compose_train([*QUICK, "plw=0.05", "callbacks.param_distance.every_n_steps=2"], tmp_path))
    for name in ("config.yaml", "metrics.csv", "metrics.json", "checkpoints/last.ckpt", "hf_model/plwlab.json"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    assert metrics["plw"] == 0.05 and metrics["global_steps"] == 6  # 44 train examples / batch 8
    assert metrics["loss_rsd"] > 0 and metrics["param_distance"] > 0 and metrics["val/loss"] > 0

    rows = read_metrics_csv(tmp_path)
    assert len(train_losses(tmp_path)) == 6
    assert all(r["train/prompt_loss"] and r["train/completion_loss"] for r in rows if r.get("train/loss"))
    assert sum(bool(r.get("param_distance/total")) for r in rows) == 4  # steps 2, 4, 6 and the end of training
    assert any(r.get("param_distance/layer_01") for r in rows)

    export = tmp_path / "hf_model"
    meta = json.loads((export / "plwlab.json").read_text())
    assert meta["plw"] == 0.05 and meta["data"] == "alpaca_sample" and meta["model"] == "tiny-llama"
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, state[f"model.{name}"], msg=name)
    assert tokenizer.pad_token_id == 3


def test_run_on_a_variant_keeps_its_manifest(tmp_path):
    overrides = [*QUICK, "data=rg_target", "data.target_rg=1.0", "data.path=${plwlab.asset:alpaca_sample.json}",
                 f"paths.data_dir={tmp_path / 'data'}", "callbacks.hf_export=null"]  # fmt: skip
    metrics = train(compose_train(overrides, tmp_path))
    manifest = json.loads((tmp_path / "data_manifest.json").read_text())
    assert manifest["variant"] == "rg_target" and manifest["target_rg"] == 1.0
    assert manifest["rg"] == pytest.approx(1.0, rel=0.01) and metrics["global_steps"] == 11  # 44 / batch 4
    assert list((tmp_path / "data").glob("rg_target-1-*.json"))


def test_lora_run(tmp_path):
    lora = "model.lora={r:4,lora_alpha:8,target_modules:[q_proj,v_proj]}"
    metrics = train(compose_train([*QUICK, lora, "callbacks.param_distance=null"], tmp_path))
    assert metrics["global_steps"] == 6
    assert (tmp_path / "hf_model" / "adapter_config.json").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("plw=-1", "error: plw must be >= 0, got -1.0"),
        ("plw=2", "error: plw=2.0 > 1 up-weights prompts over completions; set allow_plw_above_one=true if meant"),
        ("data.path=/nonexistent/data.json", "error: data file not found: /nonexistent/data.json"),
        ("loss.normalization=mean", "error: loss.normalization must be one of"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, override, message):
    result = run_cli(override, f"paths.output_dir={tmp_path}")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr


def test_cli_unknown_model_preset(tmp_path):
    result = run_cli("model=llama3", f"paths.output_dir={tmp_path}")
    assert result.returncode != 0
    assert "Could not find 'model/llama3'" in result.stderr and "llama2" in result.stderr


def test_cli_multirun_plw_sweep(tmp_path):
    result = run_cli("-m", "plw=0,1", *QUICK, f"paths.output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(tmp_path.glob("plwlab/*/metrics.json"))  # sweep dirs are keyed by overrides, not by time
    assert len(runs) == 2
    assert [[k for k in p.parent.name.split(",") if k.startswith("plw=")] for p in runs] == [["plw=0"], ["plw=1"]]
    plws = [json.loads(p.read_text())["plw"] for p in runs]
    assert plws == [0.0, 1.0] and all(isinstance(x, float) for x in plws)
    # same seed and data order: PLW only changes the loss, so the two runs start from the same step-0 batch
    first = [train_losses(p.parent)[0] for p in runs]
    assert first[0] != first[1]


def test_two_process_ddp_equals_one_process(tmp_path):
    common = ["data.limit=60", "data.val_size=4", "trainer.max_steps=5", "trainer.precision=64-true", "callbacks.progress=null",
              "callbacks.param_distance.every_n_steps=5", "plw=0.1"]  # fmt: skip
    single = run_cli(*common, "data.batch_size=4", f"hydra.run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_cli(*common, "data.batch_size=1", "trainer.accumulate_grad_batches=2", "trainer.devices=2",
                  "strategy=ddp", f"hydra.run.dir={tmp_path / 'ddp'}")  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "MEMBER: 2/2" in ddp.stdout + ddp.stderr  # really two processes
    a, b = train_losses(tmp_path / "single"), train_losses(tmp_path / "ddp")
    assert len(a) == len(b) == 5
    assert b == pytest.approx(a, rel=1e-9)
    dist = [json.loads((tmp_path / d / "metrics.json").read_text())["param_distance"] for d in ("single", "ddp")]
    assert dist[1] == pytest.approx(dist[0], rel=1e-9)


def test_wandb_offline_logger(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose_train([*QUICK, "logger=wandb", "name=sweep-a", "plw=0.01"], tmp_path)
    assert cfg.logger.wandb.group == "sweep-a"
    assert list(cfg.logger.wandb.tags) == ["alpaca_sample", "tiny-llama", "plw=0.01"]
    train(cfg)
    import wandb

    wandb.finish()  # flush the offline run
    assert (tmp_path / "metrics.csv").exists()  # the CSV logger stays on
    runs = list(tmp_path.rglob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))
    history = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    assert b"param_distance/total" in history  # callbacks log to every logger, not only the first
