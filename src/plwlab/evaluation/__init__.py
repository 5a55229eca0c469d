"""Evaluation of trained runs into the results table: the run loaded and prompted as it was trained
(:mod:`~plwlab.evaluation.runs`), the engines that generate (:mod:`~plwlab.evaluation.engines`: HF in process,
a served model, vLLM; :mod:`~plwlab.evaluation.generation`) and cached responses
(:mod:`~plwlab.evaluation.responses`), memorization BLEU (:mod:`~plwlab.evaluation.memorization`), the lm-eval
harness tasks (:mod:`~plwlab.evaluation.harness`; shared contexts computed once:
:mod:`~plwlab.evaluation.shared_prefix`; TruthfulQA-gen's scoring: :mod:`~plwlab.evaluation.truthfulqa`), pairwise judges (:mod:`~plwlab.evaluation.judges`), and the
orchestrator (:mod:`~plwlab.evaluation.evaluate`; ``evaluate.py`` calls :mod:`~plwlab.evaluation.main`)."""
