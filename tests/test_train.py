import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_train
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from plwlab.config import ConfigError, batch_geometry
from plwlab.training.train import train

QUICK = ["data.limit=48", "data.val_size=4", "trainer.max_epochs=1", "callbacks.progress=null"]


def read_metrics_csv(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def train_losses(run_dir: Path) -> list[float]:
    return [float(r["train/loss"]) for r in read_metrics_csv(run_dir) if r.get("train/loss")]


def cli_env() -> dict[str, str]:
    """The test process's environment for a train.py subprocess, without the W&B service that an in-process W&B
    run of an earlier test started (a child would register its runs there)."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "0"}


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_schema_makes_plw_a_float(tmp_path):
    cfg = compose_train(["plw=0"], tmp_path)
    assert isinstance(cfg.plw, float) and cfg.plw == 0.0
    llama = compose_train(["model=llama2"], tmp_path)
    assert llama.model.name_or_path == "meta-llama/Llama-2-7b-hf" and llama.model.dtype == "float32"  # fp32 master weights
    assert llama.optim.lr == 2e-5 and llama.optim.warmup_ratio == 0.03 and llama.optim.weight_decay == 0
    assert compose_train(["model=llama1"], tmp_path).model.name_or_path == "huggyllama/llama-7b"


@pytest.mark.parametrize(("override", "message"), [("plw=-0.5", "plw must be >= 0"), ("plw=1.5", "allow_plw_above_one")])
def test_invalid_plw(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train(compose_train([override], tmp_path))


def test_end_to_end_run_directory_and_hf_export(tmp_path):
    overrides = [*QUICK, "plw=0.05", "callbacks.param_distance.every_n_steps=2", "callbacks.checkpoint.keep=true"]
    metrics = train(compose_train(overrides, tmp_path))
    for name in ("config.yaml", "metrics.csv", "metrics.json", "checkpoints/last.ckpt", "hf_model/plwlab.json"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["plw"] == 0.05 and metrics["global_steps"] == 6  # 44 train examples / batch 8
    assert (tmp_path / "checkpoints" / "last.ckpt").resolve().name == "step-00000006.ckpt"  # keep: the final state
    assert (metrics["param_dtype"], metrics["compute_dtype"], metrics["optimizer_state_dtype"]) == ("float32",) * 3
    assert metrics["optimizer_impl"] == "fused"  # CPU has the fused AdamW kernel (PyTorch's default is the loop)
    assert metrics["loss_rsd"] > 0 and metrics["param_distance"] > 0 and metrics["val/loss"] > 0

    rows = read_metrics_csv(tmp_path)
    assert len(train_losses(tmp_path)) == 6
    assert all(r["train/prompt_loss"] and r["train/completion_loss"] for r in rows if r.get("train/loss"))
    assert sum(bool(r.get("param_distance/total")) for r in rows) == 4  # steps 2, 4, 6 and the end of training
    assert any(r.get("param_distance/layer_01") for r in rows)

    export = tmp_path / "hf_model"
    meta = json.loads((export / "plwlab.json").read_text())
    assert meta["plw"] == 0.05 and meta["dataset"] == "alpaca_sample" and meta["model"] == "tiny-llama"
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
        ("plw=nan", "error: plw must be a finite number, got nan"),
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
    result = run_cli("model=llama9", f"paths.output_dir={tmp_path}")
    assert result.returncode != 0
    assert "Could not find 'model/llama9'" in result.stderr and "llama2" in result.stderr


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
    ddp = run_cli(*common, "data.batch_size=1", "global_batch_size=4", "trainer.devices=2",
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
    train(cfg)  # finishes its W&B run itself
    assert (tmp_path / "metrics.csv").exists()  # the CSV logger stays on
    runs = list(tmp_path.rglob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))
    history = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    assert b"param_distance/total" in history  # callbacks log to every logger, not only the first


def test_each_run_of_a_sweep_gets_its_own_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = run_cli("-m", "plw=0,1", *QUICK, "logger=wandb", f"paths.output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reuse this run" not in result.stderr
    runs = sorted(tmp_path.glob("plwlab/*/status.json"))
    ids = [json.loads(p.read_text())["wandb_id"] for p in runs]
    assert len(runs) == 2 and len(set(ids)) == 2
    for status, run_id in zip(runs, ids):
        (offline,) = (status.parent / "wandb").glob("offline-run-*")
        history = b"".join(p.read_bytes() for p in offline.glob("*.wandb"))
        assert offline.name.endswith(run_id) and b"train/loss" in history


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.dtype=bfloat16"], "model.dtype=bfloat16 makes AdamW update bfloat16 weights"),
        (["trainer.precision=bf16-true"], "trainer.precision=bf16-true makes AdamW update bf16 weights"),
        (["trainer.devices=-1"], "trainer.devices=-1 makes the global batch depend on the devices visible"),
        (["global_batch_size=12"], "global_batch_size=12 is not a positive multiple of data.batch_size 8 x 1 processes"),
        (["+trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches is derived"),
    ],
)
def test_batch_geometry_and_precision_are_checked(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        train(compose_train([*QUICK, *overrides], tmp_path))


def test_bf16_weights_when_allowed_and_for_a_lora_base(tmp_path):
    metrics = train(compose_train([*QUICK, "trainer.max_steps=1", "model.dtype=bfloat16", "allow_low_precision_weights=true",
                                   "callbacks.hf_export=null"], tmp_path / "a"))  # fmt: skip
    assert metrics["param_dtype"] == metrics["optimizer_state_dtype"] == "bfloat16"
    lora = "model.lora={r:4,lora_alpha:8,target_modules:[q_proj,v_proj]}"  # frozen bf16 base, fp32 adapter
    metrics = train(compose_train([*QUICK, "trainer.max_steps=1", "model.dtype=bfloat16", lora], tmp_path / "b"))
    assert metrics["param_dtype"] == metrics["optimizer_state_dtype"] == "float32"


def test_the_default_trainer_is_what_the_machine_has(tmp_path, monkeypatch):
    """trainer=auto: on a machine without GPU exactly trainer=cpu (the offline default); with 4 visible GPUs all
    four, bf16 compute over fp32 master weights, clipping at 1.0 (trainer=gpu's recipe)."""
    import plwlab.config as config

    auto = compose_train([], tmp_path)
    assert OmegaConf.to_container(auto.trainer, resolve=True) == OmegaConf.to_container(
        compose_train(["trainer=cpu"], tmp_path).trainer, resolve=True)  # fmt: skip
    monkeypatch.setattr(config, "visible_gpus", lambda: 4)
    gpu = OmegaConf.to_container(compose_train(["model=llama2"], tmp_path).trainer, resolve=True)
    assert (gpu["accelerator"], gpu["devices"], gpu["precision"], gpu["gradient_clip_val"]) == ("gpu", 4, "bf16-mixed", 1.0)
    assert config.batch_geometry(compose_train(["model=llama2"], tmp_path)).world_size == 4


def _llama_7b(path: Path) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32).save_pretrained(path)  # config only, no weights  # fmt: skip
    return path


def test_a_7b_plan_is_checked_against_the_gpus_before_loading(tmp_path):
    """The design-card run (model=llama2, micro-batch 4 x 512, bf16 over fp32) on 80 GB GPUs: one GPU cannot hold
    weights + gradients + AdamW (108 GB): refused with the numbers and the fix; strategy=auto on 4 GPUs shards it
    with FSDP (27 GB of state per GPU + activations)."""
    from plwlab.training.memory import check_fits, choose_strategy, model_config, plan_memory, strategy_shards

    model = _llama_7b(tmp_path / "llama-7b")
    overrides = ["model=llama2", f"model.name_or_path={model}", "trainer=gpu", "data.batch_size=4",
                 "model.gradient_checkpointing=false"]  # fmt: skip
    one = compose_train([*overrides, "trainer.devices=1"], tmp_path)
    config, gpu = model_config(one.model), 80e9
    whole = plan_memory(one, batch_geometry(one), 1, config)
    assert 6.7e9 < whole.params < 6.8e9 and round(whole.weights / 1e9) == 27 and round(whole.optimizer / 1e9) == 54
    assert 15e9 < whole.activations < 16e9  # ≈ 0.48 GB per layer at 4 x 512 (docs/cluster.md)
    with pytest.raises(ConfigError, match=r"needs ≈ 1\d\d\.\d GB \(weights 27.0 \+ gradients 27.0 \+ AdamW 53.9 .*a GPU here has 80 GB; "
                       r"use strategy=fsdp over 2 GPUs"):  # fmt: skip
        check_fits(one, batch_geometry(one), config, gpu, sharded=False)
    four = compose_train([*overrides, "trainer.devices=4"], tmp_path)
    strategy = choose_strategy(four, batch_geometry(four), config, gpu)
    assert strategy_shards(strategy)
    sharded = check_fits(four, batch_geometry(four), config, gpu, sharded=True)
    assert sharded.weights == whole.weights / 4 and sharded.total < 50e9
    checkpointed = compose_train([*overrides[:-1], "trainer.devices=4", "model.gradient_checkpointing=true"], tmp_path)
    assert plan_memory(checkpointed, batch_geometry(checkpointed), 4, config).activations < 2e9  # ≈ 1.6 GB


def test_the_paper_preset_checkpoints_activations_only_where_memory_needs_it(tmp_path, monkeypatch):
    """model.gradient_checkpointing=auto (the LLaMA presets): the paper's node (4 x 80 GB, FSDP, 4 x 512) holds the
    7B run's ≈ 43 GB per GPU without checkpointing, so it is off there (no recomputation); 4 x 24 GB GPUs need it."""
    from plwlab.training import memory
    from plwlab.training.memory import choose_checkpointing, model_config

    model = _llama_7b(tmp_path / "llama-7b")
    cfg = compose_train(["model=llama2", f"model.name_or_path={model}", "trainer=gpu", "data.batch_size=4",
                         "trainer.devices=4"], tmp_path)  # fmt: skip
    assert cfg.model.gradient_checkpointing == "auto"
    geometry, config = batch_geometry(cfg), model_config(cfg.model)
    assert choose_checkpointing(cfg, geometry, config, 80e9, sharded=True) is False
    assert choose_checkpointing(cfg, geometry, config, 24e9, sharded=True) is True
    assert choose_checkpointing(cfg, geometry, config, None, sharded=True) is True  # unknown: the safe choice
    assert cfg.model.gradient_checkpointing == "auto"  # asking does not change the config
    cfg.model.gradient_checkpointing = "sometimes"
    with pytest.raises(ConfigError, match="model.gradient_checkpointing must be true, false or auto, got 'sometimes'"):
        choose_checkpointing(cfg, geometry, config, 80e9, sharded=True)
    # the pre-flight's plan says what it chose; the config stays as written (config.yaml keeps `auto`)
    cfg.model.gradient_checkpointing = "auto"
    monkeypatch.setattr(memory, "device_memory", lambda accelerator: 80e9)
    plan = memory.preflight(cfg, geometry)
    assert (plan.sharded, plan.gradient_checkpointing, cfg.model.gradient_checkpointing) == (True, False, "auto")
    assert plan.memory.shards == 4 and plan.memory.total < 80e9
    monkeypatch.setattr(memory, "device_memory", lambda accelerator: 32e9)
    assert memory.preflight(cfg, geometry).gradient_checkpointing is True and cfg.model.gradient_checkpointing == "auto"


def test_a_7b_model_on_cpu_is_refused_before_loading(tmp_path):
    cfg = compose_train(["model=llama2", f"model.name_or_path={_llama_7b(tmp_path / 'llama-7b')}"], tmp_path / "run")
    with pytest.raises(ConfigError, match="model llama2-7b has 6.7B parameters and trainer.accelerator=cpu"):
        train(cfg)


def test_default_batching_is_length_grouped_and_the_paper_preset_keeps_padded(tmp_path):
    """The demo default groups lengths (1.8x the tokens/s of padded batches here, docs/benchmarks.md); the paper's
    recipe trained on random padded batches, and with per-micro-batch normalization grouping would change how much
    each example weighs, so experiment=paper keeps them."""
    assert compose_train([], tmp_path).data.batching == "length_grouped"
    assert compose_train(["experiment=paper"], tmp_path).data.batching == "padded"


# family -> (HF model_type, special tokens as the family's tokenizer has them, the pad plwlab should use)
FAMILIES = {
    "llama3": ("llama", {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "unk_token": None,
                         "pad_token": None}, "<|end_of_text|>"),
    "mistral": ("mistral", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}, "<unk>"),
    "qwen2_5": ("qwen2", {"bos_token": None, "eos_token": "<|endoftext|>", "unk_token": None,
                          "pad_token": "<|endoftext|>"}, "<|endoftext|>"),
}  # fmt: skip
# Each family's chat template as its instruct model ships it (tools and multimodal branches left out), with the
# special tokens it needs, and the text that closes an assistant turn
CHAT_TEMPLATES = {
    "llama3": ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
               "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 "
               "== 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt "
               "%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
               ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "mistral": ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
                "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] "
                "== 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
                "roles are supported!') }}{% endif %}{% endfor %}", [], "</s>"),
    "qwen2_5": ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + "
                "'<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
                "helpful assistant.<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if not (message.role == "
                "'system' and loop.first) %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + "
                "'\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}",
                ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
}  # fmt: skip


@pytest.mark.parametrize("preset", sorted(FAMILIES))
def test_model_presets_load_and_train_a_tiny_model_of_their_family(preset, tmp_path):
    """Each preset (hub id by default) loads a local directory of its architecture: here a tiny random model built
    from its family's config, with a tiny tokenizer carrying the family's special tokens and chat template; it
    trains on Alpaca data and on chat data through that template (Mistral's refuses system prompts: by name), and
    pads as documented in its YAML."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from plwlab.data.chat import ChatDataError, end_of_turn_ids

    model_type, specials, pad = FAMILIES[preset]
    template, chat_tokens, end_of_turn = CHAT_TEMPLATES[preset]
    tok = AutoTokenizer.from_pretrained(ROOT / "src" / "plwlab" / "assets" / "tiny_tokenizer")
    tok.add_special_tokens({k: v for k, v in specials.items() if v is not None})
    tok.add_special_tokens({"additional_special_tokens": chat_tokens})
    for key, value in specials.items():
        if value is None:
            setattr(tok, key, None)
    tok.chat_template = template
    tok.save_pretrained(tmp_path / "model")
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=1024)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    model = [f"model={preset}", f"model.name_or_path={tmp_path / 'model'}", "model.attn_implementation=eager"]
    cfg = compose_train([*model, *QUICK, "trainer.max_steps=2"], tmp_path / "run")
    assert cfg.model.dtype == "float32" and cfg.model.gradient_checkpointing
    metrics = train(cfg)
    assert metrics["global_steps"] == 2 and metrics["final_train_loss"] > 0
    saved = AutoTokenizer.from_pretrained(tmp_path / "run" / "hf_model")
    assert saved.pad_token == pad and len(saved) == len(tok)  # no embedding row added
    assert AutoConfig.from_pretrained(tmp_path / "run" / "hf_model").model_type == model_type
    assert end_of_turn_ids(saved)[-1] == saved.convert_tokens_to_ids(end_of_turn)
    chat = [*model, "data=chat_sample", *QUICK, "trainer.max_steps=2"]
    if preset == "mistral":  # its template raises on a system turn: the record is named, then train without them
        with pytest.raises(ChatDataError, match="conversation 3: the chat template refuses it: Conversation roles must alternate"):
            train(compose_train(chat, tmp_path / "chat_with_system"))
        lines = (ROOT / "src" / "plwlab" / "assets" / "chat_sample.jsonl").read_text().splitlines()
        (tmp_path / "no_system.jsonl").write_text("\n".join(line for line in lines if '"system"' not in line))
        chat.append(f"data.path={tmp_path / 'no_system.jsonl'}")
    metrics = train(compose_train(chat, tmp_path / "chat"))
    assert metrics["data_format"] == "messages" and metrics["global_steps"] == 2 and metrics["final_train_loss"] > 0




def test_a_finished_run_ends_with_a_short_human_summary(tmp_path):
    """It ended with one very long JSON line; the JSON stays in metrics.json, the end says where the run is, its
    final losses and what to run next, each command as typed."""
    import shlex

    result = run_cli(*QUICK, f"paths.output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    summary = out[out.index("run finished: "):].splitlines()[:5]
    (run_dir,) = [p.parent for p in tmp_path.rglob("metrics.json")]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert summary[0].endswith(f"run finished: {run_dir}") and summary[4].startswith("  next: ")
    assert f"final loss {metrics['final_train_loss']:.4g}" in summary[2] and '"lr-AdamW"' not in out
    assert "litlogger" not in out  # Lightning's advertisement, dropped where it is logged
    evaluate = summary[4].split("next: ", 1)[1].split("    or talk to it: ")[0]
    assert shlex.split(evaluate) == ["python", "evaluate.py", str(run_dir)]


def test_a_pretrained_model_is_trained_in_train_mode(tmp_path):
    """``from_pretrained`` returns a model in eval mode and Lightning keeps the mode it finds: every SmolLM2 run
    began with "Found 397 module(s) in eval mode" and trained with dropout off. Loaded for training, a pretrained
    model is now in train mode, as the HF Trainer put it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from plwlab.training.model import load_model

    tok = AutoTokenizer.from_pretrained(ROOT / "src" / "plwlab" / "assets" / "tiny_tokenizer")
    tok.save_pretrained(tmp_path / "model")
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    loaded = load_model(name="x", name_or_path=str(tmp_path / "model"), tokenizer=str(tmp_path / "model"))
    assert [name for name, m in loaded.model.named_modules() if not m.training] == []
