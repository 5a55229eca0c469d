"""Evaluation of trained runs into the results table (``python evaluate.py run_dir=... eval=paper``).

Per run, as ``cfg.eval`` asks: memorization BLEU on training prompts (:mod:`plwlab.evaluation.memorization`);
greedy responses on the AlpacaEval and PandaLM instruction sets (:mod:`plwlab.evaluation.responses`) and their
lengths; lm-eval-harness benchmarks (:mod:`plwlab.evaluation.harness`); pairwise judges against reference
responses (:mod:`plwlab.evaluation.judges`). Completions come from the engine of ``cfg.engine`` (the run's model in
this process, a served model or vLLM: :mod:`plwlab.evaluation.engines`); every server named is checked before any
work (:func:`check_servers`).

Rows (:mod:`plwlab.results`) are written as each benchmark finishes; a failing benchmark is logged, recorded in
``<run>/eval/status.json`` and makes the exit code non-zero, and the other benchmarks' rows stay.
"""

from __future__ import annotations

import glob
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from plwlab.config import typed_suite, validate_evaluate
from plwlab.evaluation.engines import OpenAIEngine, served_name
from plwlab.evaluation.harness import harness_model, prepare_task, run_lm_eval
from plwlab.evaluation.judges import PairwiseJudge, alpaca_eval_package
from plwlab.evaluation.memorization import memorization_bleu, training_records
from plwlab.evaluation.responses import read_instructions, reference_outputs, responses
from plwlab.evaluation.runs import LoadedRun, load_run
from plwlab.evaluation.scoreboard import score_table
from plwlab.evaluation.verdicts import first_position_rate, win_rate, win_tie_lose
from plwlab.files import atomic_write
from plwlab.results import COLUMNS, append_results, check_results_path, default_path, metric_key
from plwlab.rundir import RunDir

log = logging.getLogger(__name__)


def result_row(run: LoadedRun, benchmark: str, metric: str, score: float, stderr: float | None, n: int) -> dict[str, Any]:
    """One row of the results table (:data:`plwlab.results.COLUMNS`) for ``run``."""
    meta = run.meta
    return {"run_id": run.run_id, "model": meta.get("model"), "dataset": meta.get("dataset"), "plw": meta.get("plw"),
            "rg": meta.get("rg"), "benchmark": benchmark, "metric": metric, "score": score, "stderr": stderr, "n": n,
            "config_digest": run.config_digest, "train_steps": run.train_steps,
            "data_sha256": meta.get("data_sha256")}  # fmt: skip


def judge_rows(run: LoadedRun, run_dir: Path, name: str, spec: DictConfig, outputs: list[dict[str, Any]],
               reference: list[str], judges: dict[str, PairwiseJudge], cfg: DictConfig,
               results: Path) -> list[dict[str, Any]]:  # fmt: skip
    """Win rate of the run's ``outputs`` against ``reference`` by the judge of ``spec``, the count of verdicts
    that could not be parsed and the judge's first-position rate; the verdicts are kept in
    ``<run>/eval/judgements/<name>.json``."""
    if spec.backend == "alpaca_eval":
        refs = [{**o, "output": ref, "generator": "reference"} for o, ref in zip(outputs, reference)]
        score, stderr, n = alpaca_eval_package(outputs, refs, spec.annotators_config,
                                               str(results.parent / "alpaca_eval" / run.run_id), spec.base_url,
                                               spec.served_model or spec.model, spec.concurrency)  # fmt: skip
        return [result_row(run, name, "win_rate", score, stderr, n)]
    decoding = spec.get("decoding")
    kwargs = {"style": spec.style, "mode": spec.mode, "max_new_tokens": spec.get("max_new_tokens"),
              "batch_size": cfg.batch_size, "seed": spec.get("order_seed", 0),
              "decoding": None if decoding is None else OmegaConf.to_container(decoding)}  # fmt: skip
    if spec.model == "self":  # the evaluated model judges itself: checks the pipeline, not a real judge
        judge = PairwiseJudge(run.model, run.tokenizer, engine=run.engine, **kwargs)
    else:
        key = json.dumps([spec.model, spec.backend, spec.get("base_url"), kwargs], sort_keys=True)
        if key not in judges:  # loaded (or connected to) once for all runs
            judges[key] = make_judge(spec, cfg, kwargs)
        judge = judges[key]
    judgements = RunDir(run_dir).judgements_file(name)
    journal = RunDir(run_dir).journal_file(judgements)
    verdicts = judge.compare([o["instruction"] for o in outputs], [o["input"] for o in outputs], reference,
                             [o["output"] for o in outputs], spec.randomize_order, journal)  # fmt: skip
    score, stderr, n = win_rate([v.preference for v in verdicts])
    invalid = len(verdicts) - n
    if invalid:
        log.warning("%s %s: %d of %d judge verdicts could not be parsed, e.g. %r", run.run_id, name, invalid,
                    len(verdicts), next(v.raw for v in verdicts if v.preference is None)[:200])  # fmt: skip
    with atomic_write(judgements) as tmp:
        tmp.write_text(json.dumps([{"instruction": o["instruction"], "input": o["input"], "preference": v.preference,
                                    "shown": v.shown, "raw": v.raw} for o, v in zip(outputs, verdicts)], indent=1))
    journal.unlink(missing_ok=True)
    first, decisive = first_position_rate(verdicts)
    rows = [result_row(run, name, "win_rate", score, stderr, n),
            result_row(run, name, "unparsed_verdicts", float(invalid), None, len(verdicts)),
            result_row(run, name, "first_position_rate", first, None, decisive)]  # fmt: skip
    if spec.style == "pandalm":  # PandaLM reports win / tie / lose counts beside the rate
        counts = win_tie_lose([v.preference for v in verdicts])
        rows += [result_row(run, name, metric, float(c), None, n) for metric, c in zip(("wins", "ties", "losses"), counts)]
    return rows


def make_judge(spec: DictConfig, cfg: DictConfig, kwargs: dict[str, Any]) -> PairwiseJudge:
    """The judge of ``spec`` (an ``eval.judges`` entry): its model loaded here (``backend=local``) or the server
    that serves it (``backend=openai``, checked to answer and to serve it)."""
    if spec.backend == "openai":
        return PairwiseJudge.served(spec.model, spec.base_url, spec.get("served_model"), spec.concurrency,
                                    spec.timeout_s, spec.max_retries, spec.api_key_env, **kwargs)  # fmt: skip
    dtype, device = spec.get("dtype") or cfg.dtype, spec.get("device") or cfg.device
    return PairwiseJudge.from_pretrained(spec.model, dtype, device, **kwargs)


def evaluate_run(
    cfg: DictConfig, run_dir: Path, judges: dict[str, PairwiseJudge], results: Path
) -> tuple[list[dict[str, Any]], list[str]]:
    """The evaluations of ``cfg.eval`` for one run. Each benchmark's rows go into ``results`` as soon as they are
    done; a benchmark that fails is logged and recorded in ``<run_dir>/eval/status.json`` and the others go on.
    Returns the rows and the failures ("benchmark: error")."""
    run = load_run(run_dir, cfg.dtype, cfg.device, cfg.engine, cfg.batch_size)
    ev = typed_suite(cfg.eval)  # every key, defaults included
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
            journal = RunDir(run_dir).journal_file(RunDir(run_dir).generations_file("memorization"))
            score, signature, n = memorization_bleu(run, records, mem.n, cfg.seed, mem.max_new_tokens, journal)
            journal.unlink(missing_ok=True)
            log.info("%s memorization BLEU %.2f over %d prompts [%s]", run.run_id, score, n, signature)
            return [result_row(run, "memorization", "bleu", score, None, n)]

        step("memorization", memorization)
    for name, spec in (ev.get("generations") or {}).items():

        def generation(name: str = name, spec: DictConfig = spec) -> list[dict[str, Any]]:
            outputs = responses(run, run_dir, name, read_instructions(spec.instructions, spec.limit), spec.max_new_tokens)
            lengths = torch.tensor([o["length"] for o in outputs], dtype=torch.float64)
            stderr = float(lengths.std() / len(lengths) ** 0.5) if len(lengths) > 1 else None
            generated[name] = outputs
            return [result_row(run, name, "generation_length", float(lengths.mean()), stderr, len(lengths))]

        step(f"{name} generations", generation)
    harness: dict[str, Any] = {}
    if ev.get("lm_eval") and ev.lm_eval.tasks:
        harness = {"lm_eval_version": version("lm_eval"), "add_bos_token": ev.lm_eval.get("add_bos_token")}
        task_dir = RunDir(run_dir).eval_dir / "lm_eval_tasks"
        models: dict[str, Any] = {}
        for benchmark, t in ev.lm_eval.tasks.items():

            def lm_eval(benchmark: str = benchmark, t: DictConfig = t) -> list[dict[str, Any]]:
                task = prepare_task(benchmark, task_dir, t.num_fewshot, t.get("data"), t.get("fewshot_data"),
                                    ev.lm_eval.max_gen_toks)  # fmt: skip
                limit = ev.lm_eval.limit if t.limit is None else t.limit  # a task's own subset, else the preset's
                if "lm" not in models:  # one lm-eval model for all of the run's tasks
                    models["lm"] = harness_model(run, cfg.engine, cfg.batch_size, cfg.device, cfg.dtype,
                                                 ev.lm_eval.get("add_bos_token"))  # fmt: skip
                return [result_row(run, b, m, score, stderr, n) for b, m, score, stderr, n in
                        run_lm_eval(models["lm"], [task], task_dir, limit)]  # fmt: skip

            step(benchmark, lm_eval)
    for name, spec in (ev.get("judges") or {}).items():
        if spec.reference is None:
            log.warning("%s: judge %s skipped: no reference (set eval.judges.%s.reference)", run.run_id, name, name)
            continue

        def judge(name: str = name, spec: DictConfig = spec) -> list[dict[str, Any]]:
            if spec.generations not in generated:
                raise RuntimeError(f"its responses ({spec.generations}) could not be generated")
            outputs = generated[spec.generations]
            max_new_tokens = ev.generations[spec.generations].max_new_tokens
            reference = reference_outputs(spec.reference, outputs, spec.generations, max_new_tokens, cfg)
            return judge_rows(run, run_dir, name, spec, outputs, reference, judges, cfg, results)

        step(name, judge)
    with atomic_write(RunDir(run_dir).eval_status_file) as tmp:
        tmp.write_text(json.dumps({"run_id": run.run_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                   **({"harness": harness} if harness else {}), **status}, indent=2))
    if cfg.wandb.enabled and rows:
        log_to_wandb(cfg, run_dir, rows, generated)
    return rows, [f"{name}: {state[len('failed: '):]}" for name, state in status.items() if state != "ok"]


GENERATION_COLUMNS = ("instruction", "input", "response", "length", "plw", "dataset")  # a generations table's


def log_to_wandb(cfg: DictConfig, run_dir: Path, rows: Sequence[dict[str, Any]],
                 generated: dict[str, list[dict[str, Any]]]) -> None:  # fmt: skip
    """One W&B run (job_type eval, in the training run's group unless ``wandb.group`` is set; its id
    :attr:`RunDir.wandb_eval_id`, so that evaluating again continues it) per evaluated run: the training run's
    config (dataset, Rg, PLW, ... and run_id), its scores as metrics (``<benchmark>/<metric>``,
    :func:`plwlab.results.metric_key`) and summary, the rows as the table ``results`` and each instruction set's
    responses as the table ``generations/<name>``."""
    import wandb  # imported only when W&B logging is on

    run = RunDir(run_dir)
    meta = run.export_meta()
    group = cfg.wandb.group or run.name  # default: the training runs' group (their sweep name)
    config = {**meta, "run_id": run.run_id, "sweep": run.name, "eval": OmegaConf.to_container(cfg.eval)}
    with wandb.init(project=cfg.wandb.project, group=group, name=f"{run.run_id}-eval", job_type="eval",
                    id=run.wandb_eval_id, resume="allow", config=config, dir=str(run.eval_dir),
                    mode="offline" if cfg.wandb.offline else None) as w:  # fmt: skip
        scores = {metric_key(r["benchmark"], r["metric"]): r["score"] for r in rows}
        w.log(scores)
        w.summary.update(scores)
        w.log({"results": wandb.Table(columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in rows])})
        for name, outputs in generated.items():
            data = [[o["instruction"], o["input"], o["output"], o["length"], meta.get("plw"), meta.get("dataset")]
                    for o in outputs]  # fmt: skip
            w.log({f"generations/{name}": wandb.Table(columns=list(GENERATION_COLUMNS), data=data)})


def check_servers(cfg: DictConfig, runs: Sequence[Path]) -> None:
    """Before any work: every server the config names answers and serves what it is asked for (each run's model
    with ``engine=openai``, each ``backend=openai`` judge); a fixed ``engine.model`` is refused for several runs
    (they would all be answered by one model)."""
    if cfg.engine.name == "openai":
        model = cfg.engine.model
        if model is not None and "{run_name}" not in model and len(runs) > 1:
            raise ValueError(f"engine.model={model} would answer for all {len(runs)} runs; leave it null (each run's "
                             "hf_model path, the name `vllm serve <run>/hf_model` gives it) or put {run_name} in it")  # fmt: skip
        served = OpenAIEngine(None, cfg.engine.base_url, "", max_retries=1).served_models()
        names = [served_name(model, RunDir(r).hf_model) for r in runs]
        missing = [n for n in names if n not in served]
        if missing:
            raise ValueError(f"the server at {cfg.engine.base_url} does not serve {missing[0]!r} ({len(missing)} of "
                             f"{len(runs)} runs' models missing); it serves {served}")  # fmt: skip
    for spec in typed_suite(cfg.eval).judges.values():
        if spec.backend == "openai" and spec.reference is not None and spec.model != "self":
            OpenAIEngine(None, spec.base_url, spec.get("served_model") or spec.model, max_retries=1).check()


def evaluate(cfg: DictConfig) -> list[dict[str, Any]]:
    """Evaluate every run matching ``cfg.run_dir`` (a run directory or a glob over a sweep, or a list of them; with
    ``num_shards`` > 1 only every ``num_shards``-th run from ``shard``) and append the rows to the results table (``cfg.results``,
    or :func:`plwlab.results.default_path`, checked writable first). A run whose training has not finished
    (``status.json``) is not evaluated. Raises after all runs if any run was not evaluated or a benchmark failed (the
    others' rows stay)."""
    validate_evaluate(cfg)  # before any run is read
    patterns = list(cfg.run_dir) if OmegaConf.is_list(cfg.run_dir) else [str(cfg.run_dir)]
    matches = {Path(p).resolve() for pattern in patterns for p in glob.glob(pattern)}  # resolved: a link counts once
    runs = sorted(p for p in matches if RunDir(p).is_exported)
    if not runs:
        raise FileNotFoundError(f"no finished training run (with hf_model/plwlab.json) matches {cfg.run_dir}")
    unfinished = [p for p in runs if not RunDir(p).finished]
    runs = [p for p in runs if p not in unfinished]
    not_done = [f"{p.name} (training {RunDir(p).state}: its hf_model/ may be stale or partial)" for p in unfinished]
    if not runs:
        raise ValueError(f"no run matching {cfg.run_dir} has finished training: {'; '.join(not_done[:3])}; evaluate "
                         "once train.py has finished it")  # fmt: skip
    results = check_results_path(cfg.results or default_path(runs))  # before any work: nothing computed is lost
    runs = runs[cfg.shard :: cfg.num_shards]
    check_servers(cfg, runs)
    judges: dict[str, PairwiseJudge] = {}
    rows: list[dict[str, Any]] = []
    failed = list(not_done)
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
    if rows:
        Console(width=None if sys.stdout.isatty() else 200).print(score_table(rows, f"Primary scores written to {results} (every metric is in the table)"))
    if failed:
        raise RuntimeError(f"{len(failed)} evaluations failed (the others' rows are in {results}): " + "; ".join(failed))
    return rows
