"""Pairwise judges: prompts, verdict parsing, order randomization, logprob verdicts and the win rate."""

import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from plwlab.generation import continuation_logprobs
from plwlab.cli import main as cli
from plwlab.config import ASSETS
from plwlab.judges import (
    LOGPROB_VERDICTS, PairwiseJudge, Verdict, alpaca_eval_messages, alpaca_eval_package, human_agreement,
    pandalm_prompt, parse_alpaca_eval, parse_pandalm, read_pandalm_testset, win_rate,
)  # fmt: skip

from conftest import SHARED_DATA

ANNOTATED = ASSETS / "eval_sample" / "pandalm_annotated.json"


def test_parse_alpaca_eval_ranking():
    assert parse_alpaca_eval("[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]") == 1.0
    assert parse_alpaca_eval("Sure!\n[\n    {'model': 'model_2', 'rank': 1},\n    {'model': 'model_1', 'rank': 2}\n]") == 2.0
    assert parse_alpaca_eval("[{'model': 'model_1', 'rank': 3}, {'model': 'model_2', 'rank': 1}]") is None
    assert parse_alpaca_eval("[{'model': <model-name>, 'rank': <model-rank>}]") is None  # the template echoed
    assert parse_alpaca_eval("model_2 is better") is None and parse_alpaca_eval("") is None


def test_parse_pandalm_verdict():
    assert parse_pandalm("1\n\n### Reason: Response 1 is correct.") == 1.0
    assert parse_pandalm(" 2\n\n### Reason: ...") == 2.0
    assert parse_pandalm("Tie\n\n### Reason: both fine") == 1.5
    assert parse_pandalm("3") is None and parse_pandalm("Response 1") is None and parse_pandalm("") is None


def test_prompts():
    assert pandalm_prompt("Add.", "2 and 3", " 5 </s>", "6") == (
        "Below are two responses for a given task. The task is defined by the Instruction with an Input that provides "
        "further context. Evaluate the responses and generate a reference answer for the task.\n\n### Instruction:\nAdd."
        "\n\n### Input:\n2 and 3\n\n### Response 1:\n5\n\n### Response 2:\n6\n\n### Evaluation:\n")
    assert pandalm_prompt("Hi.", "", "a", "b").startswith(
        "Below are two responses for a given task. The task is defined by the Instruction. Evaluate")
    system, user = alpaca_eval_messages("Name {a} colour.", "", "Red.", "Blue.")
    assert system["role"] == "system" and "ranks models" in system["content"]
    assert '"instruction": """Name {a} colour.""",' in user["content"]
    assert '"model": "model_1",\n        "answer": """Red."""' in user["content"]
    assert '"answer": """Blue."""' in user["content"] and user["content"].endswith("majority of humans would give.")


def test_alpaca_eval_prompt_uses_the_chat_template(tiny):
    judge = PairwiseJudge(tiny.model, tiny.tokenizer, "alpaca_eval")
    text, add_bos = judge.prompt("Say hi.", "", "Hi.", "Hello.")  # no chat template: ChatML as AlpacaEval writes it
    assert add_bos and text.startswith("<|im_start|>system\nYou are a helpful assistant") and text.endswith("<|im_start|>assistant\n")
    tiny.tokenizer.chat_template = (  # a template without a system role, like Mixtral's
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "[INST] {{ m['content'] }} [/INST]{% endfor %}")
    text, add_bos = judge.prompt("Say hi.", "", "Hi.", "Hello.")
    assert not add_bos and text.startswith("[INST] You are a helpful assistant, that ranks models") and text.count("[INST]") == 1


class FirstShownWins(PairwiseJudge):
    """Prefers whichever response it is shown first: tests that shuffled pairs are mapped back."""

    def _judge(self, prompts):
        self.seen = prompts
        return [Verdict(1.0, "1") for _ in prompts]


def test_order_randomization_is_seeded_and_mapped_back(tiny):
    judge = FirstShownWins(tiny.model, tiny.tokenizer, "pandalm", seed=3)
    n = 40
    verdicts = judge.compare(["q"] * n, [""] * n, [f"ref {i}" for i in range(n)], [f"model {i}" for i in range(n)])
    shown_first = ["### Response 1:\nmodel" in text for text, _ in judge.seen]
    assert [v.preference for v in verdicts] == [2.0 if s else 1.0 for s in shown_first]
    assert 10 < sum(shown_first) < 30  # about half swapped
    again = FirstShownWins(tiny.model, tiny.tokenizer, "pandalm", seed=3)
    assert [v.preference for v in again.compare(["q"] * n, [""] * n, ["r"] * n, ["m"] * n)] == [v.preference for v in verdicts]
    fixed = judge.compare(["q"] * 4, [""] * 4, ["r"] * 4, ["m"] * 4, randomize_order=False)
    assert [v.preference for v in fixed] == [1.0] * 4
    with pytest.raises(ValueError, match="same length"):
        judge.compare(["q"], [""], ["r", "r"], ["m"])


def test_continuation_logprobs_match_a_plain_forward(tiny):
    prompt, tails = "### Evaluation:\n", ["1", "2", "Tie"]
    scores = continuation_logprobs(tiny.model, tiny.tokenizer, prompt, tails)
    for tail, score in zip(tails, scores):
        context = [tiny.tokenizer.bos_token_id, *tiny.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        ids = tiny.tokenizer(tail, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = tiny.model(torch.tensor([context + ids])).logits[0].log_softmax(-1)
        expected = sum(float(logp[len(context) - 1 + k, t]) for k, t in enumerate(ids))
        assert score == pytest.approx(expected, abs=1e-4)


def test_tiny_judge_in_both_modes(tiny):
    instructions, inputs = ["Add the numbers.", "Name a fruit."], ["2 and 3", ""]
    first, second = ["5", "Apple."], ["6", "A car."]
    for style in ("alpaca_eval", "pandalm"):
        logprob = PairwiseJudge(tiny.model, tiny.tokenizer, style, "logprob", seed=0, progress=False)
        verdicts = logprob.compare(instructions, inputs, first, second, randomize_order=False)
        for verdict, (text, add_bos) in zip(verdicts, [logprob.prompt(*x) for x in zip(instructions, inputs, first, second)]):
            scores = continuation_logprobs(tiny.model, tiny.tokenizer, text, list(LOGPROB_VERDICTS[style]), add_bos)
            assert verdict.raw == list(LOGPROB_VERDICTS[style])[scores.index(max(scores))]
            assert verdict.preference == LOGPROB_VERDICTS[style][verdict.raw]
        generated = PairwiseJudge(tiny.model, tiny.tokenizer, style, "generate", max_new_tokens=6, progress=False)
        for v in generated.compare(instructions, inputs, first, second):
            assert isinstance(v.raw, str) and (v.preference is None or v.preference in (1.0, 1.5, 2.0))
    with pytest.raises(ValueError, match="judge style"):
        PairwiseJudge(tiny.model, tiny.tokenizer, "mt_bench")
    with pytest.raises(ValueError, match="judge mode"):
        PairwiseJudge(tiny.model, tiny.tokenizer, "pandalm", "vote")


def test_win_rate_follows_alpaca_eval():
    prefs = [1.0, 2.0, 1.5, None, 2.0]
    score, stderr, n = win_rate(prefs)
    valid = pd.Series([p - 1 for p in prefs if p is not None])
    assert n == 4 and score == pytest.approx(valid.mean() * 100) and stderr == pytest.approx(valid.sem() * 100)
    assert math.isnan(win_rate([None, None])[0]) and win_rate([None])[2] == 0
    assert win_rate([2.0]) == (100.0, None, 1)


def test_alpaca_eval_package_backend(tmp_path):
    """The real alpaca_eval package, offline: an annotator config with its test completion function (always
    "model_2 is better") and AlpacaEval 1's ranking prompt and parser."""
    alpaca_eval = pytest.importorskip("alpaca_eval")
    template = Path(alpaca_eval.__file__).parent / "evaluators_configs" / "alpaca_eval_gpt4" / "alpaca_eval.txt"
    config = tmp_path / "offline_judge" / "configs.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({"offline_judge": {
        "prompt_template": str(template), "fn_completions": "test_completions", "fn_completion_parser": "ranking_parser",
        "completions_kwargs": {"model_name": "test", "value": "[{'model': 'model_1', 'rank': 2}, {'model': 'model_2', 'rank': 1}]"},
        "batch_size": 1}}))  # fmt: skip
    outputs = [{"instruction": f"Question {i}?", "output": f"answer {i}", "generator": "run-7"} for i in range(6)]
    reference = [{**o, "output": f"reference {i}", "generator": "reference"} for i, o in enumerate(outputs)]
    score, stderr, n = alpaca_eval_package(outputs, reference, str(config), str(tmp_path / "out"))
    assert n == 6 and 0 <= score <= 100 and stderr > 0
    board = pd.read_csv(tmp_path / "out" / "leaderboard.csv", index_col=0)
    assert board.loc["run-7", "win_rate"] == pytest.approx(score)
    # again, with the annotation cache now warm (crashed with pandas 3: pyproject bounds pandas for this extra)
    assert alpaca_eval_package(outputs, reference, str(config), str(tmp_path / "out")) == (score, stderr, n)


def test_alpaca_eval_package_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "alpaca_eval", None)
    with pytest.raises(ImportError, match="pip install alpaca-eval"):
        alpaca_eval_package([{"instruction": "q", "output": "a", "generator": "g"}], [])


def test_agreement_with_human_annotations(tiny, tmp_path, capsys):
    items = read_pandalm_testset(ANNOTATED)
    assert [d["label"] for d in items] == [1.0, 2.0, 1.5, 2.0, 1.0]  # majority of 3; the all-different pair is left out
    assert items[-1]["response1"] == "True"  # a JSON boolean in the file
    scores = human_agreement(FirstShownWins(tiny.model, tiny.tokenizer, "pandalm"), items, randomize_order=False)
    # always "1": right 2 times in 5; precision 2/5 on class 1 and 0 elsewhere, recall 1 on class 1
    assert scores == pytest.approx({"n": 5, "accuracy": 0.4, "precision": 0.4 / 3, "recall": 1 / 3,
                                    "f1": (2 * 0.4 / 1.4) / 3, "unparsed": 0})  # fmt: skip
    tiny.model.save_pretrained(tmp_path / "judge")
    tiny.tokenizer.save_pretrained(tmp_path / "judge")
    cli(["judge-check", str(ANNOTATED), "--model", str(tmp_path / "judge"), "--mode", "logprob", "--dtype", "float32",
         "--device", "auto"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "vs. the human majority" in printed


@pytest.mark.skipif(not (SHARED_DATA / "pandalm").exists(), reason="../shared/data not present")
def test_real_pandalm_testset_labels():
    items = read_pandalm_testset(SHARED_DATA / "pandalm" / "testset-v1.json")
    labels = [d["label"] for d in items]
    assert len(items) == 999 and (labels.count(1.0), labels.count(2.0), labels.count(1.5)) == (422, 472, 105)
