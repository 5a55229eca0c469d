"""Memorization: corpus BLEU of a run's greedy generations on prompts of its own training examples against their
training completions (the paper's Fig. 2 mechanism)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sacrebleu
from omegaconf import OmegaConf

from plwlab.data.datamodule import InstructionDataModule
from plwlab.evaluation.runs import LoadedRun, example_prompt, run_complete
from plwlab.rundir import RunDir


def memorization_bleu(
    run: LoadedRun, examples: Sequence[Any], n: int = 10_000, seed: int = 42, max_new_tokens: int = 256,
    journal: Path | None = None,
) -> tuple[float, str, int]:  # fmt: skip
    """Corpus BLEU of the run engine's greedy generations for ``n`` prompts sampled from the training ``examples``
    against their training completions (sacreBLEU, 13a tokenization, exponential smoothing; a conversation: its last
    assistant turn from the turns before it). Returns (score, signature, n used). ``journal``: where the
    generations are kept as they arrive (an interrupted evaluation resumes from it)."""
    sample = random.Random(seed).sample(list(examples), min(n, len(examples)))
    prompts, references = zip(*(example_prompt(run, e) for e in sample))
    hypotheses = [c.text for c in run_complete(run, prompts, max_new_tokens, "memorization", journal)]
    bleu = sacrebleu.metrics.BLEU(tokenize="13a", smooth_method="exp")
    score = bleu.corpus_score(hypotheses, [list(references)])
    return score.score, str(bleu.get_signature()), len(sample)


def training_records(run_dir: Path, tokenizer: Any) -> list[Any]:
    """The examples a run trained on (records, or conversations for chat data), validation split excluded, as its
    data module selects them (:attr:`plwlab.data.datamodule.InstructionDataModule.train_examples`) from the run's
    ``config.yaml``: its data source or built variant, limit, invalid/empty-completion handling and seeded split."""
    cfg = RunDir(run_dir).train_config()
    # runs older than data.empty_output never kept an empty output
    data = {"empty_output": "skip", **OmegaConf.to_container(cfg.data, resolve=True)}
    datamodule = InstructionDataModule(tokenizer, seed=cfg.seed, **data)
    datamodule.setup()
    return datamodule.train_examples
