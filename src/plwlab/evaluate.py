"""Evaluation of trained runs into one tidy results table (``python evaluate.py run_dir=... eval=paper``).

Per run, as ``cfg.eval`` asks: memorization BLEU on training prompts; greedy responses on the AlpacaEval and
PandaLM instruction sets (cached in ``<run>/eval/generations/``) and their lengths; lm-eval-harness benchmarks
(:mod:`plwlab.benchmarks`); pairwise judges against reference responses (:mod:`plwlab.judges`).

Rows: run_id (``<training name>/<run dir>``), model, dataset, plw, rg, benchmark, metric, score, stderr, n,
config_digest, train_steps and data_sha256 (which run exactly, trained how long, on which data). Each benchmark's rows are written as soon as
they are done; a failing benchmark is logged, recorded in ``<run>/eval/status.json`` and makes the exit code
non-zero, and the other benchmarks' rows stay.
"""

from __future__ import annotations

import csv
import fcntl
import glob
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sacrebleu
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from plwlab.batching import split_indices
from plwlab.benchmarks import prepare_task, run_lm_eval
from plwlab.files import atomic_write
from plwlab.generation import generate
from plwlab.judges import PairwiseJudge, alpaca_eval_package, win_rate, win_tie_lose
from plwlab.chat import end_of_turn_ids
from plwlab.sources import CHAT_FORMATS, load_built_variant, load_source, prompt_template
from plwlab.tokenization import cached_tokenize_source, prompt_text

log = logging.getLogger(__name__)
RESULT_COLUMNS = ("run_id", "model", "dataset", "plw", "rg", "benchmark", "metric", "score", "stderr", "n",
                  "config_digest", "train_steps", "data_sha256")  # fmt: skip
LEGACY_COLUMNS = RESULT_COLUMNS[:10]  # tables written before config_digest, train_steps and data_sha256 existed
ROW_KEY = ("run_id", "benchmark", "metric")


@dataclass
class LoadedRun:
    model: Any
    tokenizer: Any
    meta: dict[str, Any]  # plwlab.json: plw, model, data, rg, ...
    run_id: str  # <training name>/<run dir name>: unique across sweeps that share overrides
    config_digest: str | None = None  # status.json: the training config's identity
    train_steps: int | None = None  # metrics.json: optimizer steps trained
    weights: str = ""  # fingerprint of the exported weight files: cached responses are only reused for the same


def weights_fingerprint(export: Path) -> str:
    """Short hash of the export's weight files' names, sizes and modification times (cheap at 7B; changes when
    the run is trained again)."""
    files = sorted(p for p in export.iterdir() if p.suffix in (".safetensors", ".bin"))
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha1(json.dumps(stamp).encode()).hexdigest()[:12]


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
    run = export.parent if export.name == "hf_model" else export
    train_cfg, status, metrics = run / "config.yaml", run / "status.json", run / "metrics.json"
    name = OmegaConf.load(train_cfg).get("name") if train_cfg.exists() else run.parent.name
    return LoadedRun(
        model.to(device).eval(), tokenizer, json.loads((export / "plwlab.json").read_text()), f"{name}/{run.name}",
        config_digest=json.loads(status.read_text()).get("config_digest") if status.exists() else None,
        train_steps=json.loads(metrics.read_text()).get("global_steps") if metrics.exists() else None,
        weights=weights_fingerprint(export),
    )  # fmt: skip


def is_chat_run(run: LoadedRun) -> bool:
    """Whether the run trained on chat conversations (it is then prompted through its chat template)."""
    return run.meta.get("data_format", "alpaca") in CHAT_FORMATS


def run_generate(run: LoadedRun, prompts: Sequence[str], max_new_tokens: int, batch_size: int, description: str) -> list[list[int]]:
    """:func:`plwlab.generation.generate` as the run was trained: a chat run's prompts hold the template's own BOS
    and generation stops at the template's end of turn."""
    chat = is_chat_run(run)
    return generate(run.model, run.tokenizer, prompts, max_new_tokens, batch_size, add_bos=not chat,
                    description=description, stop_ids=end_of_turn_ids(run.tokenizer) if chat else None)  # fmt: skip


def instruction_prompt(run: LoadedRun, instruction: str, input: str = "") -> str:  # noqa: A002
    """The prompt that asks the run to follow ``instruction``, in the form it was trained on: the Alpaca template,
    the bare prompt (prompt/completion data), or one user turn through the chat template (chat data)."""
    if is_chat_run(run):
        user = instruction + (f"\n\n{input}" if input else "")
        return run.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip
    template = prompt_template(run.meta.get("data_format", "alpaca"))
    return prompt_text({"instruction": instruction, "input": input}, template)


def example_prompt(run: LoadedRun, example: Any) -> tuple[str, str]:
    """A training example as (prompt, reference completion): an Alpaca record's prompt and output, or a
    conversation up to its last assistant turn (through the chat template) and that turn."""
    if is_chat_run(run):
        last = max(k for k, m in enumerate(example) if m["role"] == "assistant")
        prompt = run.tokenizer.apply_chat_template(list(example[:last]), tokenize=False, add_generation_prompt=True)
        return prompt, example[last]["content"]
    return instruction_prompt(run, example["instruction"], example["input"]), example["output"]


def memorization_bleu(
    run: LoadedRun, examples: Sequence[Any], n: int = 10_000, seed: int = 42, max_new_tokens: int = 256,
    batch_size: int = 8,
) -> tuple[float, str, int]:  # fmt: skip
    """Corpus BLEU of greedy generations for ``n`` prompts sampled from the training ``examples`` against their
    training completions (sacreBLEU, 13a tokenization, exponential smoothing; a conversation: its last assistant
    turn from the turns before it). Returns (score, signature, n used)."""
    sample = random.Random(seed).sample(list(examples), min(n, len(examples)))
    prompts, references = zip(*(example_prompt(run, e) for e in sample))
    ids = run_generate(run, prompts, max_new_tokens, batch_size, "memorization")
    hypotheses = run.tokenizer.batch_decode(ids, skip_special_tokens=True)
    bleu = sacrebleu.metrics.BLEU(tokenize="13a", smooth_method="exp")
    score = bleu.corpus_score(hypotheses, [list(references)])
    return score.score, str(bleu.get_signature()), len(sample)


def result_row(run: LoadedRun, benchmark: str, metric: str, score: float, stderr: float | None, n: int) -> dict[str, Any]:
    meta = run.meta
    return {"run_id": run.run_id, "model": meta.get("model"), "dataset": meta.get("data"), "plw": meta.get("plw"),
            "rg": meta.get("rg"), "benchmark": benchmark, "metric": metric, "score": score, "stderr": stderr, "n": n,
            "config_digest": run.config_digest, "train_steps": run.train_steps,
            "data_sha256": meta.get("data_sha256")}  # fmt: skip


def read_results(path: str | Path) -> list[dict[str, str]]:
    """The rows of a results table, checked: plwlab's header and every line complete. A malformed table is an
    error naming its first bad line (evaluate.py reads it before doing any work)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = tuple(next(reader))
        if header not in (RESULT_COLUMNS, LEGACY_COLUMNS):
            raise ValueError(f"{path}: line 1 is not a plwlab results header (expected {','.join(RESULT_COLUMNS)})")
        rows = []
        for fields in reader:
            if len(fields) != len(header):
                raise ValueError(f"{path}: line {reader.line_num} has {len(fields)} fields, not {len(header)} "
                                 "(truncated or hand-edited?); fix or remove that line")  # fmt: skip
            rows.append(dict(zip(header, fields)))
    return rows


def append_results(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Add ``rows`` to the CSV results table at ``path``: a row with the same (run_id, benchmark, metric) is
    replaced, never duplicated (with a warning if it came from another training config); the file is rewritten
    atomically under an exclusive lock, so the jobs of a multirun can append concurrently and an interruption
    never truncates it. If the table cannot be read or written, the new rows are saved beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path.with_name(path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            existing = read_results(path)
            new = {tuple(str(r[k]) for k in ROW_KEY): r for r in rows}
            kept = []
            for old in existing:
                replacement = new.get(tuple(old[k] for k in ROW_KEY))
                if replacement is None:
                    kept.append(old)
                elif old.get("config_digest") and old["config_digest"] != str(replacement.get("config_digest")):
                    log.warning("%s: replacing %s %s of %s, which came from another training config (%s, now %s)",
                                path, old["benchmark"], old["metric"], old["run_id"], old["config_digest"],
                                replacement.get("config_digest"))  # fmt: skip
            with atomic_write(path) as tmp, tmp.open("w", newline="") as f:
                _write_rows(f, [*kept, *rows])
    except (OSError, ValueError) as e:
        pending = path.with_name(f"{path.stem}.pending-{os.getpid()}.csv")
        with pending.open("a", newline="") as f:
            _write_rows(f, rows)
        raise RuntimeError(f"{e}; the {len(rows)} new rows are kept in {pending}") from e


def _write_rows(f: Any, rows: Sequence[dict[str, Any]]) -> None:
    """``rows`` as CSV in plwlab's columns, after the header if ``f`` is at its start."""
    writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
    if f.tell() == 0:
        writer.writeheader()
    writer.writerows({k: r.get(k) for k in RESULT_COLUMNS} for r in rows)


def training_records(run_dir: Path, tokenizer: Any) -> list[Any]:
    """The examples a run trained on (records, or conversations for chat data), validation split excluded: its
    built variant (data_manifest.json) or its data source, with the run's limit, invalid/empty-completion handling
    and seeded split (config.yaml)."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    d = cfg.data
    fmt = d.get("format", "alpaca")  # runs older than data.format trained on Alpaca records
    manifest = run_dir / "data_manifest.json"
    if manifest.exists():
        examples = load_built_variant(json.loads(manifest.read_text())["output_path"], fmt)
    else:  # runs older than data.empty_output never kept an empty output
        examples = load_source(d.path, fmt, d.get("split", "train"), d.get("columns"), d.get("roles"),
                               d.get("on_invalid", "error"), d.get("empty_output", "skip"))  # fmt: skip
    examples = examples[: d.get("limit")]
    if d.get("empty_completion") == "drop":
        tokenized, _ = cached_tokenize_source(examples, tokenizer, fmt, d.max_length, None, d.get("think_tags"))
        examples = [r for r, e in zip(examples, tokenized) if e.has_completion]
    _, train = split_indices(len(examples), d.val_size, cfg.seed)
    return [examples[i] for i in train]


def read_instructions(path: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    """Instruction records (``instruction`` and ``input``, "" if absent) from a JSON list, e.g. the AlpacaEval
    outputs files or PandaLM's ``testset-inference-v1.json``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"instruction set {path} not found (set PLWLAB_DATA or point the eval config at it)")
    records = json.loads(path.read_text())
    return [{"instruction": r["instruction"], "input": r.get("input") or ""} for r in records][:limit]


def responses(run: LoadedRun, run_dir: Path, name: str, records: Sequence[dict[str, str]], max_new_tokens: int,
              batch_size: int) -> list[dict[str, Any]]:  # fmt: skip
    """The run's greedy responses to ``records`` (prompted as it was trained: :func:`instruction_prompt`), as AlpacaEval-style records (instruction,
    input, output, generator, length in tokens). Cached in ``<run_dir>/eval/generations/<name>.json`` and reused
    while what determines them is the same: the instructions, ``max_new_tokens``, the dtype the model ran in and
    its weight files."""
    cache = run_dir / "eval" / "generations" / f"{name}.json"
    dtype = str(next(run.model.parameters()).dtype).removeprefix("torch.")
    if cache.exists():
        cached = json.loads(cache.read_text())
        key = ("instruction", "input", "max_new_tokens", "dtype", "weights")
        same = [tuple(r.get(k) for k in key) for r in cached]
        if same == [(r["instruction"], r["input"], max_new_tokens, dtype, run.weights) for r in records]:
            log.info("%s: reusing %d %s responses from %s", run.run_id, len(cached), name, cache)
            return cached
    ids = run_generate(run, [instruction_prompt(run, r["instruction"], r["input"]) for r in records], max_new_tokens,
                       batch_size, f"{name} responses")  # fmt: skip
    texts = run.tokenizer.batch_decode(ids, skip_special_tokens=True)
    out = [{"instruction": r["instruction"], "input": r["input"], "output": t.strip(), "generator": run.run_id,
            "length": len(i), "max_new_tokens": max_new_tokens, "dtype": dtype, "weights": run.weights}
           for r, t, i in zip(records, texts, ids)]  # fmt: skip
    with atomic_write(cache) as tmp:
        tmp.write_text(json.dumps(out, indent=1, ensure_ascii=False))
    return out


def reference_outputs(reference: str, records: Sequence[dict[str, Any]], generations: str, max_new_tokens: int,
                      cfg: DictConfig) -> list[str]:  # fmt: skip
    """Reference responses aligned with ``records``: from a JSON list (instruction, input, output; e.g. AlpacaEval's
    text_davinci_003 outputs) or from another training run (a run directory), whose responses are generated and
    cached there first if they are not yet."""
    path = Path(reference)
    if path.is_dir():
        cache = path / "eval" / "generations" / f"{generations}.json"
        if not cache.exists():
            log.info("generating the reference responses of %s", path)
            responses(load_run(path, cfg.dtype, cfg.device), path, generations, records, max_new_tokens, cfg.batch_size)
        path = cache
    if not path.exists():
        raise FileNotFoundError(f"reference responses {path} not found")
    by_prompt = {(r["instruction"], r.get("input") or ""): r["output"] for r in json.loads(path.read_text())}
    missing = [r["instruction"] for r in records if (r["instruction"], r["input"]) not in by_prompt]
    if missing:
        raise ValueError(f"{path} has no reference for {len(missing)} of {len(records)} instructions, e.g. {missing[0]!r}")
    return [by_prompt[(r["instruction"], r["input"])] for r in records]


def judge_rows(run: LoadedRun, name: str, spec: DictConfig, outputs: list[dict[str, Any]], reference: list[str],
               judges: dict[str, PairwiseJudge], cfg: DictConfig, results: Path) -> list[dict[str, Any]]:  # fmt: skip
    """Win rate of the run's ``outputs`` against ``reference`` by the judge of ``spec`` (and the count of verdicts
    that could not be parsed)."""
    if spec.backend == "alpaca_eval":
        refs = [{**o, "output": ref, "generator": "reference"} for o, ref in zip(outputs, reference)]
        score, stderr, n = alpaca_eval_package(outputs, refs, spec.annotators_config,
                                               str(results.parent / "alpaca_eval" / run.run_id))  # fmt: skip
        return [result_row(run, name, "win_rate", score, stderr, n)]
    if spec.backend != "local":
        raise ValueError(f"judge backend must be 'local' or 'alpaca_eval', got {spec.backend!r}")
    decoding = spec.get("decoding")
    kwargs = {"style": spec.style, "mode": spec.mode, "max_new_tokens": spec.get("max_new_tokens"),
              "batch_size": cfg.batch_size, "seed": spec.get("order_seed", 0),
              "decoding": None if decoding is None else OmegaConf.to_container(decoding)}  # fmt: skip
    if spec.model == "self":  # the evaluated model judges itself: checks the pipeline, not a real judge
        judge = PairwiseJudge(run.model, run.tokenizer, **kwargs)
    else:
        key = json.dumps([spec.model, kwargs], sort_keys=True)
        if key not in judges:  # loaded once for all runs
            dtype, device = spec.get("dtype") or cfg.dtype, spec.get("device") or cfg.device
            judges[key] = PairwiseJudge.from_pretrained(spec.model, dtype, device, **kwargs)
        judge = judges[key]
    verdicts = judge.compare([o["instruction"] for o in outputs], [o["input"] for o in outputs], reference,
                             [o["output"] for o in outputs], spec.randomize_order)  # fmt: skip
    score, stderr, n = win_rate([v.preference for v in verdicts])
    invalid = len(verdicts) - n
    if invalid:
        log.warning("%s %s: %d of %d judge verdicts could not be parsed, e.g. %r", run.run_id, name, invalid,
                    len(verdicts), next(v.raw for v in verdicts if v.preference is None)[:200])  # fmt: skip
    rows = [result_row(run, name, "win_rate", score, stderr, n),
            result_row(run, name, "unparsed_verdicts", float(invalid), None, len(verdicts))]  # fmt: skip
    if spec.style == "pandalm":  # PandaLM reports win / tie / lose counts beside the rate
        counts = win_tie_lose([v.preference for v in verdicts])
        rows += [result_row(run, name, metric, float(c), None, n) for metric, c in zip(("wins", "ties", "losses"), counts)]
    return rows


def evaluate_run(
    cfg: DictConfig, run_dir: Path, judges: dict[str, PairwiseJudge], results: Path
) -> tuple[list[dict[str, Any]], list[str]]:
    """The evaluations of ``cfg.eval`` for one run. Each benchmark's rows go into ``results`` as soon as they are
    done; a benchmark that fails is logged and recorded in ``<run_dir>/eval/status.json`` and the others go on.
    Returns the rows and the failures ("benchmark: error")."""
    run = load_run(run_dir, cfg.dtype, cfg.device)
    ev = cfg.eval
    rows: list[dict[str, Any]] = []
    status: dict[str, str] = {}
    generated: dict[str, list[dict[str, Any]]] = {}

    def step(name: str, work: Callable[[], list[dict[str, Any]]]) -> None:
        try:
            new = work()
        except Exception as e:  # one failing benchmark or judge must not take the others' rows with it
            log.error("%s: %s failed: %s: %s", run.run_id, name, type(e).__name__, e)
            status[name] = f"failed: {type(e).__name__}: {e}"[:2000]
            return
        append_results(results, new)
        rows.extend(new)
        status[name] = "ok"

    if ev.get("memorization"):

        def memorization() -> list[dict[str, Any]]:
            mem = ev.memorization
            records = training_records(run_dir, run.tokenizer)
            score, signature, n = memorization_bleu(run, records, mem.n, cfg.seed, mem.max_new_tokens, cfg.batch_size)
            log.info("%s memorization BLEU %.2f over %d prompts [%s]", run.run_id, score, n, signature)
            return [result_row(run, "memorization", "bleu", score, None, n)]

        step("memorization", memorization)
    for name, spec in (ev.get("generations") or {}).items():

        def generation(name: str = name, spec: DictConfig = spec) -> list[dict[str, Any]]:
            outputs = responses(run, run_dir, name, read_instructions(spec.instructions, spec.limit),
                                spec.max_new_tokens, cfg.batch_size)  # fmt: skip
            lengths = torch.tensor([o["length"] for o in outputs], dtype=torch.float64)
            stderr = float(lengths.std() / len(lengths) ** 0.5) if len(lengths) > 1 else None
            generated[name] = outputs
            return [result_row(run, name, "generation_length", float(lengths.mean()), stderr, len(lengths))]

        step(f"{name} generations", generation)
    harness: dict[str, Any] = {}
    if ev.get("lm_eval") and ev.lm_eval.tasks:
        from importlib.metadata import version

        harness = {"lm_eval_version": version("lm_eval"), "add_bos_token": ev.lm_eval.get("add_bos_token")}
        task_dir = run_dir / "eval" / "lm_eval_tasks"
        for benchmark, t in ev.lm_eval.tasks.items():

            def lm_eval(benchmark: str = benchmark, t: DictConfig = t) -> list[dict[str, Any]]:
                task = prepare_task(benchmark, task_dir, t.num_fewshot, t.get("data"), t.get("fewshot_data"),
                                    ev.lm_eval.max_gen_toks)  # fmt: skip
                return [result_row(run, b, m, score, stderr, n) for b, m, score, stderr, n in
                        run_lm_eval(run.model, run.tokenizer, [task], task_dir, ev.lm_eval.limit, cfg.batch_size,
                                    cfg.device, ev.lm_eval.get("add_bos_token"))]  # fmt: skip

            step(benchmark, lm_eval)
    for name, spec in (ev.get("judges") or {}).items():
        if spec.generations not in (ev.get("generations") or {}):
            raise ValueError(f"judge {name} compares eval.generations.{spec.generations}, which this preset lacks")
        if spec.reference is None:
            log.warning("%s: judge %s skipped: no reference (set eval.judges.%s.reference)", run.run_id, name, name)
            continue

        def judge(name: str = name, spec: DictConfig = spec) -> list[dict[str, Any]]:
            if spec.generations not in generated:
                raise RuntimeError(f"its responses ({spec.generations}) could not be generated")
            outputs = generated[spec.generations]
            max_new_tokens = ev.generations[spec.generations].max_new_tokens
            reference = reference_outputs(spec.reference, outputs, spec.generations, max_new_tokens, cfg)
            return judge_rows(run, name, spec, outputs, reference, judges, cfg, results)

        step(name, judge)
    with atomic_write(run_dir / "eval" / "status.json") as tmp:
        tmp.write_text(json.dumps({"run_id": run.run_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                   **({"harness": harness} if harness else {}), **status}, indent=2))
    if cfg.wandb.enabled and rows:
        log_to_wandb(cfg, run_dir, rows)
    return rows, [f"{name}: {state[len('failed: '):]}" for name, state in status.items() if state != "ok"]


def log_to_wandb(cfg: DictConfig, run_dir: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One W&B run (job_type eval, in the training run's group unless ``wandb.group`` is set) per evaluated run:
    its scores as metrics and the rows as a table."""
    import wandb

    meta = json.loads((run_dir / "hf_model" / "plwlab.json").read_text())
    run_id = rows[0]["run_id"] if rows else run_dir.name
    train_cfg = run_dir / "config.yaml"  # default group: the training runs' (their sweep name)
    group = cfg.wandb.group or (OmegaConf.load(train_cfg).get("name") if train_cfg.exists() else None)
    with wandb.init(project=cfg.wandb.project, group=group, name=f"{run_id}-eval", job_type="eval",
                    config={**meta, "eval": OmegaConf.to_container(cfg.eval)}, dir=str(run_dir / "eval"),
                    mode="offline" if cfg.wandb.offline else None) as w:  # fmt: skip
        w.log({f"{r['benchmark']}/{r['metric']}": r["score"] for r in rows})
        w.log({"results": wandb.Table(columns=list(RESULT_COLUMNS), data=[[r[c] for c in RESULT_COLUMNS] for r in rows])})


def results_path(cfg: DictConfig, runs: Sequence[Path]) -> Path:
    """``cfg.results``, or by default ``results.csv`` in the sweep directory that holds the runs (one table per
    study, never a global one that pools unrelated studies)."""
    if cfg.results:
        return Path(cfg.results)
    parents = {run.parent for run in runs}
    if len(parents) > 1:
        raise ValueError(f"the runs lie in {len(parents)} sweep directories; name the results table: results=PATH.csv")
    return parents.pop() / "results.csv"


def evaluate(cfg: DictConfig) -> list[dict[str, Any]]:
    """Evaluate every run matching ``cfg.run_dir`` (a run directory or a glob over a sweep; with ``num_shards``
    > 1 only every ``num_shards``-th run from ``shard``) and append the rows to the results table
    (:func:`results_path`). Raises after all runs if any run or benchmark failed (their rows stay)."""
    matches = {Path(p).resolve() for p in glob.glob(str(cfg.run_dir))}  # resolved: a linked run counts once
    runs = sorted(p for p in matches if (p / "hf_model" / "plwlab.json").exists())
    if not runs:
        raise FileNotFoundError(f"no finished training run (with hf_model/plwlab.json) matches {cfg.run_dir}")
    if not 0 <= cfg.shard < cfg.num_shards:
        raise ValueError(f"shard must be in [0, num_shards={cfg.num_shards}), got {cfg.shard}")
    results = results_path(cfg, runs)
    read_results(results)  # a malformed table is an error now, not after hours of evaluation
    runs = runs[cfg.shard :: cfg.num_shards]
    judges: dict[str, PairwiseJudge] = {}
    rows: list[dict[str, Any]] = []
    failed = []
    for i, run_dir in enumerate(runs):
        log.info("[%d/%d] evaluating %s", i + 1, len(runs), run_dir)
        try:
            run_rows, failures = evaluate_run(cfg, run_dir, judges, results)
        except Exception as e:  # one broken run must not stop a sweep's evaluation; reported at the end
            if len(runs) == 1:
                raise
            log.exception("evaluating %s failed", run_dir)
            failed.append(f"{run_dir.name} ({type(e).__name__}: {e})")
            continue
        rows += run_rows
        failed += [f"{run_dir.name} {failure}" for failure in failures]
    log.info("%d rows for %d runs written to %s", len(rows), len(runs), results)
    if failed:
        raise RuntimeError(f"{len(failed)} evaluations failed (the others' rows are in {results}): " + "; ".join(failed))
    return rows
