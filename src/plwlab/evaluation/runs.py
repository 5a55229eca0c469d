"""A trained run loaded for evaluation: its exported model and tokenizer, the engine that generates for it
(:mod:`plwlab.evaluation.engines`), the labels its result rows carry, and how it is prompted: as it was trained (the
Alpaca template, the bare prompt of prompt/completion data, or its chat template)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from plwlab.data.alpaca import prompt_text, user_text
from plwlab.data.chat import end_of_turn_ids, render_chat
from plwlab.data.sources import CHAT_FORMATS
from plwlab.evaluation.engines import Completion, Engine, HFEngine, make_engine
from plwlab.rundir import RunDir
from plwlab.training.model import ModelLoadError


@dataclass
class LoadedRun:
    model: Any  # None when a served or vLLM engine generates for it
    tokenizer: Any
    meta: dict[str, Any]  # plwlab.json: plw, model, dataset, rg, ...
    run_id: str  # plwlab.rundir.RunDir.run_id
    config_digest: str | None = None  # status.json: the training config's identity
    train_steps: int | None = None  # metrics.json: optimizer steps trained
    weights: str = ""  # fingerprint of the exported weight files: cached responses are only reused for the same
    engine: Engine | None = None  # what generates its completions (default: HF generate on ``model``)
    hf_model: Path | None = None  # the export's folder


def weights_fingerprint(export: Path) -> str:
    """Short hash of the export's weight files' names, sizes and modification times (cheap at 7B; changes when
    the run is trained again)."""
    files = sorted(p for p in export.iterdir() if p.suffix in (".safetensors", ".bin"))
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha1(json.dumps(stamp).encode()).hexdigest()[:12]


def load_run(run_dir: str | Path, dtype: str = "float32", device: str = "cpu", engine: Any = None,
             batch_size: int | str = "auto") -> LoadedRun:  # fmt: skip
    """The HF export of a training run (``<run_dir>/hf_model``; that folder itself may be given); a LoRA adapter is
    loaded onto its base model with peft. ``engine`` (:class:`plwlab.config.EngineConfig`, default ``hf``): what
    generates for it; with ``openai`` or ``vllm`` only its tokenizer is loaded here (the served name is checked
    first)."""
    run = RunDir(run_dir)
    if not run.is_exported and RunDir(run.path.parent).hf_model == run.path:  # the hf_model folder itself
        run = RunDir(run.path.parent)
    if not run.is_exported:
        raise FileNotFoundError(f"{run.hf_model} is not a plwlab export (no {run.export_meta_file.name}); pass a run "
                                "dir from train.py")  # fmt: skip
    export = run.hf_model
    kwargs = {"dtype": getattr(torch, dtype)}
    local = engine is None or engine.name == "hf"
    try:
        if not local:
            model = None
        elif (export / "adapter_config.json").exists():
            from peft import AutoPeftModelForCausalLM  # only LoRA runs pay for importing peft

            model = AutoPeftModelForCausalLM.from_pretrained(export, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(export, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(export)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # a truncated or corrupt export
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load the exported model {export}: {first}; retrain the run (resume=false) or "
                             "restore its hf_model/") from None  # fmt: skip
    tokenizer.padding_side = "left"
    weights = weights_fingerprint(export)
    if model is not None:
        model = model.to(device).eval()
    identity = f"hf {dtype} {weights}"
    generator = HFEngine(model, tokenizer, batch_size, identity) if local else make_engine(
        engine, model, tokenizer, export, batch_size, dtype, identity)  # fmt: skip
    return LoadedRun(model, tokenizer, run.export_meta(), run.run_id, config_digest=run.status().get("config_digest"),
                     train_steps=run.metrics().get("global_steps"), weights=weights, engine=generator,
                     hf_model=export)  # fmt: skip


def is_chat_run(run: LoadedRun) -> bool:
    """Whether the run trained on chat conversations (it is then prompted through its chat template)."""
    return run.meta.get("data_format", "alpaca") in CHAT_FORMATS


def run_complete(run: LoadedRun, prompts: Sequence[str], max_new_tokens: int, description: str,
                 journal: Path | None = None) -> list[Completion]:  # fmt: skip
    """The run's engine's greedy completions of ``prompts`` as the run was trained: a chat run's prompts hold the
    template's own BOS and generation stops at the template's end of turn (``journal``: see
    :meth:`plwlab.evaluation.engines.Engine.complete`)."""
    chat = is_chat_run(run)
    return run.engine.complete(prompts, max_new_tokens, add_bos=not chat, description=description, journal=journal,
                               stop_ids=end_of_turn_ids(run.tokenizer) if chat else None)  # fmt: skip


def instruction_prompt(run: LoadedRun, instruction: str, input: str = "") -> str:  # noqa: A002
    """The prompt that asks the run to follow ``instruction``, in the form it was trained on: the Alpaca template,
    the bare prompt (prompt/completion data), or one user turn through the chat template (chat data)."""
    if is_chat_run(run):
        return render_chat(run.tokenizer, [{"role": "user", "content": user_text(instruction, input)}], True)
    return prompt_text({"instruction": instruction, "input": input}, run.meta.get("data_format", "alpaca"))


def example_prompt(run: LoadedRun, example: Any) -> tuple[str, str]:
    """A training example as (prompt, reference completion): an Alpaca record's prompt and output, or a
    conversation up to its last assistant turn (through the chat template) and that turn."""
    if is_chat_run(run):
        last = max(k for k, m in enumerate(example) if m["role"] == "assistant")
        prompt = render_chat(run.tokenizer, example[:last], True)
        return prompt, example[last]["content"]
    return instruction_prompt(run, example["instruction"], example["input"]), example["output"]
