"""Pairwise LLM judges: AlpacaEval-1 win rate against reference outputs and PandaLM, as the paper ran them.

A judge is any local HF causal LM (hub id or path; the paper used Mixtral 8x7B for AlpacaEval and PandaLM-7B for
PandaLM). Styles (the prompt and its parser):

- ``alpaca_eval_guanaco`` (the paper's AlpacaEval judge): alpaca_eval's ``guanaco_33b`` annotator, "Output (a)" or
  "Output (b)" with its worked example, parsed with the package's regex parser; the paper put it in Mixtral's
  instruction format ("modified minimally"), which plwlab does with the judge's own chat template.
- ``alpaca_eval_ranking``: the ``alpaca_eval_gpt4`` ranking prompt (a Python list of ranks), the package's parser.
- ``pandalm``: PandaLM's prompt and verdict rule (first line "1", "2" or "Tie"; anything else is a tie).

Modes: ``generate`` parses the judge's text as the original tools do; ``logprob`` takes the most likely of the
fixed verdict strings (always answers; for small or base judges).

The AlpacaEval rules are the package's (alpaca_eval 0.6.6): each pair's order is swapped or not by a coin seeded
on its instruction (``random.Random("is_switched_outputs" + instruction + "0")``), identical outputs score 1.5
without asking the judge, and a verdict that does not parse to exactly one preference is dropped from the win
rate (counted). Preferences: 1 = first output better, 2 = second better, 1.5 = tie; win rate of the second output
= mean(preference - 1) × 100. ``alpaca_eval_package`` calls the package itself instead (API judges);
``human_agreement`` measures a judge against PandaLM's human-annotated pairs (``plwlab judge-check``).
"""

from __future__ import annotations

import ast
import json
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from plwlab.evaluation.generation import continuation_logprobs, generate

# alpaca_eval's guanaco_33b annotator (tatsu-lab/alpaca_eval, evaluators_configs/guanaco_33b/basic_prompt.txt,
# Apache-2.0): the system line, then the human turn; the package sends f"{system}\n### Human: {human}\n### Assistant:".
GUANACO_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the user's questions.")  # fmt: skip
GUANACO_HUMAN = """Select the output (a) or (b) that best matches the given instruction. Choose your preferred output, which can be subjective. Your answer should ONLY contain: Output (a) or Output (b). Here's an example:

# Example:
## Instruction:
Give a description of the following job: "ophthalmologist"

## Output (a):
An ophthalmologist is a medical doctor who specializes in the diagnosis and treatment of eye diseases and conditions.

## Output (b):
An ophthalmologist is a medical doctor who pokes and prods at your eyes while asking you to read letters from a chart.

## Which is best, Output (a) or Output (b)?
Output (a)

Here the answer is Output (a) because it provides a comprehensive and accurate description of the job of an ophthalmologist. In contrast, output (b) is more of a joke. Now is the real task, remember to only include Output (a) or Output (b) in your answer, not the explanation.

# Task:
Now is the real task, do not explain your answer, just say Output (a) or Output (b).

## Instruction:
{instruction}

## Output (a):
{output_1}

## Output (b):
{output_2}

## Which is best, Output (a) or Output (b)?"""
GUANACO_PATTERNS = {1.0: re.compile(r"(?:^|\n) ?Output \(a\)"), 2.0: re.compile(r"(?:^|\n) ?Output \(b\)")}

# The AlpacaEval 1 ranking annotator (evaluators_configs/alpaca_eval_gpt4/alpaca_eval.txt, Apache-2.0).
RANKING_SYSTEM = "You are a helpful assistant, that ranks models by the quality of their answers."
RANKING_USER = '''I want you to create a leaderboard of different of large-language models. To do so, I will give you the instructions (prompts) given to the models, and the responses of two models. Please rank the models based on which responses would be preferred by humans. All inputs and outputs should be python dictionaries.

Here is the prompt:
{
    "instruction": """{instruction}""",
}

Here are the outputs of the models:
[
    {
        "model": "model_1",
        "answer": """{output_1}"""
    },
    {
        "model": "model_2",
        "answer": """{output_2}"""
    }
]

Now please rank the models by the quality of their answers, so that the model with rank 1 has the best output. Then return a list of the model names and ranks, i.e., produce the following output:
[
    {'model': <model-name>, 'rank': <model-rank>},
    {'model': <model-name>, 'rank': <model-rank>}
]

Your response must be a valid Python dictionary and should contain nothing else because we will directly execute it in Python. Please provide the ranking that the majority of humans would give.'''

# PandaLM's prompt and special-token filter (WeOpenML/PandaLM, pandalm/utils/pandalm_inference.py, Apache-2.0).
PANDALM_HEAD = "Below are two responses for a given task. The task is defined by the Instruction{context}. " \
               "Evaluate the responses and generate a reference answer for the task.\n\n"  # fmt: skip
PANDALM_SPECIAL = re.compile(r"<unk>|<pad>|<s>|</s>|\[PAD\]|<\|endoftext\|>|\[UNK\]|\[CLS\]|\[MASK\]|"
                             r"<\|startofpiece\|>|<\|endofpiece\|>|\[gMASK\]|\[sMASK\]")  # fmt: skip
# PandaLM's default decoding (its ``inference``): beam search, 4 beams, repetition penalty 1.2, 512 new tokens.
PANDALM_DECODING = {"num_beams": 4, "repetition_penalty": 1.2, "early_stopping": True}


def fill_template(template: str, instruction: str, output_1: str, output_2: str) -> str:
    """The template with each placeholder's first occurrence replaced, in this order, as alpaca_eval fills it."""
    for key, value in (("instruction", instruction), ("output_1", output_1), ("output_2", output_2)):
        template = template.replace("{" + key + "}", value, 1)
    return template


def _instruction(instruction: str, input: str) -> str:  # noqa: A002
    return f"{instruction}\n\n{input}" if input else instruction


def guanaco_prompt(instruction: str, input: str, output_1: str, output_2: str) -> str:  # noqa: A002
    """The human turn of alpaca_eval's guanaco_33b annotator for one pair (an ``input`` is appended to the
    instruction)."""
    return fill_template(GUANACO_HUMAN, _instruction(instruction, input), output_1, output_2)


def alpaca_eval_messages(instruction: str, input: str, output_1: str, output_2: str) -> list[dict[str, str]]:  # noqa: A002
    """The alpaca_eval_gpt4 ranking annotator's messages for one pair."""
    user = fill_template(RANKING_USER, _instruction(instruction, input), output_1, output_2)
    return [{"role": "system", "content": RANKING_SYSTEM}, {"role": "user", "content": user}]


def pandalm_prompt(instruction: str, input: str, response_1: str, response_2: str) -> str:  # noqa: A002
    """PandaLM's evaluation prompt for one pair (special tokens stripped from the responses, as PandaLM does)."""
    r1, r2 = (PANDALM_SPECIAL.sub("", r.strip()).strip() for r in (response_1, response_2))
    head = PANDALM_HEAD.format(context=" with an Input that provides further context" if input else "")
    body = f"### Instruction:\n{instruction}\n\n" + (f"### Input:\n{input}\n\n" if input else "")
    return f"{head}{body}### Response 1:\n{r1}\n\n### Response 2:\n{r2}\n\n### Evaluation:\n"


def parse_guanaco(text: str) -> float | None:
    """alpaca_eval's ``regex_parser`` with the guanaco_33b patterns: the matches of "Output (a)" / "Output (b)" at
    a line start, scanned left to right; a preference only when there is exactly one (the package's batch size 1)."""
    found = []
    while text:
        matches = [(m.start(), m.end(), key) for key, p in GUANACO_PATTERNS.items() if (m := p.search(text))]
        if not matches:
            break
        start, end, key = min(matches)
        found.append(key)
        text = text[end:]
    return found[0] if len(found) == 1 else None


def parse_ranking(text: str) -> float | None:
    """alpaca_eval's ``ranking_parser``: the whole completion is a Python list of dicts; the rank of ``model_1``."""
    try:
        rank = next(d["rank"] for d in ast.literal_eval(text) if d["model"] == "model_1")
    except Exception:  # the package catches everything here too and records NaN
        return None
    return float(rank) if rank in (1, 2) else None


def parse_pandalm(text: str) -> float:
    """PandaLM's rule (``parse_pandalm_response``): first line "1" or "2", anything else ("Tie" included) a tie."""
    first = text.strip().split("\n")[0]
    return {"1": 1.0, "2": 2.0}.get(first, 1.5)


# Verdict strings scored in ``logprob`` mode, with the preference each one means.
LOGPROB_VERDICTS = {
    "alpaca_eval_guanaco": {"Output (a)": 1.0, "Output (b)": 2.0},
    "alpaca_eval_ranking": {"[\n    {'model': 'model_1', 'rank': 1}": 1.0, "[\n    {'model': 'model_2', 'rank': 1}": 2.0},
    "pandalm": {"1": 1.0, "2": 2.0, "Tie": 1.5},
}
PARSERS = {"alpaca_eval_guanaco": parse_guanaco, "alpaca_eval_ranking": parse_ranking, "pandalm": parse_pandalm}
STYLES = tuple(PARSERS)


def is_switched(instruction: str, seed: int = 0) -> bool:
    """alpaca_eval's order coin for a pair (``RandomSwitchTwoColumnsProcessor`` seeded on the instruction)."""
    return random.Random("is_switched_outputs" + instruction + str(seed)).choices([False, True], k=1)[0]


@dataclass
class Verdict:
    preference: float | None  # 1: first better, 2: second better, 1.5: tie, None: unparseable
    raw: str
    shown: float | None = None  # the preference between the outputs in the order the judge saw them


def first_position_rate(verdicts: Sequence[Verdict]) -> tuple[float, int]:
    """Share (%) of the judge's decisive verdicts that chose the output it was shown first, and their number.
    Near 100 or 0 the judge follows the position, not the outputs: its win rate then only reflects the order
    coin (50 with a balanced coin). NaN with no decisive verdict."""
    decisive = [v.shown for v in verdicts if v.shown in (1.0, 2.0)]
    return (100 * decisive.count(1.0) / len(decisive) if decisive else math.nan), len(decisive)


class PairwiseJudge:
    """A local causal LM that judges pairs of responses in one of :data:`STYLES`.

    ``decoding`` goes to ``generate`` (default: greedy; ``pandalm`` style: PandaLM's beam search,
    :data:`PANDALM_DECODING`; pass ``{}`` for greedy).
    """

    def __init__(self, model: Any, tokenizer: Any, style: str = "alpaca_eval_guanaco", mode: str = "generate",
                 max_new_tokens: int | None = None, batch_size: int = 4, seed: int = 0, progress: bool = True,
                 decoding: dict[str, Any] | None = None) -> None:  # fmt: skip
        if style not in PARSERS:
            raise ValueError(f"judge style must be one of {list(STYLES)}, got {style!r}")
        if mode not in ("generate", "logprob"):
            raise ValueError(f"judge mode must be 'generate' or 'logprob', got {mode!r}")
        self.model, self.tokenizer, self.style, self.mode = model, tokenizer, style, mode
        default_tokens = {"alpaca_eval_guanaco": 50, "alpaca_eval_ranking": 100, "pandalm": 512}[style]
        self.max_new_tokens = max_new_tokens or default_tokens
        self.decoding = dict(PANDALM_DECODING if style == "pandalm" else {}) if decoding is None else dict(decoding)
        self.batch_size, self.seed, self.progress = batch_size, seed, progress

    @classmethod
    def from_pretrained(cls, name: str, dtype: str = "bfloat16", device: str = "cpu", **kwargs: Any) -> PairwiseJudge:
        """A judge from an HF hub id or a local path; ``device="auto"`` spreads it over all GPUs (accelerate), as
        Mixtral 8x7B in bfloat16 (~94 GB) needs."""

        if device == "auto":
            model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype), device_map="auto").eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype)).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(name)
        tokenizer.padding_side = "left"
        return cls(model, tokenizer, **kwargs)

    def _chat(self, system: str, user: str) -> tuple[str, bool] | None:
        """``system`` + ``user`` in the judge's chat template (a template without a system role, like Mixtral's,
        gets the system text at the head of the user turn); None without a template."""
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        apply = self.tokenizer.apply_chat_template
        try:
            text = apply([{"role": "system", "content": system}, {"role": "user", "content": user}], tokenize=False,
                         add_generation_prompt=True)  # fmt: skip
        except Exception:  # no system role
            text = apply([{"role": "user", "content": f"{system}\n{user}"}], tokenize=False, add_generation_prompt=True)
        return text, False  # the template holds its own BOS

    def prompt(self, instruction: str, input: str, first: str, second: str) -> tuple[str, bool]:  # noqa: A002
        """The judge's input text for one pair and whether a BOS token must still be prepended."""
        if self.style == "pandalm":
            return pandalm_prompt(instruction, input, first, second), True
        if self.style == "alpaca_eval_guanaco":
            human = guanaco_prompt(instruction, input, first, second)
            return self._chat(GUANACO_SYSTEM, human) or (f"{GUANACO_SYSTEM}\n### Human: {human}\n### Assistant:", True)
        system, user = (m["content"] for m in alpaca_eval_messages(instruction, input, first, second))
        chatml = f"<|im_start|>system\n{system}\n<|im_end|>\n<|im_start|>user\n{user}\n<|im_end|>\n<|im_start|>assistant\n"
        return self._chat(system, user) or (chatml, True)

    def compare(self, instructions: Sequence[str], inputs: Sequence[str], first: Sequence[str],
                second: Sequence[str], randomize_order: bool = True) -> list[Verdict]:  # fmt: skip
        """Verdicts on ``first[i]`` vs ``second[i]`` (preference 2 = ``second`` better). With ``randomize_order``
        each pair is shown swapped or not by :func:`is_switched` on its instruction and mapped back; identical
        outputs score 1.5 unasked (AlpacaEval's rules; PandaLM asks its judge about every pair)."""
        if not len(instructions) == len(inputs) == len(first) == len(second):
            raise ValueError("instructions, inputs and both output lists must have the same length")
        alpaca = self.style != "pandalm"
        swapped = [randomize_order and is_switched(_instruction(i, x), self.seed) for i, x in zip(instructions, inputs)]
        ask = [i for i in range(len(first)) if not (alpaca and first[i] == second[i])]
        pairs = {i: (second[i], first[i]) if swapped[i] else (first[i], second[i]) for i in ask}
        judged = self._judge([self.prompt(instructions[i], inputs[i], *pairs[i]) for i in ask])
        verdicts = [Verdict(1.5, "identical outputs") for _ in first]
        for i, v in zip(ask, judged):
            v.shown = v.preference
            if swapped[i] and v.preference is not None:
                v.preference = 3.0 - v.preference
            verdicts[i] = v
        return verdicts

    def _judge(self, prompts: Sequence[tuple[str, bool]]) -> list[Verdict]:
        if self.mode == "logprob":
            choices = LOGPROB_VERDICTS[self.style]
            out = []
            for text, add_bos in prompts:
                scores = continuation_logprobs(self.model, self.tokenizer, text, list(choices), add_bos)
                best = max(range(len(scores)), key=scores.__getitem__)
                out.append(Verdict(list(choices.values())[best], list(choices)[best]))
            return out
        raw = self.complete(prompts)
        if self.style == "pandalm":  # PandaLM strips special tokens from the decoded text before its rule
            raw = [PANDALM_SPECIAL.sub("", r.strip()).strip() for r in raw]
        return [Verdict(PARSERS[self.style](r), r) for r in raw]

    def complete(self, prompts: Sequence[tuple[str, bool]]) -> list[str]:
        """The judge's text after each prompt (``(text, add_bos)``), decoded without special tokens."""
        out = [""] * len(prompts)
        for add_bos in (True, False):  # chat-templated prompts already hold their BOS
            idx = [i for i, (_, b) in enumerate(prompts) if b == add_bos]
            if not idx:
                continue
            ids = generate(self.model, self.tokenizer, [prompts[i][0] for i in idx], self.max_new_tokens,
                           self.batch_size, self.progress, add_bos=add_bos, description="judging", **self.decoding)  # fmt: skip
            for i, tokens in zip(idx, ids):
                out[i] = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return out


def win_rate(preferences: Sequence[float | None]) -> tuple[float, float | None, int]:
    """AlpacaEval's win rate of the second output: mean(preference - 1) × 100 over parseable verdicts, its
    standard error (× 100, pandas ``sem``) and their number. NaN with no parseable verdict."""
    valid = [p - 1 for p in preferences if p is not None]
    n = len(valid)
    if n == 0:
        return math.nan, None, 0
    mean = sum(valid) / n
    stderr = math.sqrt(sum((v - mean) ** 2 for v in valid) / (n - 1) / n) * 100 if n > 1 else None
    return mean * 100, stderr, n


def win_tie_lose(preferences: Sequence[float | None]) -> tuple[int, int, int]:
    """PandaLM's counts for the second output: wins (2), ties (1.5) and losses (1)."""
    counts = Counter(preferences)
    return counts[2.0], counts[1.5], counts[1.0]


def read_pandalm_testset(path: str | Path) -> list[dict[str, Any]]:
    """PandaLM's human-annotated pairs (``testset-v1.json``: instruction, input, response1, response2,
    annotator1..3 with 0 = tie, 1, 2) with the majority label as a preference (1, 2 or 1.5 for a tie); pairs on
    which all three annotators differ are left out."""
    items = []
    for d in json.loads(Path(path).read_text()):
        votes = Counter(int(d[f"annotator{k}"]) for k in (1, 2, 3))
        label, count = votes.most_common(1)[0]
        if count >= 2:  # some responses are JSON booleans (a model answered "True"): compared as text
            text = {k: str(d[k]) for k in ("instruction", "input", "response1", "response2")}
            items.append({**d, **text, "label": {0: 1.5, 1: 1.0, 2: 2.0}[label]})
    return items


def human_agreement(judge: PairwiseJudge, items: Sequence[dict[str, Any]], randomize_order: bool = True) -> dict[str, float]:
    """How well ``judge`` agrees with the human majority on annotated pairs (as PandaLM reports it): accuracy and
    macro precision, recall and F1 over {first, second, tie}; an unparsed verdict counts as wrong."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support  # judge-check only

    verdicts = judge.compare([d["instruction"] for d in items], [d.get("input") or "" for d in items],
                             [d["response1"] for d in items], [d["response2"] for d in items], randomize_order)  # fmt: skip
    truth = [str(d["label"]) for d in items]
    pred = [str(v.preference) for v in verdicts]  # "None" for an unparsed verdict: never equal to a label
    p, r, f1, _ = precision_recall_fscore_support(truth, pred, labels=["1.0", "2.0", "1.5"], average="macro", zero_division=0)
    return {"n": len(items), "accuracy": float(accuracy_score(truth, pred)), "precision": float(p), "recall": float(r),
            "f1": float(f1), "unparsed": sum(v.preference is None for v in verdicts)}  # fmt: skip


def alpaca_eval_package(model_outputs: list[dict[str, str]], reference_outputs: list[dict[str, str]],
                        annotators_config: str = "alpaca_eval_gpt4", output_path: str | None = None) -> tuple[float, float, int]:  # fmt: skip
    """AlpacaEval-1 win rate computed by the ``alpaca_eval`` package (``pip install alpaca-eval``; its API judges
    need their keys, e.g. OPENAI_API_KEY). Returns (win rate, standard error, n)."""
    try:
        from alpaca_eval import evaluate  # the optional alpaca-eval extra
    except ModuleNotFoundError as e:
        hint = {"alpaca_eval": "pip install alpaca-eval", "pkg_resources": "alpaca_eval imports pkg_resources: "
                "pip install 'setuptools<81'"}.get(e.name)  # fmt: skip
        if hint is None:
            raise
        raise ImportError(f"backend=alpaca_eval: {hint} (or pip install -e '.[alpaca-eval]')") from e
    name = model_outputs[0]["generator"]
    leaderboard, _ = evaluate(model_outputs=model_outputs, reference_outputs=reference_outputs, name=name,
                              annotators_config=annotators_config, output_path=output_path, fn_metric="get_winrate",
                              sort_by="win_rate", is_return_instead_of_print=True)  # fmt: skip
    row = leaderboard.loc[name]
    return float(row["win_rate"]), float(row["standard_error"]), int(row["n_total"])
