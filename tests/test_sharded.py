"""The sharded path (strategy=fsdp: FSDP2) run for real on 2 CPU processes (gloo): equal to 1 process with gradient
clipping, every default callback, the chunked loss, activation checkpointing, packed chat data with per-segment
weights, and LoRA; exact resume after kill -9;
fp32 master weights; one torchrun process group per sweep point; one W&B run per run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, sigint_default
from safetensors.torch import load_file
from test_train import cli_env, read_metrics_csv, run_cli, train_losses

# float64 so that 1 and 2 processes agree to 1e-9 (only the summation order differs)
COMMON = ["data.limit=60", "data.val_size=4", "model.dtype=float64", "callbacks.progress=null", "plw=0.1",
          "callbacks.param_distance.every_n_steps=5", "trainer.gradient_clip_val=0.3", "loss.chunk_tokens=64",
          "model.gradient_checkpointing=true", "global_batch_size=4"]  # fmt: skip
SHARDED = ["trainer.devices=2", "strategy=fsdp", "data.batch_size=2"]
# multi-turn chat data with per-segment weights, packed: the general loss over ranks
CHAT = ["data=chat_sample", "model.chat_template=chatml", "data.batching=packed", "data.max_length=256",
        "loss.segment_weights={template: 0, system: 0.5, earlier_assistant: 0.3}"]  # fmt: skip
SINGLE = ["data.batch_size=4"]


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def weights(run_dir: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(run_dir / "hf_model" / name)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_fsdp_on_two_processes_equals_one_process(tmp_path):
    """Packed multi-turn chat data with per-segment weights, per-example weights (data.weight_column), a
    completion weight other than 1 and the share normalization (each step's counts read ahead on every rank): the
    general loss over two ranks equals it in one process."""
    from test_weights import CHAT_SAMPLE, weighted_copy

    data = weighted_copy(CHAT_SAMPLE, tmp_path / "weighted.jsonl")
    args = [*COMMON, *CHAT, "trainer.max_steps=6", f"data.path={data}", "data.weight_column=w",
            "loss.completion_weight=0.8", "loss.normalization=share"]  # fmt: skip
    single = run_cli(*args, *SINGLE, f"hydra.run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = run_cli(*args, *SHARDED, f"hydra.run.dir={tmp_path / 'fsdp'}")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    a, b = metrics(tmp_path / "single"), metrics(tmp_path / "fsdp")
    assert b["strategy"] == "FSDP2Strategy" and b["world_size"] == 2 and b["global_batch_size"] == 4
    assert b["data_format"] == "messages" and b["segment_weights"]["earlier_assistant"] == 0.3
    assert b["segment_weights"]["assistant"] == 0.8 and b["example_weights"]["column"] == "w"
    assert train_losses(tmp_path / "fsdp") == pytest.approx(train_losses(tmp_path / "single"), rel=1e-9)
    norms = [[float(r["train/grad_norm"]) for r in read_metrics_csv(tmp_path / d) if r.get("train/grad_norm")]
             for d in ("single", "fsdp")]  # fmt: skip
    assert norms[1] == pytest.approx(norms[0], rel=1e-9) and len(norms[0]) == 6
    assert max(norms[0]) > 0.3  # clipping was active, and clipped the sharded gradients identically
    for key in ("param_distance", "loss_rsd", "final_train_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-9), key
    assert max_diff(weights(tmp_path / "single"), weights(tmp_path / "fsdp")) <= 1e-9  # gathered export
    assert b["param_dtype"] == b["optimizer_state_dtype"] == b["compute_dtype"] == "float64"
    assert a["optimizer_impl"] == b["optimizer_impl"] == "fused"  # over DTensor shards too
    assert not (tmp_path / "fsdp" / "checkpoints").exists()  # removed once finished (keep=false)


def run_group(*args: str, timeout: int) -> tuple[int | None, str]:
    """train.py in its own process group; on timeout the whole group (every rank) is killed and None returned."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return None, proc.communicate()[0]


def test_fsdp_validation_on_uneven_shards_finishes_with_the_single_process_val_loss(tmp_path):
    """5 validation examples in eval batches of 2 on 2 ranks: 3 examples (2 batches) on rank 0, 2 (1 batch) on
    rank 1. FSDP needs every rank in every forward, so unequal batch counts hang; padded with empty rows, they
    finish, and the validation loss is the one process's."""
    args = ["data.limit=20", "data.val_size=5", "data.eval_batch_size=2", "model.dtype=float64", "callbacks.progress=null",
            "trainer.max_epochs=1", "global_batch_size=4", "callbacks.param_distance=null"]  # fmt: skip
    code, out = run_group(*args, *SHARDED, f"hydra.run.dir={tmp_path / 'fsdp'}", timeout=240)
    assert code == 0, f"exit {code} (None: hung, killed)\n{out[-3000:]}"
    code, out = run_group(*args, *SINGLE, f"hydra.run.dir={tmp_path / 'single'}", timeout=240)
    assert code == 0, out[-3000:]
    a, b = metrics(tmp_path / "single"), metrics(tmp_path / "fsdp")
    assert b["world_size"] == 2 and b["val/loss"] == pytest.approx(a["val/loss"], rel=1e-9)
    assert b["val/prompt_loss"] == pytest.approx(a["val/prompt_loss"], rel=1e-9)


def test_two_nodes_of_two_ranks_hsdp_equals_one_process(tmp_path):
    """torchrun --nnodes=2 on localhost: 2 "nodes" x 2 ranks, HSDP (sharded within a node, replicated across nodes),
    accumulation 2 with the cross-node all-reduce deferred to the last micro-batch ("replicas"), or every
    reduction deferred ("all"): both equal one process to 1e-9 in float64."""
    args = [*COMMON, *CHAT, "trainer.max_steps=6", "global_batch_size=8"]
    single = run_cli(*args, "data.batch_size=8", f"hydra.run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    for defer in ("replicas", "all"):
        run_dir, port = tmp_path / defer, str(29500 + os.getpid() % 1000 + len(defer))
        nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
                                   f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}",
                                   str(ROOT / "train.py"), *args, "trainer.devices=2", "trainer.num_nodes=2", "strategy=fsdp",
                                   "data.batch_size=1", f"strategy.defer_gradient_sync={defer}", f"hydra.run.dir={run_dir}"],
                                  env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for rank in (0, 1)]  # fmt: skip
        for node in nodes:
            _, err = node.communicate(timeout=600)
            assert node.returncode == 0, err[-3000:]
        a, b = metrics(tmp_path / "single"), metrics(run_dir)
        assert (b["world_size"], b["accumulate_grad_batches"], b["sharding"]) == (4, 2, "hsdp 2x2")
        assert train_losses(run_dir) == pytest.approx(train_losses(tmp_path / "single"), rel=1e-9), defer
        for key in ("param_distance", "loss_rsd", "final_train_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-9), (defer, key)
        assert max_diff(weights(tmp_path / "single"), weights(run_dir)) <= 1e-9, defer


@pytest.mark.parametrize("tied", [False, True], ids=["separate_head", "tied_embeddings"])
def test_a_pretrained_model_is_read_by_rank_0_and_broadcast_into_the_shards(tmp_path, tied):
    """A pretrained model on 2 FSDP ranks: rank 1 builds it on the meta device and gets rank 0's weights by broadcast
    (the rotary buffers kept, tied embeddings tied again: SmolLM2's case); training equals one process to 1e-9 in
    float64. The peak host memory of each rank is recorded (host_rss_gb): rank 1 never holds the whole model."""
    from conftest import TINY_CONFIG

    from plwlab import ASSETS
    from plwlab.training.model import load_model

    torch.manual_seed(3)
    loaded = load_model(name="tiny", tokenizer=str(ASSETS / "tiny_tokenizer"), dtype="float64",
                        config={**TINY_CONFIG, "tie_word_embeddings": tied})  # fmt: skip
    assert (loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight) == tied
    loaded.model.save_pretrained(tmp_path / "pretrained")
    loaded.tokenizer.save_pretrained(tmp_path / "pretrained")
    model = ["model.config=null", f"model.name_or_path={tmp_path / 'pretrained'}", f"model.tokenizer={tmp_path / 'pretrained'}"]
    args = [*COMMON, *model, "trainer.max_steps=6"]
    for name, extra in (("single", SINGLE), ("fsdp", SHARDED)):
        result = run_cli(*args, *extra, f"hydra.run.dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr[-3000:]
    a, b = metrics(tmp_path / "single"), metrics(tmp_path / "fsdp")
    assert train_losses(tmp_path / "fsdp") == pytest.approx(train_losses(tmp_path / "single"), rel=1e-9)
    assert b["param_distance"] == pytest.approx(a["param_distance"], rel=1e-9)
    assert max_diff(weights(tmp_path / "single"), weights(tmp_path / "fsdp")) <= 1e-9
    assert len(b["host_rss_gb"]) == 2 and all(0 < gb < 10 for gb in b["host_rss_gb"])


def test_fsdp_lora_on_two_processes_equals_one_process(tmp_path):
    args = [*COMMON, "trainer.max_steps=4", "model.lora={r:4,lora_alpha:8,target_modules:[q_proj,v_proj]}"]
    for name, extra in (("single", SINGLE), ("fsdp", SHARDED)):
        result = run_cli(*args, *extra, f"hydra.run.dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr[-3000:]
    a, b = metrics(tmp_path / "single"), metrics(tmp_path / "fsdp")
    assert train_losses(tmp_path / "fsdp") == pytest.approx(train_losses(tmp_path / "single"), rel=1e-9)
    assert b["param_distance"] == pytest.approx(a["param_distance"], rel=1e-9) and a["param_distance"] > 0  # ΔW
    adapter = "adapter_model.safetensors"
    assert max_diff(weights(tmp_path / "single", adapter), weights(tmp_path / "fsdp", adapter)) <= 1e-9


def test_fsdp_kill_9_mid_epoch_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = [*COMMON, "data.limit=100", "trainer.max_epochs=2", "callbacks.checkpoint.every_n_steps=5",
            "logger=[wandb,tensorboard]"]  # fmt: skip
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    # the uninterrupted run is sharded too: 1 and 2 processes differ in float64 summation order, which 48 AdamW
    # steps grow to ~1e-5 (the 6-step equality is test_fsdp_on_two_processes_equals_one_process); resume is exact
    assert run_cli(*args, *SHARDED, f"hydra.run.dir={whole}").returncode == 0
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, *SHARDED, f"hydra.run.dir={broken}"],
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 240
    while not (broken / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its second rank
    proc.wait()
    meta = torch.load(broken / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=False)
    assert 0 < meta["global_step"] < 24  # mid-way through the first of two 24-step epochs
    first = json.loads((broken / "status.json").read_text())
    resumed = run_cli(*args, *SHARDED, f"hydra.run.dir={broken}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr  # Lightning knows the loader resumes mid-epoch
    a, b = metrics(whole), metrics(broken)
    assert b["resumed"] and b["global_steps"] == a["global_steps"] == 48
    assert b.keys() == a.keys()  # metrics.json after the resume: every key the uninterrupted run has
    for key in ("final_train_loss", "param_distance", "loss_rsd", "val/loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-12, abs=1e-12), key
    assert max_diff(weights(whole), weights(broken)) <= 1e-12
    status = json.loads((broken / "status.json").read_text())
    assert status["status"] == "finished" and status["attempts"] == 2
    assert status["wandb_id"] == first["wandb_id"]  # the resumed attempt continues the same W&B run
    runs = sorted((broken / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(status["wandb_id"]) for r in runs)
    # rank 0 alone logs: one W&B run per attempt (above), its config and summary the run's, one TensorBoard folder
    # whose values (the resumed attempt's over the killed one's) are metrics.csv's
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_trackers import csv_series
    from wandb_records import read_run

    last = read_run(runs[-1])
    assert last.config["world_size"] == 2 and last.summary["final_train_loss"] == pytest.approx(b["final_train_loss"])
    assert {p.parent for p in broken.glob("**/events.out.tfevents.*")} == {broken / "tensorboard"}
    events = EventAccumulator(str(broken / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(csv_series(broken, "train/loss"), rel=1e-9)


def test_sweep_of_multi_process_points_runs_each_in_its_own_torchrun_group(tmp_path, monkeypatch):
    """As a user types it on a multi-GPU node (no launcher named): each sweep point in its own 2-process group,
    bf16 compute over fp32 master weights, one W&B run each."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = run_cli("-m", "plw=0,1", *SHARDED, "data.limit=40", "data.val_size=4",
                     "trainer.max_steps=3", "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1.0",
                     "callbacks.progress=null", "logger=wandb", f"paths.output_dir={tmp_path}", timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "plwlab"
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert len(summary["finished"]) == 2 and not summary["failed"], summary
    runs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert [metrics(r)["plw"] for r in runs] == [0.0, 1.0]
    for r in runs:
        m = metrics(r)
        assert (m["world_size"], m["precision"]) == (2, "bf16-mixed")
        assert (m["param_dtype"], m["compute_dtype"], m["optimizer_state_dtype"]) == ("float32", "bfloat16", "float32")
    ids = [json.loads((r / "status.json").read_text())["wandb_id"] for r in runs]
    assert len(set(ids)) == 2
    for r, run_id in zip(runs, ids):
        (offline,) = (r / "wandb").glob("offline-run-*")
        assert offline.name.endswith(run_id) and list(offline.glob("*.wandb"))


def test_failing_torchrun_points_are_failures_in_the_summary_and_the_exit_code(tmp_path):
    """Both points fail in their ranks before training starts (their data file is missing; a bad config value is
    refused before any point starts): each is recorded as failed with its processes' exit code, the summary says
    so and the sweep exits 1."""
    result = run_cli("-m", "plw=0,1", "hydra/launcher=torchrun", *SHARDED, f"data.path={tmp_path / 'missing.json'}",
                     f"paths.output_dir={tmp_path}")  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    summary = json.loads((tmp_path / "plwlab" / "sweep_summary.json").read_text())
    assert len(summary["failed"]) == 2 and not summary["finished"], summary
    for status in (json.loads(p.read_text()) for p in (tmp_path / "plwlab").glob("*/status.json")):
        assert status["status"] == "failed" and "missing.json" in status["error"]


def test_killing_the_launcher_stops_its_torchrun_group(tmp_path):
    marker = str(tmp_path / "sweep")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", "plw=0,1", "hydra/launcher=torchrun", *SHARDED, "data.limit=400",
                             "trainer.max_epochs=50", "callbacks.progress=null", f"paths.output_dir={marker}"],
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    def others() -> list[str]:  # torchrun and its ranks: every process naming the sweep but the launcher
        found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
        return [pid for pid in found if int(pid) != proc.pid]

    deadline = time.time() + 180
    while not list(Path(marker).rglob("metrics.csv")) and time.time() < deadline:  # the ranks are training
        time.sleep(1)
    assert len(others()) >= 3, "torchrun and two ranks should be running"
    proc.kill()  # SIGKILL: the launcher cannot clean up; its children must notice on their own
    proc.wait()
    deadline = time.time() + 60
    while others() and time.time() < deadline:
        time.sleep(1)
    left = others()
    for pid in left:
        os.kill(int(pid), signal.SIGKILL)
    assert not left, f"processes outlived the launcher: {left}"


def test_basic_launcher_refuses_a_multi_process_sweep(tmp_path):
    result = run_cli("-m", "plw=0,1", "hydra/launcher=basic", "trainer.devices=2", "strategy=fsdp",
                     f"paths.output_dir={tmp_path}")  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "use hydra/launcher=torchrun" in result.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.rglob("status.json"))  # refused before any run started


def test_ctrl_c_on_a_sweep_of_torchrun_groups_ends_in_one_line(tmp_path):
    """SIGINT to the launcher reaches the group; the launcher ends with one line saying how to resume (no Python
    traceback), and the run is recorded as interrupted."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", "plw=0", *SHARDED, "data.limit=400",
                             "trainer.max_epochs=50", "callbacks.progress=null", f"paths.output_dir={tmp_path}"],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)  # fmt: skip
    deadline = time.time() + 180
    while not list(tmp_path.rglob("metrics.csv")) and time.time() < deadline:  # the ranks are training
        time.sleep(1)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted (stopped by SIGINT): relaunch the same command"), err[-3000:]
    (status,) = [json.loads(p.read_text()) for p in (tmp_path / "plwlab").glob("*/status.json")]
    assert status["status"] == "interrupted"


def test_killing_one_rank_ends_the_others_in_one_line(tmp_path):
    """kill -9 of one FSDP rank: the other rank's failed collective is one line naming what happened, torchrun's
    is one line with the exit codes, and the sweep records the run as failed (relaunching resumes it)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", "plw=0", *SHARDED, "data.limit=400",
                             "trainer.max_epochs=50", "callbacks.progress=null", f"paths.output_dir={tmp_path}"],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)  # fmt: skip
    deadline = time.time() + 180
    while not list(tmp_path.rglob("metrics.csv")) and time.time() < deadline:
        time.sleep(1)
    found = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    ranks = [int(p) for p in found if int(p) != proc.pid and not any(  # not the launcher, not torchrun
             s in Path(f"/proc/{p}/cmdline").read_text() for s in ("plwlab.training.launch", "torch.distributed.run"))]
    assert len(ranks) == 2, ranks
    os.kill(max(ranks), signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert "stopped: another process of this run died" in err and "torchrun: rank" in err, err[-3000:]
    summary = json.loads((tmp_path / "plwlab" / "sweep_summary.json").read_text())
    assert len(summary["failed"]) == 1, summary
