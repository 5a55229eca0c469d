"""lm-eval presets: local official files converted to the hub schema, task YAMLs, prompts lm-eval really builds."""

import json
import logging

import pytest
import yaml
from conftest import SHARED_DATA, tiny_model

from plwlab import ASSETS
from plwlab.data.alpaca import alpaca_prompt
from plwlab.evaluation.harness import (
    BENCHMARKS,
    prepare_task,
    read_arc,
    read_piqa,
    read_truthfulqa_gen,
    read_truthfulqa_mc,
    read_winogrande,
    read_wmt,
    harness_model,
    run_lm_eval,
    translation_instruction,
)  # fmt: skip

SAMPLE = ASSETS / "eval_sample"


def test_the_paper_benchmarks_are_all_there():
    assert set(BENCHMARKS) == {"arc_challenge", "piqa", "winogrande", "truthfulqa_mc2", "truthfulqa_gen", "wmt14_en_fr",
                               "wmt14_fr_en", "wmt16_en_de", "wmt16_de_en", "wmt16_en_ro", "wmt16_ro_en"}  # fmt: skip
    assert translation_instruction("ro", "en") == "Translate the following from Romanian to English"


def test_official_formats_are_converted_to_the_hub_schema(tmp_path):
    piqa = read_piqa(SAMPLE / "piqa")
    assert len(piqa) == 6 and piqa[1] == {"goal": "Dry your hair.", "sol1": "Rub it with a wet towel.",
                                          "sol2": "Rub it with a dry towel.", "label": 1}  # fmt: skip
    wino = read_winogrande(SAMPLE / "winogrande")
    assert [w["answer"] for w in wino] == ["2", "1", "1", "2", "1", "2"]
    arc = read_arc(SAMPLE / "arc" / "ARC-Challenge-Test.jsonl")
    assert arc[4] == {"id": "sample-4", "question": "What force pulls objects toward Earth?", "answerKey": "2",
                      "choices": {"text": ["magnetism", "gravity", "friction"], "label": ["1", "2", "3"]}}  # fmt: skip
    hub_form = tmp_path / "arc_hub.jsonl"
    hub_form.write_text(json.dumps(arc[0]) + "\n")
    assert read_arc(hub_form) == [arc[0]]  # already converted: unchanged
    mc = read_truthfulqa_mc(SAMPLE / "truthfulqa" / "mc_task.json")
    assert mc[0]["mc1_targets"] == {"choices": ["It passes through your digestive system",
                                                "It stays in your stomach for seven years", "You die"], "labels": [1, 0, 0]}  # fmt: skip
    assert mc[0]["mc2_targets"]["labels"] == [1, 1, 0, 0]
    gen = read_truthfulqa_gen(SAMPLE / "truthfulqa" / "TruthfulQA.csv")
    assert gen[1]["correct_answers"] == ["No", "No, it is far too narrow to see from the Moon"]
    assert gen[1]["best_answer"] == "No, it is far too narrow to see from the Moon" and gen[1]["type"] == "Adversarial"
    wmt = read_wmt(SAMPLE / "wmt14_en-fr", "wmt/wmt14", "fr-en")
    assert [p["translation"]["en"][:9] for p in wmt] == ["The cat s", "I would l", "The train", "We are go"]  # val + test


def test_bad_local_files_fail_clearly(tmp_path):
    (bad := tmp_path / "wino").mkdir()
    (bad / "dev.jsonl").write_text('{"qID": "q1", "sentence": "A _ b", "option1": "x", "option2": "y", "answer": "1"}\n')
    (bad / "dev-labels.lst").write_text("2\n")
    with pytest.raises(ValueError, match="q1 has answer 1 but label 2"):
        read_winogrande(bad)
    (bad / "dev-labels.lst").write_text("")
    with pytest.raises(ValueError, match="1 questions but 0 labels"):
        read_winogrande(bad)
    with pytest.raises(FileNotFoundError, match="piqa: local data .*nowhere not found"):
        prepare_task("piqa", tmp_path / "tasks", data=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu'"):
        prepare_task("mmlu", tmp_path / "tasks")


def test_task_yaml_for_the_hub_and_for_local_files(tmp_path):
    prepare_task("arc_challenge", tmp_path, num_fewshot=25)
    hub = yaml.safe_load((tmp_path / "arc_challenge.yaml").read_text())
    assert hub["include"].endswith("lm_eval/tasks/arc/arc_challenge.yaml") and hub["num_fewshot"] == 25
    assert "dataset_path" not in hub  # lm-eval's own hub dataset and splits
    prepare_task("winogrande", tmp_path, num_fewshot=5, data=str(SAMPLE / "winogrande"),
                 fewshot_data=str(SAMPLE / "winogrande"))  # fmt: skip
    local = yaml.safe_load((tmp_path / "winogrande.yaml").read_text())
    assert local["dataset_path"] == "json" and local["dataset_name"] is None and local["fewshot_split"] == "fewshot"
    assert set(local["dataset_kwargs"]["data_files"]) == {"eval", "fewshot"}


def test_wmt_loads_validation_plus_test_from_the_hub(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return [{"translation": {"de": "Hallo Welt.", "en": "Hello world."}}]

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    prepare_task("wmt16_de_en", tmp_path)
    assert calls == [("wmt/wmt16", "de-en", "validation+test")]
    assert json.loads((tmp_path / "wmt16_de_en.jsonl").read_text()) == {"source": "Hallo Welt.", "reference": "Hello world."}


@pytest.fixture(scope="module")
def lm_eval_samples(tmp_path_factory):
    """lm-eval run on every local-file task (bundled samples) with a tiny model, with its logged samples."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_dir = tmp_path_factory.mktemp("tasks")
    tasks = {"arc_challenge": ("arc/ARC-Challenge-Test.jsonl", 2), "piqa": ("piqa", 0),
             "truthfulqa_mc2": ("truthfulqa/mc_task.json", 0), "winogrande": ("winogrande", 2),
             "truthfulqa_gen": ("truthfulqa/TruthfulQA.csv", 0), "wmt14_en_fr": ("wmt14_en-fr", 0)}  # fmt: skip
    for name, (data, shots) in tasks.items():
        prepare_task(name, task_dir, shots, str(SAMPLE / data), max_gen_toks=4)
    tiny = tiny_model()
    lm = HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=4, device="cpu")
    out = simple_evaluate(model=lm, tasks=list(tasks), limit=3, task_manager=TaskManager(include_path=str(task_dir),
                          include_defaults=False), gen_kwargs="max_gen_toks=4", fewshot_random_seed=1234)  # fmt: skip
    return tiny, task_dir, out


def test_lm_eval_builds_the_paper_prompts(lm_eval_samples):
    _, _, out = lm_eval_samples
    samples = out["samples"]
    assert {len(s) for s in samples.values()} == {3}
    wmt = samples["wmt14_en_fr"][0]
    instruction = "Translate the following from English to French"
    assert wmt["arguments"][0][0] == alpaca_prompt(instruction, "The cat sleeps on the sofa.")
    assert wmt["target"] == "Le chat dort sur le canapé."
    for s in samples["winogrande"]:  # 2 shots from the same file, never the item itself
        shots = s["arguments"][0][0].split("\n\n")[:-1]
        own = {s["doc"]["sentence"].replace("_", s["doc"][o]) for o in ("option1", "option2")}
        assert len(shots) == 2 and not own & set(shots)
    for s in samples["arc_challenge"]:
        shots = s["arguments"][0][0].split("\n\n")[:-1]
        assert len(shots) == 2 and not any(s["doc"]["question"] in shot for shot in shots)
        assert s["arguments"][0][0].endswith(f"Question: {s['doc']['question']}\nAnswer:")
    assert samples["arc_challenge"][1]["target"] == 0 and len(samples["arc_challenge"][1]["arguments"]) == 4
    assert len(samples["truthfulqa_mc2"][0]["arguments"]) == 4  # one loglikelihood per mc2 answer


def test_run_lm_eval_rows(lm_eval_samples, caplog):
    tiny, task_dir, reference = lm_eval_samples
    caplog.set_level(logging.INFO)
    rows = run_lm_eval(harness_model(tiny, batch_size=4), ["piqa", "truthfulqa_mc2", "wmt14_en_fr"], task_dir, limit=3)
    by_key = {(b, m): (s, e, n) for b, m, s, e, n in rows}
    assert set(by_key) == {("piqa", "acc"), ("piqa", "acc_norm"), ("truthfulqa_mc2", "acc"), ("wmt14_en_fr", "bleu"),
                           ("wmt14_en_fr", "chrf"), ("wmt14_en_fr", "ter")}  # fmt: skip
    assert by_key["piqa", "acc"][0] == pytest.approx(reference["results"]["piqa"]["acc,none"])
    assert all(n == 3 for *_, n in rows) and 0 <= by_key["truthfulqa_mc2", "acc"][0] <= 1
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval") and r.levelno < logging.WARNING]


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data not present")
def test_real_benchmark_files_convert():
    piqa = read_piqa(SHARED_DATA / "piqa")
    assert len(piqa) == 1838 and sum(d["label"] for d in piqa) == 928
    wino = read_winogrande(SHARED_DATA / "winogrande")
    assert len(wino) == 1267 and sum(d["answer"] == "2" for d in wino) == 639
    mc = read_truthfulqa_mc(SHARED_DATA / "truthfulqa" / "mc_task_2021-10.json")
    assert len(mc) == 817 and all(sum(d["mc1_targets"]["labels"]) == 1 and 1 in d["mc2_targets"]["labels"] for d in mc)
    gen = read_truthfulqa_gen(SHARED_DATA / "truthfulqa" / "TruthfulQA_2021-10.csv")
    assert len(gen) == 817 and gen[0]["question"] == "What happens to you if you eat watermelon seeds?"
    assert all(d["correct_answers"] and d["incorrect_answers"] for d in gen)


@pytest.mark.parametrize("add_bos_token", [False, True, None])
def test_run_lm_eval_bos_choice_reaches_the_model(lm_eval_samples, add_bos_token):
    """``add_bos_token=False`` (the paper's lm-eval) feeds contexts without BOS, True with BOS on every one; None is
    the installed lm-eval's default, which with a tokenizer that adds BOS (LLaMA's) also prepends it."""
    tiny, task_dir, _ = lm_eval_samples
    firsts = []

    def first_tokens(module, args, kwargs):  # a shared context's continuations run on its cache: not a first token
        if kwargs.get("past_key_values") is None:
            firsts.extend((args[0] if args else kwargs["input_ids"])[:, 0].tolist())

    hook = tiny.model.register_forward_pre_hook(first_tokens, with_kwargs=True)
    try:
        run_lm_eval(harness_model(tiny, batch_size=4, add_bos_token=add_bos_token), ["piqa"], task_dir, limit=3)
    finally:
        hook.remove()
    bos = tiny.tokenizer.bos_token_id
    assert firsts and tiny.tokenizer("x")["input_ids"][0] == bos
    assert all(f == bos for f in firsts) if add_bos_token in (True, None) else not any(f == bos for f in firsts)


def truthfulqa_docs() -> list[dict]:
    """TruthfulQA-gen docs as lm-eval's process_docs_gen makes them: the real 817 where present, else the sample."""
    import datasets
    from lm_eval.tasks.truthfulqa.utils import process_docs_gen

    real = SHARED_DATA / "truthfulqa" / "TruthfulQA_2021-10.csv"
    records = read_truthfulqa_gen(real if real.exists() else SAMPLE / "truthfulqa" / "TruthfulQA.csv")
    return list(process_docs_gen(datasets.Dataset.from_list(records[:120])))


def test_truthfulqa_gen_scores_equal_lm_evals_without_the_bootstrap():
    """plwlab's TruthfulQA-gen scoring (lm-eval's, ROUGE without its 1,000-resample bootstrap of a single score)
    against lm-eval's own process_results_gen on the same docs and completions: every metric equal."""
    from lm_eval.tasks.truthfulqa.utils import process_results_gen as lm_eval_scores

    from plwlab.evaluation.truthfulqa import process_results_gen

    docs = truthfulqa_docs()
    completions = [d["correct_answers"][0] for d in docs[::3]] + [d["incorrect_answers"][-1] for d in docs[1::3]] + [
        "I have no comment.", "", "The . answer . is . no", "Yes"] * (len(docs) // 12)  # fmt: skip
    for doc, completion in zip(docs, completions):
        assert process_results_gen(doc, [completion]) == lm_eval_scores(doc, [completion])


def test_the_truthfulqa_gen_task_scores_through_plwlab_and_equals_lm_evals_task(lm_eval_samples, tmp_path):
    tiny, task_dir, _ = lm_eval_samples
    assert "plwlab_truthfulqa.process_results_gen" in (task_dir / "truthfulqa_gen.yaml").read_text()
    original = tmp_path / "original"
    original.mkdir()
    for f in ("truthfulqa_gen.yaml", "truthfulqa_gen.jsonl"):
        text = (task_dir / f).read_text()
        (original / f).write_text("\n".join(line for line in text.splitlines() if "plwlab_truthfulqa" not in line)
                                  .replace(str(task_dir), str(original)) + "\n")  # fmt: skip
    lm = harness_model(tiny, batch_size=4)
    ours = run_lm_eval(lm, ["truthfulqa_gen"], task_dir, limit=3)
    theirs = run_lm_eval(lm, ["truthfulqa_gen"], original, limit=3)
    assert ours == theirs and len(ours) == 12


def test_shared_contexts_are_computed_once_with_lm_evals_scores(lm_eval_samples):
    """SharedPrefixHFLM against lm-eval's own HFLM on every loglikelihood request of the multiple-choice samples
    (ARC 2-shot, PIQA, TruthfulQA-MC2, WinoGrande): the same log-probabilities to float rounding, the same greedy
    flags and metrics, and the model run on each shared context once."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from plwlab.evaluation.shared_prefix import SharedPrefixHFLM

    tiny, task_dir, _ = lm_eval_samples
    tasks = ["arc_challenge", "piqa", "truthfulqa_mc2", "winogrande"]
    outs, tokens = {}, {}
    for name, cls in (("lm_eval", HFLM), ("shared", SharedPrefixHFLM)):
        seen = []
        hook = tiny.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
            (args[0] if args else kwargs["input_ids"]).numel()), with_kwargs=True)  # fmt: skip
        try:
            lm = cls(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=4, device="cpu", add_bos_token=False)
            outs[name] = simple_evaluate(model=lm, tasks=tasks, limit=3, fewshot_random_seed=1234, log_samples=True,
                                         task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))  # fmt: skip
        finally:
            hook.remove()
        tokens[name] = sum(seen)
    for task in tasks:
        theirs, ours = outs["lm_eval"]["samples"][task], outs["shared"]["samples"][task]
        for a, b in zip(theirs, ours):
            for ra, rb in zip(a["resps"], b["resps"]):  # one [log-probability, is greedy] per request
                (lp_a, greedy_a), (lp_b, greedy_b) = ra[0], rb[0]
                assert float(lp_b) == pytest.approx(float(lp_a), abs=1e-4) and str(greedy_a) == str(greedy_b)
        metrics = {k: v for k, v in outs["lm_eval"]["results"][task].items() if "stderr" not in k and k != "alias"}
        assert {k: outs["shared"]["results"][task][k] for k in metrics} == pytest.approx(metrics, abs=1e-6)
    assert tokens["shared"] < 0.7 * tokens["lm_eval"]  # the shared contexts were not sent again with every answer
