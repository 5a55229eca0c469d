"""The judges' prompts and verdict parsers, as the original tools write and read them (text only, no model): the
AlpacaEval annotators ``guanaco_33b`` (the paper's) and ``alpaca_eval_gpt4`` ranking, PandaLM's prompt and tie
rule, the verdict strings ``logprob`` mode scores, and alpaca_eval's seeded order coin. A local judge
(:class:`plwlab.evaluation.judges.PairwiseJudge`) and a served one use the same text."""

from __future__ import annotations

import ast
import random
import re

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


def instruction_text(instruction: str, input: str) -> str:  # noqa: A002
    """The instruction the judge sees: an ``input`` appended after a blank line, as alpaca_eval and PandaLM do."""
    return f"{instruction}\n\n{input}" if input else instruction


def guanaco_prompt(instruction: str, input: str, output_1: str, output_2: str) -> str:  # noqa: A002
    """The human turn of alpaca_eval's guanaco_33b annotator for one pair (an ``input`` is appended to the
    instruction)."""
    return fill_template(GUANACO_HUMAN, instruction_text(instruction, input), output_1, output_2)


def alpaca_eval_messages(instruction: str, input: str, output_1: str, output_2: str) -> list[dict[str, str]]:  # noqa: A002
    """The alpaca_eval_gpt4 ranking annotator's messages for one pair."""
    user = fill_template(RANKING_USER, instruction_text(instruction, input), output_1, output_2)
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


def is_switched(instruction: str, seed: int = 0) -> bool:
    """alpaca_eval's order coin for a pair (``RandomSwitchTwoColumnsProcessor`` seeded on the instruction)."""
    return random.Random("is_switched_outputs" + instruction + str(seed)).choices([False, True], k=1)[0]
