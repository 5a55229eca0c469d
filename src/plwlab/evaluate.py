"""Evaluation of trained runs into one tidy results table (``python evaluate.py run_dir=... eval=...``). So far:
the mechanism analyses (memorization BLEU on training prompts, generation length on AlpacaEval) and lm-eval
benchmarks run from local files (PIQA); the other paper presets and the judges are still to come.

Rows: run_id, model, dataset, plw, rg, benchmark, metric, score, stderr, n.
"""

from __future__ import annotations

import csv
import fcntl
import glob
import json
import logging
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
from plwlab.files import atomic_write

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
        with atomic_write(path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)
            writer.writerows({k: r.get(k) for k in RESULT_COLUMNS} for r in rows)


PIQA_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def prepare_piqa(piqa_dir: str | Path, task_dir: str | Path, name: str = "piqa_local") -> str:
    """lm-eval task ``name`` for PIQA from the official ``valid.jsonl`` + ``valid-labels.lst`` (joined into one
    JSONL, as lm-eval's own piqa task sees it: goal, sol1, sol2, label). Returns the task name."""
    piqa_dir, task_dir = Path(piqa_dir), Path(task_dir)
    docs = [json.loads(line) for line in (piqa_dir / "valid.jsonl").read_text().splitlines() if line.strip()]
    labels = [int(x) for x in (piqa_dir / "valid-labels.lst").read_text().split()]
    if len(docs) != len(labels):
        raise ValueError(f"{piqa_dir}: {len(docs)} questions but {len(labels)} labels")
    task_dir.mkdir(parents=True, exist_ok=True)
    data = task_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps({**d, "label": y}) + "\n" for d, y in zip(docs, labels)))
    (task_dir / f"{name}.yaml").write_text(PIQA_TASK.format(name=name, data=data))
    return name


def run_lm_eval(run: LoadedRun, tasks: Sequence[str], task_dir: str | Path, num_fewshot: int | None = None,
                limit: int | None = None, batch_size: int = 8, device: str = "cpu") -> list[dict[str, Any]]:  # fmt: skip
    """lm-eval-harness on the in-memory model for local ``tasks`` (YAMLs in ``task_dir``); one row per metric."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=run.model, tokenizer=run.tokenizer, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                          bootstrap_iters=1000, random_seed=0, numpy_random_seed=0, torch_random_seed=0)  # fmt: skip
    rows = []
    for task, metrics in out["results"].items():
        n = out["n-samples"][task]["effective"]
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            if metric == "alias" or metric.endswith("_stderr") or not isinstance(value, float):
                continue
            stderr = metrics.get(f"{metric}_stderr,{_filter}")
            rows.append(result_row(run, task, metric, value, stderr if isinstance(stderr, float) else None, n))
    return rows


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
    lm_eval_cfg = cfg.eval.get("lm_eval")
    if lm_eval_cfg:
        task_dir = Path(cfg.results).parent / "lm_eval_tasks"
        tasks = [prepare_piqa(lm_eval_cfg.piqa_dir, task_dir)]
        rows += run_lm_eval(run, tasks, task_dir, lm_eval_cfg.num_fewshot, lm_eval_cfg.limit, cfg.batch_size, cfg.device)
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
