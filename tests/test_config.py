"""The one validation layer (plwlab.config): light enough to check every config before any work, typed, and the
same checks for train.py, its sweeps and evaluate.py."""

import re
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from test_evaluate import compose_eval

from plwlab.config import JUDGE_STYLES, ConfigError, validate_evaluate
from plwlab.evaluation.evaluate import evaluate
from plwlab.evaluation.judge_prompts import PARSERS


def test_the_config_layer_checks_train_and_evaluate_configs_without_torch_or_peft():
    code = """
import sys
from hydra import compose, initialize_config_dir
from plwlab import CONF_DIR
from plwlab.config import register, validate_evaluate, validate_train
register()
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    train = compose("train", overrides=["trainer=cpu", "plw=0.01", "paths.run_dir=/tmp/x"])
    ev = compose("evaluate", overrides=["run_dir=/tmp/x", "eval=paper"])
print(validate_train(train).global_batch)
validate_evaluate(ev)
print(sorted(m for m in ("torch", "peft", "lightning", "transformers") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["8", "[]"]  # the tiny default: batch 8, one process


def test_the_judge_styles_are_the_parsers():
    assert set(JUDGE_STYLES) == set(PARSERS)


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.judges.alpaca_eval.style=guanaco", "eval.judges.alpaca_eval.style must be one of ('alpaca_eval_guanaco'"),
        ("eval.judges.pandalm.mode=vote", "eval.judges.pandalm.mode must be one of ('generate', 'logprob'), got 'vote'"),
        ("eval.judges.pandalm.generations=alpaca", "eval.judges.pandalm compares eval.generations.alpaca, which this "
                                                   "preset lacks (it has ['alpaca_eval', 'pandalm'])"),
        ("eval.judges.alpaca_eval.backend=vllm",
         "eval.judges.alpaca_eval.backend must be one of ('local', 'openai', 'alpaca_eval')"),
        ("eval.judges.alpaca_eval.backend=openai", "eval.judges.alpaca_eval.base_url must be the server's http(s) URL"),
        ("engine=openai", "engine.base_url must be the server's http(s) URL, e.g. http://127.0.0.1:8000/v1, got None"),
        ("engine.name=tgi", "engine.name must be one of ('hf', 'openai', 'vllm'), got 'tgi'"),
        ("engine=vllm", "eval.judges.alpaca_eval: model=self mode=logprob scores with the run's model in this process"),
        ("shard=4", "shard must be in [0, num_shards=1), got 4"),
        ("batch_size=abc", "batch_size must be auto or an integer >= 1, got 'abc'"),
        ("batch_size=0", "batch_size must be auto or an integer >= 1, got 0"),
        ("dtype=bf16", "dtype must be one of ('float32', 'bfloat16', 'float16'), got 'bf16'"),
        ("eval.generations.pandalm.max_new_tokens=0", "eval.generations.pandalm.max_new_tokens must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_the_evaluation_config_is_checked_before_any_run_is_read(tmp_path, override, message):
    """A bad evaluation value is one line before any run is looked for (the run_dir here does not exist): it used
    to surface mid-run, after the model was loaded and the earlier benchmarks had run, or not at all."""
    cfg = compose_eval([f"run_dir={tmp_path / 'no-such-run'}", override])
    with pytest.raises(ConfigError, match=re.escape(message)):
        evaluate(cfg)


def test_the_evaluation_config_is_typed():
    """Values arrive typed, and a wrong type is refused at composition (it used to arrive as a string)."""
    with pytest.raises(ConfigCompositionException, match="num_shards=abc"):
        compose_eval(["run_dir=x", "num_shards=abc"])
    cases = {"eval.generations.pandalm.max_new_tokens=many": "eval.generations.pandalm.max_new_tokens: Value 'many' of "
                                                             "type 'str' could not be converted to Integer",
             "+eval.judges.pandalm.stlye=x": "eval.judges.pandalm.stlye: Key 'stlye' not in 'JudgeConfig' (did you mean "
                                             "'style'?)",
             "+eval.lm_eval.tasks.piqa.fewshot=3": "(did you mean 'num_fewshot'?)"}  # fmt: skip
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate_evaluate(compose_eval(["run_dir=x", override]))
    validate_evaluate(compose_eval(["run_dir=x", "eval=paper", "~eval.judges", "~eval.memorization"]))  # still drops
