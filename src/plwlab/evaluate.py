"""Evaluation of trained runs into one tidy results table (``python evaluate.py run_dir=... eval=...``). So far:
the mechanism analyses (memorization BLEU on training prompts, generation length on AlpacaEval); the lm-eval
benchmark presets and the judges are still to come.

Rows: run_id, model, dataset, plw, rg, benchmark, metric, score, stderr, n.
"""

from __future__ import annotations

import csv
import fcntl
import glob
import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sacrebleu
import torch
from rich.progress import Progress
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from plwlab.alpaca import alpaca_prompt, load_records

log = logging.getLogger(__name__)
RESULT_COLUMNS = ("run_id", "model", "dataset", "plw", "rg", "benchmark", "metric", "score", "stderr", "n")
ROW_KEY = ("run_id", "benchmark", "metric")


@dataclass
class LoadedRun:
    model: Any
    tokenizer: Any
    meta: dict[str, Any]  # plwlab.json: plw, model, data, rg, ...
    run_id: str


def load_run(run_dir: str | Path, dtype: str = "float32", device: str = "cpu") -> LoadedRun:
    """The HF export of a training run (``<run_dir>/hf_model`` or that folder itself); a LoRA adapter is loaded
    onto its base model with peft."""
    path = Path(run_dir)
    export = path / "hf_model" if (path / "hf_model").is_dir() else path
    if not (export / "plwlab.json").exists():
        raise FileNotFoundError(f"{export} is not a plwlab export (no plwlab.json); pass a run dir from train.py")
    kwargs = {"dtype": getattr(torch, dtype)}
    if (export / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(export, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(export, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(export)
    tokenizer.padding_side = "left"
    run_id = export.parent.name if export.name == "hf_model" else export.name
    return LoadedRun(model.to(device).eval(), tokenizer, json.loads((export / "plwlab.json").read_text()), run_id)


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 256, batch_size: int = 8,
    progress: bool = True,
) -> list[list[int]]:  # fmt: skip
    """Greedy completions (token ids, without the prompt, cut at EOS) for ``prompts``, in their order.

    Prompts are tokenized as in training (``[bos] + tok(prompt)``), sorted by length so each batch pads little,
    and left-padded so every row ends at its prompt's last token.
    """
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    encoded = [bos + ids for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in encoded]
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("generating", total=len(encoded))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in idx], device=device)
            mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in idx], device=device)
            generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
            for row, i in enumerate(idx):
                tokens = generated[row, width:].tolist()
                out[i] = tokens[: tokens.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in tokens else tokens
            bar.advance(task, len(idx))
    return out


def memorization_bleu(
    run: LoadedRun, train_path: str, n: int = 10_000, seed: int = 42, max_new_tokens: int = 256, batch_size: int = 8,
) -> tuple[float, str, int]:  # fmt: skip
    """Corpus BLEU of greedy generations for ``n`` sampled training prompts against their training completions
    (sacreBLEU, 13a tokenization, exponential smoothing). Returns (score, signature, n used)."""
    records = load_records(train_path, on_invalid="skip")
    sample = random.Random(seed).sample(records, min(n, len(records)))
    ids = generate(run.model, run.tokenizer, [alpaca_prompt(r["instruction"], r["input"]) for r in sample],
                   max_new_tokens, batch_size)  # fmt: skip
    hypotheses = run.tokenizer.batch_decode(ids, skip_special_tokens=True)
    bleu = sacrebleu.metrics.BLEU(tokenize="13a", smooth_method="exp")
    score = bleu.corpus_score(hypotheses, [[r["output"] for r in sample]])
    return score.score, str(bleu.get_signature()), len(sample)


def generation_lengths(run: LoadedRun, instructions: Sequence[str], max_new_tokens: int = 512, batch_size: int = 8) -> list[int]:
    """Token lengths of greedy responses to ``instructions`` (e.g. the 805 AlpacaEval instructions)."""
    ids = generate(run.model, run.tokenizer, [alpaca_prompt(i) for i in instructions], max_new_tokens, batch_size)
    return [len(x) for x in ids]


def result_row(run: LoadedRun, benchmark: str, metric: str, score: float, stderr: float | None, n: int) -> dict[str, Any]:
    meta = run.meta
    return {"run_id": run.run_id, "model": meta.get("model"), "dataset": meta.get("data"), "plw": meta.get("plw"),
            "rg": meta.get("rg"), "benchmark": benchmark, "metric": metric, "score": score, "stderr": stderr, "n": n}  # fmt: skip


def append_results(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Add ``rows`` to the CSV results table at ``path``: a row with the same (run_id, benchmark, metric) is
    replaced, never duplicated; the file is rewritten atomically under an exclusive lock, so the jobs of a
    multirun can append concurrently and an interruption never truncates it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        existing = list(csv.DictReader(path.open())) if path.exists() else []
        new_keys = {tuple(str(r[k]) for k in ROW_KEY) for r in rows}
        kept = [r for r in existing if tuple(r[k] for k in ROW_KEY) not in new_keys]
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)
            writer.writerows({k: r.get(k) for k in RESULT_COLUMNS} for r in rows)
        os.replace(tmp, path)


def training_data_path(run_dir: Path) -> str:
    """What a run trained on: its built variant (from data_manifest.json) or its data.path (config.yaml)."""
    manifest = run_dir / "data_manifest.json"
    if manifest.exists():
        return json.loads(manifest.read_text())["output_path"]
    return OmegaConf.load(run_dir / "config.yaml").data.path


def evaluate_run(cfg: DictConfig, run_dir: Path) -> list[dict[str, Any]]:
    """The evaluations of ``cfg.eval`` for one run, as result rows."""
    run = load_run(run_dir, cfg.dtype, cfg.device)
    rows = []
    mem = cfg.eval.get("memorization")
    if mem:
        score, signature, n = memorization_bleu(run, training_data_path(run_dir), mem.n, cfg.seed, mem.max_new_tokens,
                                                cfg.batch_size)  # fmt: skip
        log.info("%s memorization BLEU %.2f over %d prompts [%s]", run.run_id, score, n, signature)
        rows.append(result_row(run, "memorization", "bleu", score, None, n))
    gen = cfg.eval.get("generation_length")
    if gen:
        instructions = [r["instruction"] for r in json.loads(Path(gen.instructions).read_text())][: gen.limit]
        lengths = torch.tensor(generation_lengths(run, instructions, gen.max_new_tokens, cfg.batch_size), dtype=torch.float64)
        stderr = float(lengths.std() / len(lengths) ** 0.5) if len(lengths) > 1 else None
        rows.append(result_row(run, "alpaca_eval", "generation_length", float(lengths.mean()), stderr, len(lengths)))
    return rows


def evaluate(cfg: DictConfig) -> list[dict[str, Any]]:
    """Evaluate every run matching ``cfg.run_dir`` (a run directory or a glob over a sweep) and append the rows
    to ``cfg.results``. Returns the rows."""
    matches = {Path(p).resolve() for p in glob.glob(str(cfg.run_dir))}  # resolved: a linked run counts once
    runs = sorted(p for p in matches if (p / "hf_model" / "plwlab.json").exists())
    if not runs:
        raise FileNotFoundError(f"no finished training run (with hf_model/plwlab.json) matches {cfg.run_dir}")
    rows = []
    for run_dir in runs:
        run_rows = evaluate_run(cfg, run_dir)
        append_results(cfg.results, run_rows)  # per run: an interruption keeps what is done
        rows += run_rows
    log.info("%d rows for %d runs appended to %s", len(rows), len(runs), cfg.results)
    return rows
