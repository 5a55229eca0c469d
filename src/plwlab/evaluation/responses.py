"""A run's greedy responses to an instruction set (AlpacaEval's, PandaLM's), cached in its run directory, and the
reference responses a judge compares them with (a file, or another run's responses)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from plwlab.evaluation.runs import LoadedRun, instruction_prompt, load_run, run_complete
from plwlab.files import atomic_write
from plwlab.rundir import RunDir

log = logging.getLogger(__name__)


def read_instructions(path: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    """Instruction records (``instruction`` and ``input``, "" if absent) from a JSON list, e.g. the AlpacaEval
    outputs files or PandaLM's ``testset-inference-v1.json``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"instruction set {path} not found (set PLWLAB_DATA or point the eval config at it)")
    records = json.loads(path.read_text())
    return [{"instruction": r["instruction"], "input": r.get("input") or ""} for r in records][:limit]


def responses(run: LoadedRun, run_dir: Path, name: str, records: Sequence[dict[str, str]],
              max_new_tokens: int) -> list[dict[str, Any]]:  # fmt: skip
    """The run's greedy responses to ``records`` (prompted as it was trained:
    :func:`plwlab.evaluation.runs.instruction_prompt`) by its engine, as AlpacaEval-style records (instruction,
    input, output, generator, length in tokens). Cached in ``<run_dir>/eval/generations/<name>.json`` and reused
    while what determines them is the same: the instructions, ``max_new_tokens``, the engine (for ``hf``: the dtype
    the model ran in and its weight files; for a server: its URL and the served name). While they are generated,
    each arrives in a journal beside the cache, which a rerun resumes from."""
    run_files = RunDir(run_dir)
    cache = run_files.generations_file(name)
    engine = run.engine.identity
    if cache.exists():
        cached = json.loads(cache.read_text())
        key = ("instruction", "input", "max_new_tokens", "engine")
        same = [tuple(r.get(k) for k in key) for r in cached]
        if same == [(r["instruction"], r["input"], max_new_tokens, engine) for r in records]:
            log.info("%s: reusing %d %s responses from %s", run.run_id, len(cached), name, cache)
            return cached
    journal = run_files.journal_file(cache)
    done = run_complete(run, [instruction_prompt(run, r["instruction"], r["input"]) for r in records], max_new_tokens,
                        f"{name} responses", journal)  # fmt: skip
    out = [{"instruction": r["instruction"], "input": r["input"], "output": c.text.strip(), "generator": run.run_id,
            "length": c.tokens, "max_new_tokens": max_new_tokens, "engine": engine, "weights": run.weights}
           for r, c in zip(records, done)]  # fmt: skip
    with atomic_write(cache) as tmp:
        tmp.write_text(json.dumps(out, indent=1, ensure_ascii=False))
    journal.unlink(missing_ok=True)
    return out


def reference_outputs(reference: str, records: Sequence[dict[str, Any]], generations: str, max_new_tokens: int,
                      cfg: DictConfig) -> list[str]:  # fmt: skip
    """Reference responses aligned with ``records``: from a JSON list (instruction, input, output; e.g. AlpacaEval's
    text_davinci_003 outputs) or from another training run (a run directory), whose responses are generated and
    cached there first if they are not yet."""
    path = Path(reference)
    if path.is_dir():
        cache = RunDir(path).generations_file(generations)
        if not cache.exists():
            log.info("generating the reference responses of %s", path)
            other = load_run(path, cfg.dtype, cfg.device, cfg.get("engine"), cfg.batch_size)
            responses(other, path, generations, records, max_new_tokens)
        path = cache
    if not path.exists():
        raise FileNotFoundError(f"reference responses {path} not found")
    by_prompt = {(r["instruction"], r.get("input") or ""): r["output"] for r in json.loads(path.read_text())}
    missing = [r["instruction"] for r in records if (r["instruction"], r["input"]) not in by_prompt]
    if missing:
        raise ValueError(f"{path} has no reference for {len(missing)} of {len(records)} instructions, e.g. {missing[0]!r}")
    return [by_prompt[(r["instruction"], r["input"])] for r in records]
