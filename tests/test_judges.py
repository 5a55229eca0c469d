"""Pairwise judges: prompts, verdict parsing, order randomization, logprob verdicts and the win rate."""

import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import SHARED_DATA

from plwlab import ASSETS
from plwlab.cli import main as cli
from plwlab.evaluation.generation import continuation_logprobs
from plwlab.evaluation.judge_prompts import (
    GUANACO_HUMAN, GUANACO_SYSTEM, LOGPROB_VERDICTS, RANKING_SYSTEM, RANKING_USER, alpaca_eval_messages, is_switched,
    pandalm_prompt, parse_guanaco, parse_pandalm, parse_ranking,
)  # fmt: skip
from plwlab.evaluation.judges import PairwiseJudge, alpaca_eval_package, human_agreement, read_pandalm_testset
from plwlab.evaluation.verdicts import Verdict, first_position_rate, win_rate, win_tie_lose

ANNOTATED = ASSETS / "eval_sample" / "pandalm_annotated.json"


VERDICT_TEXTS = ["Output (a)", " Output (b)", "Output (a)\nOutput (b)", "\nOutput (b) is better", "I cannot decide",
                 "Output (a) is better than Output (b)", "", "output (a)", "[{'model': 'model_1', 'rank': 1}, "
                 "{'model': 'model_2', 'rank': 2}]", "[{'model': 'model_1', 'rank': 3}, {'model': 'model_2', 'rank': 1}]",
                 "Sure!\n[{'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2}]",
                 "[{'model': <model-name>, 'rank': <model-rank>}]", "[{'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2}]"]  # fmt: skip


def test_verdict_parsers_equal_alpaca_eval_packages():
    """parse_guanaco / parse_ranking give what alpaca_eval's own parsers give at batch size 1 (one annotation,
    else NaN, as ``_parse_completions`` sets it)."""
    parsers = pytest.importorskip("alpaca_eval.completion_parsers")

    def package(parser, text, **kwargs):
        try:
            found = list(parser(text, **kwargs))
        except Exception:
            return None
        return float(found[0]) if len(found) == 1 and found[0] == found[0] else None

    patterns = {1: r"(?:^|\n) ?Output \(a\)", 2: r"(?:^|\n) ?Output \(b\)"}  # guanaco_33b/configs.yaml
    for text in VERDICT_TEXTS:
        assert parse_guanaco(text) == package(parsers.regex_parser, text, outputs_to_match=dict(patterns)), text
        assert parse_ranking(text) == package(parsers.ranking_parser, text), text
    assert parse_guanaco("Output (a)") == 1.0 and parse_guanaco("Output (a)\nOutput (b)") is None


def test_judge_templates_are_the_packages_files():
    alpaca_eval = pytest.importorskip("alpaca_eval")
    configs = Path(alpaca_eval.__file__).parent / "evaluators_configs"
    guanaco = (configs / "guanaco_33b" / "basic_prompt.txt").read_text()
    assert guanaco == f"{GUANACO_SYSTEM}\n### Human: {GUANACO_HUMAN}\n### Assistant:"
    ranking = (configs / "alpaca_eval_gpt4" / "alpaca_eval.txt").read_text()
    assert ranking == f"<|im_start|>system\n{RANKING_SYSTEM}\n<|im_end|>\n<|im_start|>user\n{RANKING_USER}\n<|im_end|>"


def test_parse_pandalm_verdict():
    """PandaLM's rule: first line "1" or "2"; anything else, "Tie" included, is a tie."""
    assert parse_pandalm("1\n\n### Reason: Response 1 is correct.") == 1.0
    assert parse_pandalm(" 2\n\n### Reason: ...") == 2.0
    assert parse_pandalm("Tie\n\n### Reason: both fine") == 1.5
    assert parse_pandalm("3") == parse_pandalm("Response 1") == parse_pandalm("") == 1.5
    assert win_tie_lose([2.0, 2.0, 1.5, 1.0, None]) == (2, 1, 1)


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


def test_alpaca_eval_prompts_use_the_chat_template(tiny):
    ranking = PairwiseJudge(tiny.model, tiny.tokenizer, "alpaca_eval_ranking")
    text, add_bos = ranking.prompt("Say hi.", "", "Hi.", "Hello.")  # no chat template: ChatML as AlpacaEval writes it
    assert add_bos and text.startswith("<|im_start|>system\nYou are a helpful assistant") and text.endswith("<|im_start|>assistant\n")
    guanaco = PairwiseJudge(tiny.model, tiny.tokenizer, "alpaca_eval_guanaco")
    text, add_bos = guanaco.prompt("Say hi.", "", "Hi.", "Hello.")  # no chat template: the package's own text
    assert add_bos and text.startswith(GUANACO_SYSTEM + "\n### Human: Select the output (a) or (b)")
    assert text.endswith("## Output (a):\nHi.\n\n## Output (b):\nHello.\n\n## Which is best, Output (a) or Output (b)?\n### Assistant:")
    tiny.tokenizer.chat_template = (  # a template without a system role, like Mixtral's
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "[INST] {{ m['content'] }} [/INST]{% endfor %}")
    text, add_bos = ranking.prompt("Say hi.", "", "Hi.", "Hello.")
    assert not add_bos and text.startswith("[INST] You are a helpful assistant, that ranks models") and text.count("[INST]") == 1
    text, add_bos = guanaco.prompt("Say hi.", "", "Hi.", "Hello.")  # the paper's Mixtral format
    assert not add_bos and text == f"[INST] {GUANACO_SYSTEM}\n" + GUANACO_HUMAN.replace("{instruction}", "Say hi.").replace(
        "{output_1}", "Hi.").replace("{output_2}", "Hello.") + " [/INST]"  # fmt: skip


class FirstShownWins(PairwiseJudge):
    """Prefers whichever response it is shown first: tests that shuffled pairs are mapped back."""

    def _judge(self, prompts, journal=None):
        self.seen = prompts
        return [Verdict(1.0, "1") for _ in prompts]


def test_order_randomization_is_seeded_per_instruction_and_mapped_back(tiny):
    judge = FirstShownWins(tiny.model, tiny.tokenizer, "pandalm", seed=3)
    n = 40
    questions = [f"q{i}" for i in range(n)]
    verdicts = judge.compare(questions, [""] * n, [f"ref {i}" for i in range(n)], [f"model {i}" for i in range(n)])
    shown_first = ["### Response 1:\nmodel" in text for text, _ in judge.seen]
    assert shown_first == [is_switched(q, 3) for q in questions]  # alpaca_eval's coin, seeded on the instruction
    assert [v.preference for v in verdicts] == [2.0 if s else 1.0 for s in shown_first]
    assert 10 < sum(shown_first) < 30  # about half swapped
    again = FirstShownWins(tiny.model, tiny.tokenizer, "pandalm", seed=3)
    assert [v.preference for v in again.compare(questions[::-1], [""] * n, ["r"] * n, ["m"] * n)] == [
        v.preference for v in verdicts][::-1]  # the same instruction gets the same order wherever it stands
    assert first_position_rate(verdicts) == (100.0, n)  # the judge follows the position: its win rate is the coin's
    assert first_position_rate([Verdict(2.0, "2", 1.0), Verdict(1.0, "1", 2.0), Verdict(1.5, "tie", 1.5),
                                Verdict(None, "?")]) == (50.0, 2)  # fmt: skip
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
    for style in ("alpaca_eval_guanaco", "alpaca_eval_ranking", "pandalm"):
        logprob = PairwiseJudge(tiny.model, tiny.tokenizer, style, "logprob", seed=0, progress=False)
        verdicts = logprob.compare(instructions, inputs, first, second, randomize_order=False)
        for verdict, (text, add_bos) in zip(verdicts, [logprob.prompt(*x) for x in zip(instructions, inputs, first, second)]):
            scores = continuation_logprobs(tiny.model, tiny.tokenizer, text, list(LOGPROB_VERDICTS[style]), add_bos)
            assert verdict.raw == list(LOGPROB_VERDICTS[style])[scores.index(max(scores))]
            assert verdict.preference == LOGPROB_VERDICTS[style][verdict.raw]
        generated = PairwiseJudge(tiny.model, tiny.tokenizer, style, "generate", max_new_tokens=6, progress=False,
                                  decoding={"num_beams": 2, "repetition_penalty": 1.2})  # fmt: skip
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


def _scripted_verdict(kind: str, prompt: str) -> str:
    """A scripted judge's reply, a function of what it is shown (the task part of the guanaco prompt, the same
    text in plwlab's and the package's prompts)."""
    if kind in ("a", "b"):
        return f"Output ({kind})"
    import hashlib

    task = prompt[prompt.index("# Task:"):]
    replies = ["Output (a)", "Output (b)", " Output (b)\n", "Output (a)\nOutput (b)", "I cannot decide", "\nOutput (a) wins"]
    return replies[hashlib.sha256(task.encode()).digest()[0] % len(replies)]


class ScriptedJudge(PairwiseJudge):
    def __init__(self, kind):
        super().__init__(None, None, "alpaca_eval_guanaco")
        self.kind = kind

    def complete(self, prompts, journal=None):
        return [_scripted_verdict(self.kind, text) for text, _ in prompts]


@pytest.mark.parametrize("kind", ["a", "b", "random"])
def test_win_rate_equals_the_alpaca_eval_package_with_scripted_judges(tmp_path, monkeypatch, kind):
    """On AlpacaEval's 805 instructions (alpaca-7b vs text-davinci-003; the bundled sample without ../shared/data),
    with every 40th model output set equal to the reference: a judge that always says "Output (a)", one that
    always says "Output (b)", and one that answers at random (unparseable and double answers included) give the
    same win rate, standard error and count through plwlab as through the alpaca_eval package itself, run
    offline on its guanaco_33b prompt and parser with the judge as its completion function."""
    alpaca_eval = pytest.importorskip("alpaca_eval")
    import json

    import alpaca_eval.decoders.test as package_test_decoder

    folder = SHARED_DATA / "alpaca_eval"
    if (folder / "alpaca-7b_model_outputs.json").exists():
        reference = json.loads((folder / "text_davinci_003_model_outputs.json").read_text())
        model = json.loads((folder / "alpaca-7b_model_outputs.json").read_text())
        assert len(reference) == len(model) == 805
    else:
        reference = json.loads((ASSETS / "eval_sample" / "alpaca_eval_reference.json").read_text())
        model = [{**r, "output": f"My answer to: {r['instruction']}"} for r in reference]
    model = [{"instruction": r["instruction"], "output": r["output"] if i % 40 == 0 else m["output"], "generator": "run"}
             for i, (r, m) in enumerate(zip(reference, model))]  # fmt: skip
    reference = [{"instruction": r["instruction"], "output": r["output"], "generator": "reference"} for r in reference]

    verdicts = ScriptedJudge(kind).compare([m["instruction"] for m in model], [""] * len(model),
                                           [r["output"] for r in reference], [m["output"] for m in model])  # fmt: skip
    ours = win_rate([v.preference for v in verdicts])

    def scripted_completions(prompts, model_name="test", **kwargs):
        replies = [_scripted_verdict(kind, p) for p in prompts]
        return {"completions": replies, "price_per_example": [0] * len(replies), "time_per_example": [0] * len(replies),
                "completions_all": replies}  # fmt: skip

    monkeypatch.setattr(package_test_decoder, "test_completions", scripted_completions)
    template = Path(alpaca_eval.__file__).parent / "evaluators_configs" / "guanaco_33b" / "basic_prompt.txt"
    config = tmp_path / "scripted" / "configs.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({"scripted": {
        "prompt_template": str(template), "fn_completions": "test_completions", "completions_kwargs": {"model_name": "x"},
        "completion_parser_kwargs": {"outputs_to_match": {1: r"(?:^|\n) ?Output \(a\)", 2: r"(?:^|\n) ?Output \(b\)"}},
        "batch_size": 1}}))  # fmt: skip
    package = alpaca_eval_package(model, reference, str(config), str(tmp_path / "out"))
    assert ours[2] == package[2] and ours[0] == pytest.approx(package[0], abs=1e-9)
    assert ours[1] == pytest.approx(package[1], abs=1e-9)
    if kind == "random":
        assert ours[2] < len(model)  # some verdicts were unparseable and were dropped, as the package drops them
