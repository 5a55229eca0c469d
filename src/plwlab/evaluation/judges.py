"""Pairwise LLM judges: AlpacaEval-1 win rate against reference outputs and PandaLM, as the paper ran them.

A judge is any HF causal LM (hub id or path; the paper used Mixtral 8x7B for AlpacaEval and PandaLM-7B for
PandaLM), loaded in this process (``backend=local``) or served once for a whole sweep by an OpenAI-compatible server
(``backend=openai``, :meth:`PairwiseJudge.served`: ``vllm serve mistralai/Mixtral-8x7B-Instruct-v0.1``). Both
build the same prompt with the judge's own tokenizer and chat template and parse the verdict with the same parser;
the served judge has ``concurrency`` requests in flight. With a journal every verdict's text is kept as it arrives,
so an interrupted judging resumes where it stopped. Styles (the prompt and its parser, both in :mod:`plwlab.evaluation.judge_prompts`):

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
= mean(preference - 1) × 100 (:mod:`plwlab.evaluation.verdicts`). ``alpaca_eval_package`` calls the package itself instead (API judges);
``human_agreement`` measures a judge against PandaLM's human-annotated pairs (``plwlab judge-check``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from plwlab.evaluation.engines import Engine, HFEngine, OpenAIEngine
from plwlab.evaluation.generation import continuation_logprobs
from plwlab.evaluation.judge_prompts import (
    GUANACO_SYSTEM, LOGPROB_VERDICTS, PANDALM_DECODING, PANDALM_SPECIAL, PARSERS, alpaca_eval_messages, guanaco_prompt,
    instruction_text, is_switched, pandalm_prompt,
)  # fmt: skip
from plwlab.evaluation.verdicts import Verdict


class PairwiseJudge:
    """A causal LM that judges pairs of responses in one of :data:`plwlab.config.JUDGE_STYLES`: ``model`` in this
    process, or the ``engine`` that serves it (then ``model`` may be None; ``tokenizer`` is the judge's, for its
    prompts).

    ``decoding`` goes to ``generate`` (default: greedy; ``pandalm`` style: PandaLM's beam search,
    :data:`PANDALM_DECODING`; pass ``{}`` for greedy).
    """

    def __init__(self, model: Any, tokenizer: Any, style: str = "alpaca_eval_guanaco", mode: str = "generate",
                 max_new_tokens: int | None = None, batch_size: int | str = "auto", seed: int = 0, progress: bool = True,
                 decoding: dict[str, Any] | None = None, engine: Engine | None = None) -> None:  # fmt: skip
        if style not in PARSERS:
            raise ValueError(f"judge style must be one of {list(PARSERS)}, got {style!r}")
        if mode not in ("generate", "logprob"):
            raise ValueError(f"judge mode must be 'generate' or 'logprob', got {mode!r}")
        self.model, self.tokenizer, self.style, self.mode = model, tokenizer, style, mode
        default_tokens = {"alpaca_eval_guanaco": 50, "alpaca_eval_ranking": 100, "pandalm": 512}[style]
        self.max_new_tokens = max_new_tokens or default_tokens
        self.decoding = dict(PANDALM_DECODING if style == "pandalm" else {}) if decoding is None else dict(decoding)
        self.batch_size, self.seed, self.progress = batch_size, seed, progress
        name = getattr(getattr(model, "config", None), "_name_or_path", "")
        dtype = next(model.parameters()).dtype if model is not None else None
        self.engine = engine or HFEngine(model, tokenizer, batch_size, identity=f"hf judge {name} {dtype}")
        if mode == "logprob" and model is None:
            raise ValueError("a judge in mode=logprob scores verdict strings with its model in this process "
                             "(backend=local, engine=hf)")  # fmt: skip

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

    @classmethod
    def served(cls, name: str, base_url: str, served_model: str | None = None, concurrency: int = 16,
               timeout_s: float = 600.0, max_retries: int = 6, api_key_env: str = "OPENAI_API_KEY",
               **kwargs: Any) -> PairwiseJudge:  # fmt: skip
        """The judge ``name`` (HF id or path: its tokenizer builds the prompts here) served at ``base_url`` under
        ``served_model`` (default ``name``); checked to answer and to serve it before any pair is judged."""
        tokenizer = AutoTokenizer.from_pretrained(name)
        engine = OpenAIEngine(tokenizer, base_url, served_model or name, concurrency, timeout_s, max_retries, api_key_env)
        engine.check()
        return cls(None, tokenizer, engine=engine, **kwargs)

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
                second: Sequence[str], randomize_order: bool = True, journal: Path | None = None) -> list[Verdict]:  # fmt: skip
        """Verdicts on ``first[i]`` vs ``second[i]`` (preference 2 = ``second`` better). With ``randomize_order``
        each pair is shown swapped or not by :func:`is_switched` on its instruction and mapped back; identical
        outputs score 1.5 unasked (AlpacaEval's rules; PandaLM asks its judge about every pair). ``journal``: the
        file each verdict's text is appended to as it arrives, and reused from on a rerun."""
        if not len(instructions) == len(inputs) == len(first) == len(second):
            raise ValueError("instructions, inputs and both output lists must have the same length")
        alpaca = self.style != "pandalm"
        swapped = [randomize_order and is_switched(instruction_text(i, x), self.seed) for i, x in zip(instructions, inputs)]
        ask = [i for i in range(len(first)) if not (alpaca and first[i] == second[i])]
        pairs = {i: (second[i], first[i]) if swapped[i] else (first[i], second[i]) for i in ask}
        judged = self._judge([self.prompt(instructions[i], inputs[i], *pairs[i]) for i in ask], journal)
        verdicts = [Verdict(1.5, "identical outputs") for _ in first]
        for i, v in zip(ask, judged):
            v.shown = v.preference
            if swapped[i] and v.preference is not None:
                v.preference = 3.0 - v.preference
            verdicts[i] = v
        return verdicts

    def _judge(self, prompts: Sequence[tuple[str, bool]], journal: Path | None = None) -> list[Verdict]:
        if self.mode == "logprob":
            choices = LOGPROB_VERDICTS[self.style]
            out = []
            for text, add_bos in prompts:
                scores = continuation_logprobs(self.model, self.tokenizer, text, list(choices), add_bos)
                best = max(range(len(scores)), key=scores.__getitem__)
                out.append(Verdict(list(choices.values())[best], list(choices)[best]))
            return out
        raw = self.complete(prompts, journal)
        if self.style == "pandalm":  # PandaLM strips special tokens from the decoded text before its rule
            raw = [PANDALM_SPECIAL.sub("", r.strip()).strip() for r in raw]
        return [Verdict(PARSERS[self.style](r), r) for r in raw]

    def complete(self, prompts: Sequence[tuple[str, bool]], journal: Path | None = None) -> list[str]:
        """The judge's text after each prompt (``(text, add_bos)``), decoded without special tokens."""
        out = [""] * len(prompts)
        for add_bos in (True, False):  # chat-templated prompts already hold their BOS
            idx = [i for i, (_, b) in enumerate(prompts) if b == add_bos]
            if not idx:
                continue
            done = self.engine.complete([prompts[i][0] for i in idx], self.max_new_tokens, add_bos=add_bos,
                                        description="judging", progress=self.progress, journal=journal, **self.decoding)  # fmt: skip
            for i, completion in zip(idx, done):
                out[i] = completion.text
        return out


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


def _import_alpaca_eval() -> Any:
    try:
        import alpaca_eval  # the optional alpaca-eval extra
    except ModuleNotFoundError as e:
        hint = {"alpaca_eval": "pip install alpaca-eval", "pkg_resources": "alpaca_eval imports pkg_resources: "
                "pip install 'setuptools<81'"}.get(e.name)  # fmt: skip
        if hint is None:
            raise
        raise ImportError(f"backend=alpaca_eval: {hint} (or pip install -e '.[alpaca-eval]')") from e
    return alpaca_eval


def served_annotator_config(annotators_config: str, base_url: str, model: str, folder: str | Path,
                            concurrency: int = 16) -> str:  # fmt: skip
    """An alpaca_eval annotator config (written into ``folder``) that is ``annotators_config`` (a package annotator
    name or a ``configs.yaml``) with its completions sent to ``model`` on the OpenAI-compatible server at
    ``base_url``: the same prompt template, parser and token limit, greedy, through the package's
    ``openai_completions`` and a generated client config for ``base_url`` (the chat API when the template is
    ChatML, else completions). The API key stays in the environment (``OPENAI_API_KEY``; a local server gets a
    placeholder): it is never written."""
    import os

    import yaml
    from alpaca_eval import constants

    source = Path(annotators_config)
    if not source.is_file():
        source = Path(constants.EVALUATORS_CONFIG_DIR) / annotators_config / "configs.yaml"
    ((name, cfg),) = yaml.safe_load(source.read_text()).items()
    template = Path(cfg["prompt_template"])
    if not template.is_absolute():
        template = (Path(constants.EVALUATORS_CONFIG_DIR) if not (source.parent / template).exists() else source.parent) / template
    kwargs = cfg.get("completions_kwargs") or {}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    client = folder / "client_configs.yaml"
    client.write_text(yaml.safe_dump({"default": [{"base_url": base_url, **({} if os.environ.get("OPENAI_API_KEY")
                                                                            else {"api_key": "EMPTY"})}]}))  # fmt: skip
    cfg = {**cfg, "prompt_template": str(template), "fn_completions": "openai_completions",
           "completions_kwargs": {"model_name": model, "max_tokens": kwargs.get("max_tokens") or kwargs.get("max_new_tokens") or 100,
                                  "temperature": 0, "client_config_path": str(client), "num_procs": concurrency,
                                  "requires_chatml": "<|im_start|>" in template.read_text()}}  # fmt: skip
    path = folder / "configs.yaml"
    path.write_text(yaml.safe_dump({f"{name}_served": cfg}, sort_keys=False))
    return str(path)


def alpaca_eval_package(model_outputs: list[dict[str, str]], reference_outputs: list[dict[str, str]],
                        annotators_config: str = "alpaca_eval_gpt4", output_path: str | None = None,
                        base_url: str | None = None, served_model: str | None = None,
                        concurrency: int = 16) -> tuple[float, float, int]:  # fmt: skip
    """AlpacaEval-1 win rate computed by the ``alpaca_eval`` package (``pip install alpaca-eval``; its API judges
    need their keys, e.g. OPENAI_API_KEY). With ``base_url`` the annotator's completions go to ``served_model`` on
    that OpenAI-compatible server (:func:`served_annotator_config`). Returns (win rate, standard error, n)."""
    _import_alpaca_eval()
    from alpaca_eval import evaluate

    if base_url:
        folder = Path(output_path or ".") / "served_annotator"
        annotators_config = served_annotator_config(annotators_config, base_url, served_model, folder, concurrency)
    name = model_outputs[0]["generator"]
    leaderboard, _ = evaluate(model_outputs=model_outputs, reference_outputs=reference_outputs, name=name,
                              annotators_config=annotators_config, output_path=output_path, fn_metric="get_winrate",
                              sort_by="win_rate", is_return_instead_of_print=True)  # fmt: skip
    row = leaderboard.loc[name]
    return float(row["win_rate"]), float(row["standard_error"]), int(row["n_total"])
