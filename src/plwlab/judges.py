"""Pairwise LLM judges: AlpacaEval-1-style win rate against reference outputs and PandaLM-style judging.

A judge is any local HF causal LM (hub id or path; the paper used Mixtral 8x7B for AlpacaEval and PandaLM-7B for
PandaLM). Two modes:

- ``generate``: the judge writes its verdict, which is parsed as the original tools do (AlpacaEval's ranking
  parser; PandaLM's first line "1" / "2" / "Tie"). Unparseable verdicts are counted, never guessed.
- ``logprob``: the verdict is the most likely of the fixed verdict strings after the prompt, which always
  gives an answer (useful for small or base judges).

Preferences follow AlpacaEval: 1 = first output better, 2 = second better, 1.5 = tie; win rate of the second
output = mean(preference - 1) × 100. The order of each pair is shuffled (seeded) before judging, and mapped
back, to cancel position bias. ``alpaca_eval_package`` calls the ``alpaca_eval`` package instead (API judges).
``human_agreement`` measures a judge against PandaLM's human-annotated test pairs (``plwlab judge-check``).
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

from plwlab.generation import continuation_logprobs, generate

# The AlpacaEval 1 annotator prompt (tatsu-lab/alpaca_eval, evaluators_configs/alpaca_eval_gpt4/alpaca_eval.txt,
# Apache-2.0), as system + user messages.
ALPACA_EVAL_SYSTEM = "You are a helpful assistant, that ranks models by the quality of their answers."
ALPACA_EVAL_USER = '''I want you to create a leaderboard of different of large-language models. To do so, I will give you the instructions (prompts) given to the models, and the responses of two models. Please rank the models based on which responses would be preferred by humans. All inputs and outputs should be python dictionaries.

Here is the prompt:
{{
    "instruction": """{instruction}""",
}}

Here are the outputs of the models:
[
    {{
        "model": "model_1",
        "answer": """{output_1}"""
    }},
    {{
        "model": "model_2",
        "answer": """{output_2}"""
    }}
]

Now please rank the models by the quality of their answers, so that the model with rank 1 has the best output. Then return a list of the model names and ranks, i.e., produce the following output:
[
    {{'model': <model-name>, 'rank': <model-rank>}},
    {{'model': <model-name>, 'rank': <model-rank>}}
]

Your response must be a valid Python dictionary and should contain nothing else because we will directly execute it in Python. Please provide the ranking that the majority of humans would give.'''

# PandaLM's prompt (WeOpenML/PandaLM, pandalm/utils/pandalm_inference.py, Apache-2.0).
PANDALM_HEAD = "Below are two responses for a given task. The task is defined by the Instruction{context}. " \
               "Evaluate the responses and generate a reference answer for the task.\n\n"  # fmt: skip
_SPECIAL = re.compile(r"<unk>|<pad>|<s>|</s>|\[PAD\]|<\|endoftext\|>|\[UNK\]|\[CLS\]|\[MASK\]")


def alpaca_eval_messages(instruction: str, input: str, output_1: str, output_2: str) -> list[dict[str, str]]:  # noqa: A002
    """The AlpacaEval 1 annotator messages for one pair (an ``input``, if any, is appended to the instruction)."""
    text = f"{instruction}\n\n{input}" if input else instruction
    user = ALPACA_EVAL_USER.format(instruction=text, output_1=output_1, output_2=output_2)
    return [{"role": "system", "content": ALPACA_EVAL_SYSTEM}, {"role": "user", "content": user}]


def pandalm_prompt(instruction: str, input: str, response_1: str, response_2: str) -> str:  # noqa: A002
    """PandaLM's evaluation prompt for one pair (special tokens stripped from the responses, as PandaLM does)."""
    r1, r2 = (_SPECIAL.sub("", r.strip()).strip() for r in (response_1, response_2))
    head = PANDALM_HEAD.format(context=" with an Input that provides further context" if input else "")
    body = f"### Instruction:\n{instruction}\n\n" + (f"### Input:\n{input}\n\n" if input else "")
    return f"{head}{body}### Response 1:\n{r1}\n\n### Response 2:\n{r2}\n\n### Evaluation:\n"


def parse_alpaca_eval(text: str) -> float | None:
    """AlpacaEval's ranking parser: the rank of ``model_1`` in the first Python list of dicts in ``text``."""
    match = re.search(r"\[.*?\]", text, flags=re.S)
    try:
        ranking = ast.literal_eval(match.group(0)) if match else None
        rank = next(d["rank"] for d in ranking if d["model"] == "model_1")
    except (ValueError, SyntaxError, TypeError, KeyError, StopIteration, MemoryError, RecursionError):
        return None
    return float(rank) if rank in (1, 2) else None


def parse_pandalm(text: str) -> float | None:
    """PandaLM's verdict: the first line is "1", "2" or "Tie"."""
    first = text.strip().split("\n")[0].strip()
    return {"1": 1.0, "2": 2.0, "tie": 1.5}.get(first.lower())


# Verdict strings scored in ``logprob`` mode, with the preference each one means.
LOGPROB_VERDICTS = {
    "alpaca_eval": {"[\n    {'model': 'model_1', 'rank': 1}": 1.0, "[\n    {'model': 'model_2', 'rank': 1}": 2.0},
    "pandalm": {"1": 1.0, "2": 2.0, "Tie": 1.5},
}
PARSERS = {"alpaca_eval": parse_alpaca_eval, "pandalm": parse_pandalm}


@dataclass
class Verdict:
    preference: float | None  # 1: first better, 2: second better, 1.5: tie, None: unparseable
    raw: str


class PairwiseJudge:
    """A local causal LM that judges pairs of responses in the ``style`` of AlpacaEval 1 or PandaLM."""

    def __init__(self, model: Any, tokenizer: Any, style: str = "alpaca_eval", mode: str = "generate",
                 max_new_tokens: int = 100, batch_size: int = 4, seed: int = 0, progress: bool = True) -> None:  # fmt: skip
        if style not in PARSERS:
            raise ValueError(f"judge style must be one of {sorted(PARSERS)}, got {style!r}")
        if mode not in ("generate", "logprob"):
            raise ValueError(f"judge mode must be 'generate' or 'logprob', got {mode!r}")
        self.model, self.tokenizer, self.style, self.mode = model, tokenizer, style, mode
        self.max_new_tokens, self.batch_size, self.seed, self.progress = max_new_tokens, batch_size, seed, progress

    @classmethod
    def from_pretrained(cls, name: str, dtype: str = "bfloat16", device: str = "cpu", **kwargs: Any) -> PairwiseJudge:
        """A judge from an HF hub id or a local path; ``device="auto"`` spreads it over all GPUs (accelerate), as
        Mixtral 8x7B in bfloat16 (~94 GB) needs."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device == "auto":
            model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype), device_map="auto").eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype)).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(name)
        tokenizer.padding_side = "left"
        return cls(model, tokenizer, **kwargs)

    def prompt(self, instruction: str, input: str, first: str, second: str) -> tuple[str, bool]:  # noqa: A002
        """The judge's input text for one pair and whether a BOS token must still be prepended."""
        if self.style == "pandalm":
            return pandalm_prompt(instruction, input, first, second), True
        messages = alpaca_eval_messages(instruction, input, first, second)
        if getattr(self.tokenizer, "chat_template", None):
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception:  # templates without a system role (Mixtral's): fold it into the user turn
                merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
                text = self.tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
            return text, False
        chatml = "".join(f"<|im_start|>{m['role']}\n{m['content']}\n<|im_end|>\n" for m in messages)
        return chatml + "<|im_start|>assistant\n", True

    def compare(self, instructions: Sequence[str], inputs: Sequence[str], first: Sequence[str],
                second: Sequence[str], randomize_order: bool = True) -> list[Verdict]:  # fmt: skip
        """Verdicts on ``first[i]`` vs ``second[i]`` (preference 2 = ``second`` better), judged in a seeded random
        order per pair when ``randomize_order``."""
        if not len(instructions) == len(inputs) == len(first) == len(second):
            raise ValueError("instructions, inputs and both output lists must have the same length")
        rng = random.Random(self.seed)
        swapped = [randomize_order and rng.random() < 0.5 for _ in instructions]
        pairs = [(b, a) if s else (a, b) for a, b, s in zip(first, second, swapped)]
        prompts = [self.prompt(i, x, a, b) for i, x, (a, b) in zip(instructions, inputs, pairs)]
        verdicts = self._judge(prompts)
        for v, s in zip(verdicts, swapped):
            if s and v.preference is not None:
                v.preference = 3.0 - v.preference
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
        verdicts: list[Verdict | None] = [None] * len(prompts)
        for add_bos in (True, False):  # chat-templated prompts already hold their BOS
            idx = [i for i, (_, b) in enumerate(prompts) if b == add_bos]
            if not idx:
                continue
            ids = generate(self.model, self.tokenizer, [prompts[i][0] for i in idx], self.max_new_tokens,
                           self.batch_size, self.progress, add_bos=add_bos, description="judging")  # fmt: skip
            for i, tokens in zip(idx, ids):
                raw = self.tokenizer.decode(tokens, skip_special_tokens=True)
                verdicts[i] = Verdict(PARSERS[self.style](raw), raw)
        return verdicts  # type: ignore[return-value]


def win_rate(preferences: Sequence[float | None]) -> tuple[float, float | None, int]:
    """AlpacaEval's win rate of the second output: mean(preference - 1) × 100 over parseable verdicts, its
    standard error (× 100) and their number. NaN with no parseable verdict."""
    valid = [p - 1 for p in preferences if p is not None]
    n = len(valid)
    if n == 0:
        return math.nan, None, 0
    mean = sum(valid) / n
    stderr = math.sqrt(sum((v - mean) ** 2 for v in valid) / (n - 1) / n) * 100 if n > 1 else None
    return mean * 100, stderr, n


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
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

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
        from alpaca_eval import evaluate
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
