"""The evaluation slice built so far: generation, memorization BLEU, generation length, results table."""

import csv
import json
import multiprocessing

import pytest

from plwlab.alpaca import alpaca_prompt
from plwlab.evaluate import (
    append_results, generate, generation_lengths, load_run, memorization_bleu, prepare_piqa, result_row, run_lm_eval,
)  # fmt: skip
from plwlab.train import train

from conftest import SAMPLE, SHARED_DATA, compose_train
from test_train import QUICK


def fake_piqa(folder):
    folder.mkdir(parents=True, exist_ok=True)
    items = [("Boil water.", "Put it on a stove.", "Put it in a freezer.", 0),
             ("Dry hair.", "Use a wet towel.", "Use a dry towel.", 1), ("Cut bread.", "Use a knife.", "Use a spoon.", 0)]  # fmt: skip
    (folder / "valid.jsonl").write_text("".join(json.dumps({"goal": g, "sol1": a, "sol2": b}) + "\n" for g, a, b, _ in items))
    (folder / "valid-labels.lst").write_text("".join(f"{y}\n" for *_, y in items))
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    train(compose_train([*QUICK, "plw=0.1"], path))
    return path


def test_load_run_and_batched_generation_matches_one_by_one(run_dir):
    run = load_run(run_dir)
    assert run.meta["plw"] == 0.1 and run.run_id == run_dir.name and run.tokenizer.padding_side == "left"
    prompts = [alpaca_prompt("Name a colour."), alpaca_prompt("Write a very long story about a dragon and a knight."),
               alpaca_prompt("Add the numbers.", "2 and 3")]  # fmt: skip
    batched = generate(run.model, run.tokenizer, prompts, max_new_tokens=12, batch_size=3, progress=False)
    single = [generate(run.model, run.tokenizer, [p], max_new_tokens=12, progress=False)[0] for p in prompts]
    assert batched == single  # left padding and length sorting change nothing
    assert all(run.tokenizer.eos_token_id not in ids and len(ids) <= 12 for ids in batched)
    with pytest.raises(FileNotFoundError, match="not a plwlab export"):
        load_run(run_dir / "checkpoints")


def test_memorization_bleu_and_generation_lengths(run_dir):
    run = load_run(run_dir)
    score, signature, n = memorization_bleu(run, str(SAMPLE), n=6, max_new_tokens=16)
    assert n == 6 and 0 <= score <= 100
    assert signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")
    lengths = generation_lengths(run, ["Say hi.", "List three fruits."], max_new_tokens=10)
    assert len(lengths) == 2 and all(0 <= x <= 10 for x in lengths)


def test_memorization_bleu_of_a_perfect_memorizer(run_dir, monkeypatch):
    run = load_run(run_dir)
    records = json.loads(SAMPLE.read_text())
    by_prompt = {alpaca_prompt(r["instruction"], r["input"]): r["output"] for r in records}

    def parrot(model, tokenizer, prompts, *args, **kwargs):
        return [tokenizer(by_prompt[p], add_special_tokens=False)["input_ids"] for p in prompts]

    monkeypatch.setattr("plwlab.evaluate.generate", parrot)
    score, _, _ = memorization_bleu(run, str(SAMPLE), n=20)
    assert score > 90  # the byte-level tokenizer round-trips the completions


def _append(args):
    path, i = args
    append_results(path, [{"run_id": f"r{i}", "benchmark": "b", "metric": "m", "score": i}])


def test_results_table_replaces_rows_and_survives_concurrent_jobs(tmp_path, run_dir):
    table = tmp_path / "results.csv"
    run = load_run(run_dir)
    append_results(table, [result_row(run, "memorization", "bleu", 12.5, None, 6)])
    append_results(table, [result_row(run, "memorization", "bleu", 13.0, None, 6),
                           result_row(run, "alpaca_eval", "generation_length", 40.0, 2.0, 805)])  # fmt: skip
    rows = list(csv.DictReader(table.open()))
    assert [(r["benchmark"], r["score"]) for r in rows] == [("memorization", "13.0"), ("alpaca_eval", "40.0")]
    assert rows[0]["plw"] == "0.1" and rows[0]["dataset"] == "alpaca_sample"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_append, [(table, i) for i in range(16)])
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 18 and {r["run_id"] for r in rows} >= {f"r{i}" for i in range(16)}


def test_generation_lengths_on_alpaca_eval_instructions(run_dir):
    path = SHARED_DATA / "alpaca_eval" / "text_davinci_003_model_outputs.json"
    if not path.exists():
        pytest.skip("../shared/data not present")
    instructions = [r["instruction"] for r in json.loads(path.read_text())]
    assert len(instructions) == 805
    lengths = generation_lengths(load_run(run_dir), instructions[:4], max_new_tokens=8)
    assert len(lengths) == 4 and all(0 <= x <= 8 for x in lengths)


def test_evaluate_cli_over_a_sweep_glob(tmp_path, run_dir):
    import subprocess
    import sys

    from conftest import ROOT

    instructions = tmp_path / "instructions.json"
    instructions.write_text(json.dumps([{"instruction": "Say hi."}, {"instruction": "Name a fruit."}]))
    results = tmp_path / "results.csv"
    args = [sys.executable, str(ROOT / "evaluate.py"), f"run_dir={run_dir.parent}/*", "eval=quick", f"results={results}",
            f"eval.generation_length.instructions={instructions}", "eval.memorization.n=4", f"hydra.run.dir={tmp_path / 'h'}",
            f"eval.lm_eval.piqa_dir={fake_piqa(tmp_path / 'piqa')}", "eval.lm_eval.limit=3"]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **__import__("os").environ}
    for _ in range(2):  # re-running replaces rows, never duplicates them
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(results.open()))
    assert sorted((r["benchmark"], r["metric"], r["n"]) for r in rows) == [
        ("alpaca_eval", "generation_length", "2"), ("memorization", "bleu", "4"), ("piqa_local", "acc", "3"),
        ("piqa_local", "acc_norm", "3")]
    missing = subprocess.run([*args[:2], f"run_dir={tmp_path}/nothing*", f"hydra.run.dir={tmp_path / 'h2'}"],
                             capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert missing.returncode != 0 and missing.stderr.strip().splitlines()[-1].startswith("error: no finished training run")


def test_lm_eval_on_local_piqa(tmp_path, run_dir):
    piqa = SHARED_DATA / "piqa" if (SHARED_DATA / "piqa").exists() else fake_piqa(tmp_path / "piqa")
    name = prepare_piqa(piqa, tmp_path / "tasks")
    docs = [json.loads(x) for x in (tmp_path / "tasks" / f"{name}.jsonl").read_text().splitlines()]
    assert set(docs[0]) == {"goal", "sol1", "sol2", "label"} and docs[0]["label"] in (0, 1)
    rows = run_lm_eval(load_run(run_dir), [name], tmp_path / "tasks", num_fewshot=0, limit=3)
    assert {r["metric"] for r in rows} == {"acc", "acc_norm"} and all(r["n"] == 3 and 0 <= r["score"] <= 1 for r in rows)
    (piqa_bad := tmp_path / "bad").mkdir()
    (piqa_bad / "valid.jsonl").write_text('{"goal": "a", "sol1": "b", "sol2": "c"}\n')
    (piqa_bad / "valid-labels.lst").write_text("")
    with pytest.raises(ValueError, match="1 questions but 0 labels"):
        prepare_piqa(piqa_bad, tmp_path / "tasks2")
