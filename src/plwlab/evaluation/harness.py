"""The paper's lm-eval-harness benchmarks, from the hub or from local files, run on an in-memory model.

Every benchmark becomes one lm-eval task YAML in a task folder. The multiple-choice tasks and TruthfulQA-gen
``include`` lm-eval's own task file (its prompts, few-shot handling and scoring are used unchanged); with
``data`` set, only the dataset is swapped for a JSONL file converted from the official release files (for
offline clusters). The WMT tasks are the paper's own: zero-shot, "Translate the following from <src_lang> to
<tgt_lang>" as the instruction of the Alpaca template with the source sentence as its input, validation and
test sets combined, scored by lm-eval's sacreBLEU metrics (bleu, chrf, ter).

======================  =======================================================================================
benchmark               local ``data`` (official release files; a JSONL already in the HF schema also works)
======================  =======================================================================================
arc_challenge           ``ARC-Challenge-Test.jsonl`` (``question.stem``, ``question.choices``, ``answerKey``)
piqa                    folder with ``valid.jsonl`` + ``valid-labels.lst``
winogrande              folder with ``dev.jsonl`` + ``dev-labels.lst``
truthfulqa_mc2          ``mc_task.json`` (answers → 0/1 dicts; the 2021-10 release is the classic one)
truthfulqa_gen          ``TruthfulQA.csv``
wmt14_en_fr ... (six)   JSON/JSONL of ``{"translation": {"en": ..., "fr": ...}}``, or a folder with
                        ``validation.jsonl`` and ``test.jsonl``; without ``data``, ``datasets`` loads the hub
                        split ``validation+test``
======================  =======================================================================================

Few-shot examples come from the training split on the hub; locally from ``fewshot_data`` or, if that is not
given, from the evaluation file itself (lm-eval never shows an item as its own example), which is logged.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from plwlab.data.alpaca import alpaca_prompt

log = logging.getLogger(__name__)
Record = dict[str, Any]


def _json_records(path: Path) -> list[Record]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def _with_labels(folder: Path, docs_file: str, labels_file: str) -> list[tuple[Record, str]]:
    docs = _json_records(folder / docs_file)
    labels = (folder / labels_file).read_text().split()
    if len(docs) != len(labels):
        raise ValueError(f"{folder}: {len(docs)} questions but {len(labels)} labels")
    return list(zip(docs, labels))


def read_piqa(path: Path) -> list[Record]:
    """PIQA as lm-eval sees it: goal, sol1, sol2, label (0/1)."""
    if path.is_file():
        return _json_records(path)
    return [{**d, "label": int(y)} for d, y in _with_labels(path, "valid.jsonl", "valid-labels.lst")]


def read_winogrande(path: Path) -> list[Record]:
    """WinoGrande as lm-eval sees it: sentence, option1, option2, answer ("1"/"2")."""
    if path.is_file():
        return [{**d, "answer": str(d["answer"])} for d in _json_records(path)]
    out = []
    for doc, label in _with_labels(path, "dev.jsonl", "dev-labels.lst"):
        if "answer" in doc and str(doc["answer"]) != label:
            raise ValueError(f"{path}: {doc.get('qID')} has answer {doc['answer']} but label {label}")
        out.append({**doc, "answer": label})
    return out


def read_arc(path: Path) -> list[Record]:
    """ARC as on the hub: id, question, choices {text, label}, answerKey (official nested format converted)."""
    out = []
    for d in _json_records(path):
        if isinstance(d["question"], dict):  # official release: the choices live inside the question
            choices = d["question"]["choices"]
            d = {"id": d["id"], "question": d["question"]["stem"], "answerKey": d["answerKey"],
                 "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}}  # fmt: skip
        out.append(d)
    return out


def read_truthfulqa_mc(path: Path) -> list[Record]:
    """TruthfulQA multiple_choice as on the hub: question, mc1_targets / mc2_targets {choices, labels}."""
    def targets(t: Mapping[str, Any]) -> Record:
        return dict(t) if "choices" in t else {"choices": list(t), "labels": [int(v) for v in t.values()]}

    return [{"question": d["question"], "mc1_targets": targets(d["mc1_targets"]), "mc2_targets": targets(d["mc2_targets"])}
            for d in _json_records(path)]  # fmt: skip


def read_truthfulqa_gen(path: Path) -> list[Record]:
    """TruthfulQA generation as on the hub, from the official CSV (answer lists split at ';')."""
    if path.suffix != ".csv":
        return _json_records(path)

    def split(answers: str) -> list[str]:
        return [a.strip() for a in answers.split(";") if a.strip()]

    with path.open(encoding="utf-8-sig", newline="") as f:
        return [{"type": r["Type"], "category": r["Category"], "question": r["Question"], "best_answer": r["Best Answer"],
                 "correct_answers": split(r["Correct Answers"]), "incorrect_answers": split(r["Incorrect Answers"]),
                 "source": r.get("Source", "")} for r in csv.DictReader(f)]  # fmt: skip


# benchmark -> (lm-eval task file it builds on, reader of local files)
LM_EVAL_TASKS: dict[str, tuple[str, Callable[[Path], list[Record]]]] = {
    "arc_challenge": ("arc/arc_challenge.yaml", read_arc),
    "piqa": ("piqa/piqa.yaml", read_piqa),
    "winogrande": ("winogrande/default.yaml", read_winogrande),
    "truthfulqa_mc2": ("truthfulqa/truthfulqa_mc2.yaml", read_truthfulqa_mc),
    "truthfulqa_gen": ("truthfulqa/truthfulqa_gen.yaml", read_truthfulqa_gen),
}
LANGUAGES = {"en": "English", "fr": "French", "de": "German", "ro": "Romanian"}
# benchmark -> (hub dataset, its config, source language, target language)
WMT_TASKS = {
    f"{year}_{src}_{tgt}": (f"wmt/{year}", f"{pair}-en", src, tgt)
    for year, pair in (("wmt14", "fr"), ("wmt16", "de"), ("wmt16", "ro"))
    for src, tgt in (("en", pair), (pair, "en"))
}
BENCHMARKS = (*LM_EVAL_TASKS, *WMT_TASKS)


def translation_instruction(src: str, tgt: str) -> str:
    """The paper's translation instruction."""
    return f"Translate the following from {LANGUAGES[src]} to {LANGUAGES[tgt]}"


def read_wmt(path: Path | None, dataset: str, config: str) -> list[Record]:
    """Validation + test pairs (``{"translation": {lang: text}}``) from a local file or folder, or the hub."""
    if path is None:
        from datasets import load_dataset  # the hub's WMT sets only: `datasets` is slow to import

        return list(load_dataset(dataset, config, split="validation+test"))
    if path.is_dir():
        return [r for split in ("validation", "test") for r in _json_records(path / f"{split}.jsonl")]
    return _json_records(path)


def _write_jsonl(path: Path, records: Sequence[Record]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def prepare_task(benchmark: str, task_dir: str | Path, num_fewshot: int = 0, data: str | None = None,
                 fewshot_data: str | None = None, max_gen_toks: int = 256) -> str:  # fmt: skip
    """Write the lm-eval task YAML (and converted data) for ``benchmark`` into ``task_dir``; returns the task name
    (the benchmark name). ``data``/``fewshot_data``: local files instead of the hub (see the module docstring)."""
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    for path in (data, fewshot_data):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{benchmark}: local data {path} not found (set it to null to load the hub copy)")
    if benchmark in WMT_TASKS:
        dataset, config, src, tgt = WMT_TASKS[benchmark]
        pairs = read_wmt(Path(data) if data else None, dataset, config)
        rows = [{"source": p["translation"][src], "reference": p["translation"][tgt]} for p in pairs]
        cfg: Record = {
            "task": benchmark, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"eval": _write_jsonl(task_dir / f"{benchmark}.jsonl", rows)}},
            "output_type": "generate_until", "validation_split": "eval", "num_fewshot": num_fewshot,
            "doc_to_text": alpaca_prompt(translation_instruction(src, tgt), "{{source}}"), "doc_to_target": "{{reference}}",
            "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": max_gen_toks},
            "metric_list": [{"metric": m, "aggregation": m, "higher_is_better": m != "ter"} for m in ("bleu", "chrf", "ter")],
            "metadata": {"version": 1.0},
        }  # fmt: skip
    elif benchmark in LM_EVAL_TASKS:
        from lm_eval import tasks as lm_eval_tasks  # lm-eval takes seconds to import: only when a task runs

        base, reader = LM_EVAL_TASKS[benchmark]
        cfg = {"include": str(Path(lm_eval_tasks.__file__).parent / base), "task": benchmark, "num_fewshot": num_fewshot}
        if data:
            files = {"eval": _write_jsonl(task_dir / f"{benchmark}.jsonl", reader(Path(data)))}
            if fewshot_data:
                files["fewshot"] = _write_jsonl(task_dir / f"{benchmark}.fewshot.jsonl", reader(Path(fewshot_data)))
            elif num_fewshot:
                log.warning("%s: %d-shot examples are drawn from the evaluation file (no fewshot_data given)",
                            benchmark, num_fewshot)  # fmt: skip
            cfg |= {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files},
                    "training_split": None, "validation_split": None, "test_split": "eval",  # lm-eval keeps an item out
                    "fewshot_split": "fewshot" if fewshot_data else "eval"}  # of its own shots only when fewshot = test split
    else:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
    if benchmark == "truthfulqa_gen":  # lm-eval's scoring without its per-pair bootstrap (plwlab.evaluation.truthfulqa)
        (task_dir / "plwlab_truthfulqa.py").write_text("from plwlab.evaluation.truthfulqa import process_results_gen  # noqa: F401\n")
        text += "process_results: !function plwlab_truthfulqa.process_results_gen\n"
    (task_dir / f"{benchmark}.yaml").write_text(text)
    return benchmark


class _InMemoryModelNotice(logging.Filter):
    """Drops lm-eval's two warnings about being handed a model object, which plwlab always does on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("`pretrained` model kwarg is not of type", "Passed an already-initialized model"))


def harness_model(run: Any, engine: Any = None, batch_size: int | str = 8, device: str = "cpu", dtype: str = "float32",
                  add_bos_token: bool | None = None) -> Any:  # fmt: skip
    """The lm-eval model that scores ``run`` (a :class:`plwlab.evaluation.runs.LoadedRun`) on the engine of
    ``engine`` (:class:`plwlab.config.EngineConfig`; None: ``hf``): ``hf``: lm-eval's ``HFLM`` on the in-memory model,
    each shared context computed once (:class:`plwlab.evaluation.shared_prefix.SharedPrefixHFLM`);
    ``openai``: lm-eval's ``local-completions`` on the same server and served name as the run's generations (token
    ids sent, the run's own tokenizer; loglikelihood needs prompt logprobs with ``echo``, as vLLM's server gives);
    ``vllm``: lm-eval's ``vllm`` model on the run's export.

    ``add_bos_token``: whether every context starts with BOS. ``None`` is the installed lm-eval's default: from
    v0.4.9.2 on it lets the tokenizer add BOS; the versions the paper ran (commits b281b09, b93c3bc) encoded
    contexts without special tokens, which ``False`` reproduces.
    """
    name = engine.name if engine is not None else "hf"
    if name == "openai":
        from lm_eval.models.openai_completions import LocalCompletionsAPI  # lm-eval: only when a task runs

        return LocalCompletionsAPI(base_url=f"{run.engine.base_url}/completions", model=run.engine.model,
                                   tokenizer=str(run.hf_model), tokenizer_backend="huggingface",
                                   tokenized_requests=True, num_concurrent=engine.concurrency,
                                   max_retries=max(engine.max_retries, 1), timeout=int(engine.timeout_s),
                                   add_bos_token=bool(add_bos_token), batch_size=1)  # fmt: skip
    if name == "vllm":
        from lm_eval.models.vllm_causallms import VLLM

        return VLLM(pretrained=str(run.hf_model), dtype=dtype, tensor_parallel_size=engine.tensor_parallel_size,
                    data_parallel_size=engine.data_parallel_size, gpu_memory_utilization=engine.gpu_memory_utilization,
                    max_model_len=engine.max_model_len, batch_size="auto", add_bos_token=add_bos_token,
                    enforce_eager=engine.enforce_eager)  # fmt: skip
    from plwlab.evaluation.shared_prefix import SharedPrefixHFLM  # imports lm-eval: only when a task runs

    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    if not any(isinstance(f, _InMemoryModelNotice) for f in hf_logger.filters):
        hf_logger.addFilter(_InMemoryModelNotice())
    if batch_size == "auto":  # lm-eval's own search on a GPU; on a CPU its probe (64 sequences of the longest
        batch_size = "auto" if device.startswith("cuda") else 8  # request) takes minutes: lm-eval's usual 8 there
    return SharedPrefixHFLM(pretrained=run.model, tokenizer=run.tokenizer, batch_size=batch_size, device=device,
                            add_bos_token=add_bos_token)


def run_lm_eval(lm: Any, tasks: Sequence[str], task_dir: str | Path, limit: int | None = None,
                ) -> list[tuple[str, str, float, float | None, int]]:  # fmt: skip
    """lm-eval-harness with the lm-eval model ``lm`` (:func:`harness_model`) on the prepared ``tasks`` (YAMLs in
    ``task_dir``). Returns (benchmark, metric, score, stderr, n) per metric."""
    from lm_eval import simple_evaluate  # lm-eval takes seconds to import: only when a task runs
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task INFO lines drown what a user needs
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager, bootstrap_iters=1000,
                          random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=1234)  # fmt: skip
    rows = []
    for task, metrics in out["results"].items():
        n = out["n-samples"][task]["effective"]
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            if metric in ("alias", "sample_len") or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{_filter}")
            rows.append((task, metric, float(value), float(stderr) if isinstance(stderr, (int, float)) else None, n))
    return rows
