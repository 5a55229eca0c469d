"""TruthfulQA-gen's scoring without its per-pair bootstrap: lm-eval's own ``process_results_gen``, with its ROUGE
helper computing each (reference, completion) score directly.

lm-eval's ``rouge(refs, preds)`` is called with ONE reference and ONE completion per call (about 10 references a
question, 817 questions), and wraps that one score in ``rouge_score``'s ``BootstrapAggregator``: 1,000 resamples of
a single value, whose percentiles are that value. The bootstrap changes nothing and was ~75% of a run's evaluation
on a small model (docs/evaluation.md). Here the score is ``RougeScorer.score(ref, pred)[type].fmeasure * 100``, the
same number (a test compares every metric with lm-eval's on the same completions); BLEU and everything else stay
lm-eval's. The task YAML (:func:`plwlab.evaluation.harness.prepare_task`) points ``process_results`` here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lm_eval.tasks.truthfulqa import utils as lm_eval_truthfulqa
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeLsum")
_scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES))  # lm-eval's: the same types, default options


def rouge(refs: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """lm-eval's ``rouge`` for its one call shape, one reference and one prediction, without the bootstrap."""
    (ref,), (pred,) = refs, preds
    scores = _scorer.score(ref.replace(" . ", ".\n"), pred.replace(" . ", ".\n"))  # lm-eval's _prepare_summary
    return {t: scores[t].fmeasure * 100 for t in ROUGE_TYPES}


def process_results_gen(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """lm-eval's ``process_results_gen`` on ``doc`` and its completion, ROUGE computed by :func:`rouge`."""
    globals_ = lm_eval_truthfulqa.process_results_gen.__globals__  # the helper it calls is looked up here
    original, globals_["rouge"] = globals_["rouge"], rouge
    try:
        return lm_eval_truthfulqa.process_results_gen(doc, results)
    finally:
        globals_["rouge"] = original
