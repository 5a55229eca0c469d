"""evaluate.py: generation, memorization BLEU, cached responses, references, results table, CLI, shards, W&B."""

import csv
import json
import multiprocessing
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLE, SHARED_DATA, compose_train
from omegaconf import OmegaConf
from test_train import QUICK

from plwlab import CONF_DIR
from plwlab.data.alpaca import alpaca_prompt
from plwlab.data.datamodule import InstructionDataModule
from plwlab.data.tokenization import cached_tokenize
from plwlab.evaluation.evaluate import result_row
from plwlab.evaluation.generation import encode, generate
from plwlab.evaluation.memorization import memorization_bleu, training_records
from plwlab.evaluation.responses import reference_outputs, responses
from plwlab.evaluation.runs import load_run
from plwlab.results import append_results
from plwlab.rundir import RunDir
from plwlab.training.train import train

MEMORIZATION_ONLY = ["eval=mechanisms", "eval.memorization.n=2", "eval.memorization.max_new_tokens=4", "~eval.generations"]


def compose_eval(overrides: list[str]):
    """The evaluate config as evaluate.py composes it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("evaluate", overrides=overrides)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "run"  # its own sweep folder: the tests glob over its parent
    train(compose_train([*QUICK, "plw=0.1"], path))
    return path


def test_load_run_and_batched_generation_matches_one_by_one(run_dir):
    run = load_run(run_dir)
    assert run.meta["plw"] == 0.1 and run.run_id == f"plwlab/{run_dir.name}" and run.tokenizer.padding_side == "left"
    prompts = [alpaca_prompt("Name a colour."), alpaca_prompt("Write a very long story about a dragon and a knight."),
               alpaca_prompt("Add the numbers.", "2 and 3")]  # fmt: skip
    batched = generate(run.model, run.tokenizer, prompts, max_new_tokens=12, batch_size=3, progress=False)
    single = [generate(run.model, run.tokenizer, [p], max_new_tokens=12, progress=False)[0] for p in prompts]
    assert batched == single  # left padding and length sorting change nothing
    assert all(run.tokenizer.eos_token_id not in ids and len(ids) <= 12 for ids in batched)
    with pytest.raises(FileNotFoundError, match="not a plwlab export"):
        load_run(run_dir / "checkpoints")


def test_memorization_bleu(run_dir):
    run = load_run(run_dir)
    score, signature, n = memorization_bleu(run, json.loads(SAMPLE.read_text()), n=6, max_new_tokens=16)
    assert n == 6 and 0 <= score <= 100
    assert signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")


def test_memorization_uses_exactly_the_training_split(run_dir):
    run = load_run(run_dir)
    records = training_records(run_dir, run.tokenizer)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    datamodule = InstructionDataModule(tokenizer=run.tokenizer, seed=cfg.seed, **OmegaConf.to_container(cfg.data, resolve=True))
    datamodule.setup()
    assert len(records) == run.meta["n_train"] == 44  # data.limit=48, val_size=4: the 4 held out are not used
    ours, _ = cached_tokenize(records, run.tokenizer, cfg.data.max_length, None)
    assert [e.input_ids for e in ours] == [e.input_ids for e in datamodule.train_set.examples]


def test_memorization_bleu_of_a_perfect_memorizer(run_dir, monkeypatch):
    run = load_run(run_dir)
    records = json.loads(SAMPLE.read_text())
    by_prompt = {tuple(encode(run.tokenizer, [alpaca_prompt(r["instruction"], r["input"])], True)[0]): r["output"]
                 for r in records}  # fmt: skip

    def parrot(model, tokenizer, prompts, *args, **kwargs):
        return [tokenizer(by_prompt[tuple(p)], add_special_tokens=False)["input_ids"] for p in prompts]

    monkeypatch.setattr("plwlab.evaluation.engines.generate", parrot)
    score, _, _ = memorization_bleu(run, records, n=20)
    assert score > 90  # the byte-level tokenizer round-trips the completions


def test_results_table_replaces_rows_and_survives_concurrent_jobs(tmp_path, run_dir):
    table = tmp_path / "results.csv"
    run = load_run(run_dir)
    append_results(table, [result_row(run, "memorization", "bleu", 12.5, None, 6)])
    append_results(table, [result_row(run, "memorization", "bleu", 13.0, None, 6),
                           result_row(run, "alpaca_eval", "generation_length", 40.0, 2.0, 805)])  # fmt: skip
    rows = list(csv.DictReader(table.open()))
    assert [(r["benchmark"], r["score"]) for r in rows] == [("memorization", "13.0"), ("alpaca_eval", "40.0")]
    assert rows[0]["plw"] == "0.1" and rows[0]["dataset"] == "alpaca_sample"
    rows = [[{"run_id": f"r{i}", "benchmark": "b", "metric": "m", "score": i}] for i in range(16)]
    # spawned, not forked: a fork of this process (Lightning's and tqdm's threads) can inherit a held lock
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.starmap(append_results, [(table, r) for r in rows])
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 18 and {r["run_id"] for r in rows} >= {f"r{i}" for i in range(16)}


def test_responses_are_cached_and_references_aligned(run_dir, monkeypatch, tmp_path):
    run = load_run(run_dir)
    records = [{"instruction": "Say hi.", "input": ""}, {"instruction": "Add the numbers.", "input": "2 and 3"}]
    first = responses(run, run_dir, "demo", records, max_new_tokens=6)
    assert [(r["instruction"], r["input"], r["generator"]) for r in first] == [("Say hi.", "", run.run_id),
                                                                               ("Add the numbers.", "2 and 3", run.run_id)]  # fmt: skip
    assert all(0 <= r["length"] <= 6 for r in first) and (run_dir / "eval" / "generations" / "demo.json").exists()

    def no_generation(*args, **kwargs):
        raise AssertionError("should have used the cache")

    monkeypatch.setattr("plwlab.evaluation.engines.generate", no_generation)
    assert responses(run, run_dir, "demo", records, max_new_tokens=6) == first
    with pytest.raises(AssertionError, match="cache"):  # other settings: generated again
        responses(run, run_dir, "demo", records, max_new_tokens=7)
    settings = OmegaConf.create({"dtype": "float32", "device": "cpu", "batch_size": 2})
    assert reference_outputs(str(run_dir), first, "demo", 6, settings) == [r["output"] for r in first]  # another run's
    monkeypatch.undo()
    fresh = reference_outputs(str(run_dir), first, "demo2", 6, settings)  # not generated yet: generated and cached now
    assert fresh == [r["output"] for r in first] and (run_dir / "eval" / "generations" / "demo2.json").exists()
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps([{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
                               {"instruction": "Say hi.", "output": "Hi!"}]))  # fmt: skip
    assert reference_outputs(str(ref), first, "demo", 6, settings) == ["Hi!", "5"]
    ref.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi!"}]))
    with pytest.raises(ValueError, match="no reference for 1 of 2 instructions"):
        reference_outputs(str(ref), first, "demo", 6, settings)
    with pytest.raises(FileNotFoundError, match="not a plwlab export"):
        reference_outputs(str(tmp_path), first, "demo", 6, settings)


def test_a_broken_run_does_not_stop_the_others(tmp_path, run_dir):
    import shutil

    from plwlab.evaluation.evaluate import evaluate

    sweep = tmp_path / "sweep"
    for name in ("a", "b"):
        shutil.copytree(run_dir / "hf_model", sweep / name / "hf_model")
        shutil.copy(run_dir / "config.yaml", sweep / name / "config.yaml")
    next((sweep / "a" / "hf_model").glob("*.safetensors")).unlink()  # a: weights lost
    cfg = compose_eval([f"run_dir={sweep}/*", f"results={tmp_path / 'r.csv'}", *MEMORIZATION_ONLY])
    with pytest.raises(RuntimeError, match=r"1 evaluations failed \(the others. rows are in .*\): a \("):
        evaluate(cfg)
    assert [r["run_id"] for r in csv.DictReader((tmp_path / "r.csv").open())] == ["plwlab/b"]


def _evaluate_cli(tmp_path, *overrides, multirun=False):
    import os
    import subprocess
    import sys

    args = [sys.executable, str(ROOT / "evaluate.py"), *(["-m"] if multirun else []), *overrides,
            f"hydra.run.dir={tmp_path / 'h'}", f"hydra.sweep.dir={tmp_path / 'hs'}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)


def test_evaluate_cli_default_quick_preset_over_a_sweep_glob(tmp_path, run_dir):
    """The default (eval=quick) runs every evaluation path offline on the bundled samples."""
    results = tmp_path / "results.csv"
    for _ in range(2):  # re-running replaces rows, never duplicates them
        done = _evaluate_cli(tmp_path, f"run_dir={run_dir.parent}/*", f"results={results}")
        assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(results.open()))
    keys = [(r["benchmark"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)) == 33 and {r["run_id"] for r in rows} == {f"plwlab/{run_dir.name}"}
    assert {b for b, _ in keys} == {"memorization", "alpaca_eval", "pandalm", "arc_challenge", "piqa", "truthfulqa_mc2",
                                    "winogrande", "truthfulqa_gen", "wmt14_en_fr"}  # fmt: skip
    by_key = {(r["benchmark"], r["metric"]): r for r in rows}
    assert by_key["alpaca_eval", "win_rate"]["n"] == "6" and by_key["alpaca_eval", "unparsed_verdicts"]["score"] == "0.0"
    kept = json.loads((run_dir / "eval" / "judgements" / "alpaca_eval.json").read_text())
    assert len(kept) == 6 and {"preference", "shown", "raw"} <= kept[0].keys()
    decisive = [v["shown"] for v in kept if v["shown"] in (1, 2)]
    assert by_key["alpaca_eval", "first_position_rate"]["n"] == str(len(decisive))
    assert by_key["pandalm", "generation_length"]["n"] == "6" and by_key["winogrande", "acc"]["n"] == "6"
    assert 0 <= float(by_key["alpaca_eval", "win_rate"]["score"]) <= 100
    assert sum(float(by_key["pandalm", m]["score"]) for m in ("wins", "ties", "losses")) == 6  # PandaLM's counts
    missing = _evaluate_cli(tmp_path, f"run_dir={tmp_path}/nothing*")
    assert missing.returncode != 0 and missing.stderr.strip().splitlines()[-1].startswith("error: no finished training run")


def test_sweep_run_folders_are_plain_arguments(tmp_path, run_dir):
    """A sweep's run folders contain '=' and ',' (Hydra's override syntax): given as plain arguments, one folder or
    the many a shell glob expands to, they are evaluated as typed (Hydra's lexer refused them before)."""
    import shutil

    sweep = tmp_path / "sweep"
    names = ("data.limit=48,plw=0.1", "data.limit=48,plw=1")
    for name in names:
        shutil.copytree(run_dir, sweep / name, ignore=shutil.ignore_patterns("eval"))
    results = tmp_path / "results.csv"
    one = _evaluate_cli(tmp_path, str(sweep / names[0]), f"results={results}", *MEMORIZATION_ONLY)
    assert one.returncode == 0, one.stderr[-3000:]
    assert {r["run_id"] for r in csv.DictReader(results.open())} == {f"plwlab/{names[0]}"}
    expanded = [str(p) for p in sorted(sweep.glob("*"))]  # what `python evaluate.py outputs/sweep/*` receives
    both = _evaluate_cli(tmp_path, *expanded, f"results={results}", *MEMORIZATION_ONLY)
    assert both.returncode == 0, both.stderr[-3000:]
    assert sorted({r["run_id"] for r in csv.DictReader(results.open())}) == [f"plwlab/{n}" for n in names]
    # it ends with a table of the scores it wrote: a row per run, its PLW, the primary metric of each benchmark
    table = both.stdout[both.stdout.index("Primary scores written to"):]
    rows = [line for line in table.splitlines() if line.startswith("│ data.limit=48")]
    bleu = {r["run_id"]: float(r["score"]) for r in csv.DictReader(results.open()) if r["metric"] == "bleu"}
    assert [line.split("│")[1].strip() for line in rows] == list(names) and "memorization" in table
    assert [line.split("│")[2].strip() for line in rows] == ["0.1", "0.1"]  # copies of one PLW 0.1 run
    assert [float(line.split("│")[4]) for line in rows] == pytest.approx([bleu[f"plwlab/{n}"] for n in names], rel=1e-3)
    typo = _evaluate_cli(tmp_path, str(sweep / names[0]), "batchsize=4")
    assert typo.returncode == 1 and typo.stderr.strip() == ("error: unknown config key 'batchsize' (did you mean "
                                                            "'batch_size'?) in batchsize=4; the schema is "
                                                            "plwlab.config.EvaluateConfig")  # fmt: skip


def test_multirun_shards_split_the_runs(tmp_path, run_dir):
    import shutil

    sweep = tmp_path / "sweep"
    for name in ("plw=0", "plw=0.1", "plw=1"):
        shutil.copytree(run_dir / "hf_model", sweep / name / "hf_model")
        shutil.copy(run_dir / "config.yaml", sweep / name / "config.yaml")
    results = tmp_path / "results.csv"
    done = _evaluate_cli(tmp_path, f"run_dir={sweep}/*", f"results={results}", *MEMORIZATION_ONLY, "num_shards=2", "shard=0,1",
                         multirun=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(results.open()))
    assert sorted(r["run_id"] for r in rows) == ["plwlab/plw=0", "plwlab/plw=0.1", "plwlab/plw=1"]
    logs = [(tmp_path / "hs" / str(job) / "evaluate.log").read_text() for job in (0, 1)]
    evaluated = [sorted(line.rsplit("/", 1)[1] for line in log.splitlines() if "] evaluating " in line) for log in logs]
    assert evaluated == [["plw=0", "plw=1"], ["plw=0.1"]]  # each run once, over two jobs
    assert "shard must be in [0, num_shards=2)" in _evaluate_cli(tmp_path, f"run_dir={sweep}/*", "num_shards=2", "shard=2").stderr


def test_wandb_eval_run_offline(tmp_path, run_dir, monkeypatch):
    import wandb

    from plwlab.evaluation.evaluate import evaluate

    monkeypatch.setenv("WANDB_MODE", "offline")
    init_kwargs = {}
    real_init = wandb.init
    monkeypatch.setattr(wandb, "init", lambda **kw: init_kwargs.update(kw) or real_init(**kw))
    cfg = compose_eval([f"run_dir={run_dir}", f"results={tmp_path / 'r.csv'}", *MEMORIZATION_ONLY, "wandb.enabled=true",
                        "wandb.offline=true"])  # fmt: skip
    evaluate(cfg)
    assert init_kwargs["job_type"] == "eval" and init_kwargs["config"]["plw"] == 0.1
    assert init_kwargs["group"] == OmegaConf.load(run_dir / "config.yaml").name  # beside the training runs
    runs = sorted((run_dir / "eval" / "wandb").glob("offline-run-*"))
    tables = [json.loads(p.read_text()) for p in runs[-1].glob("files/media/table/results_*.table.json")]
    assert tables and tables[0]["data"][0][5:7] == ["memorization", "bleu"]  # the rows, as a W&B table


def test_wandb_eval_run_holds_the_run_config_scores_and_generations(tmp_path, run_dir, monkeypatch):
    """Read back from the offline run's records: the training run's config (run id, dataset, Rg, PLW), each
    score as a metric and in the summary, and the responses as a table (instruction, response, length, PLW)."""
    from wandb_records import offline_runs

    from plwlab.evaluation.evaluate import evaluate

    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = [f"run_dir={run_dir}", f"results={tmp_path / 'r.csv'}", "eval=quick", "eval.memorization.n=2",
                 "eval.memorization.max_new_tokens=4", "eval.generations.alpaca_eval.limit=3",
                 "eval.generations.alpaca_eval.max_new_tokens=4", "~eval.generations.pandalm", "~eval.judges", "~eval.lm_eval",
                 "wandb.enabled=true",
                 "wandb.offline=true"]  # fmt: skip
    before = len(offline_runs(run_dir / "eval" / "wandb"))  # the run fixture is shared
    rows = evaluate(compose_eval(overrides))
    evaluate(compose_eval(overrides))  # evaluated again: the same W&B run continues
    runs = offline_runs(run_dir / "eval" / "wandb")
    # (two evaluations in one second: wandb names the second folder <...>-1; the run record holds the id)
    assert len(runs) == before + 2 and {r.run_id for r in runs} == {RunDir(run_dir).wandb_eval_id}
    run = runs[-1]
    meta = RunDir(run_dir).export_meta()
    assert run.job_type == "eval" and run.config["run_id"] == RunDir(run_dir).run_id
    assert run.config["dataset"] == meta["dataset"] and run.config["rg"] == meta["rg"] and run.config["plw"] == 0.1
    for r in rows:
        assert run.summary[f"{r['benchmark']}/{r['metric']}"] == pytest.approx(r["score"])
    table = run.table("generations/alpaca_eval")
    assert table["columns"][:4] == ["instruction", "input", "response", "length"]
    written = json.loads(RunDir(run_dir).generations_file("alpaca_eval").read_text())
    assert [row[0] for row in table["data"]] == [o["instruction"] for o in written]
    assert [row[3] for row in table["data"]] == [o["length"] for o in written] and {row[4] for row in table["data"]} == {0.1}


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data not present")
def test_paper_preset_on_the_real_local_files(tmp_path, run_dir, monkeypatch):
    """eval=paper as composed, on the real PIQA, WinoGrande and TruthfulQA files and the real AlpacaEval and PandaLM
    instruction sets (few items each); the hub-only tasks (ARC, WMT) and the 7B+ judges are left out."""
    from plwlab.evaluation.evaluate import evaluate

    monkeypatch.setenv("PLWLAB_DATA", str(SHARED_DATA))
    hub_only = ["arc_challenge", "wmt14_en_fr", "wmt14_fr_en", "wmt16_en_de", "wmt16_de_en", "wmt16_en_ro", "wmt16_ro_en"]
    cfg = compose_eval([
        f"run_dir={run_dir}", f"results={tmp_path / 'r.csv'}", "eval=paper", "eval.memorization.n=2",
        "eval.memorization.max_new_tokens=4", "eval.generations.alpaca_eval.limit=3", "eval.generations.pandalm.limit=3",
        "eval.generations.alpaca_eval.max_new_tokens=4", "eval.generations.pandalm.max_new_tokens=4",
        "eval.lm_eval.limit=4", "eval.lm_eval.max_gen_toks=4", "~eval.judges",
        *(f"~eval.lm_eval.tasks.{t}" for t in hub_only)])  # fmt: skip
    rows = evaluate(cfg)
    got = {(r["benchmark"], r["metric"]): r["n"] for r in rows}
    assert got["piqa", "acc"] == got["winogrande", "acc"] == got["truthfulqa_mc2", "acc"] == got["truthfulqa_gen", "bleu_max"] == 4
    assert got["alpaca_eval", "generation_length"] == got["pandalm", "generation_length"] == 3


def test_a_task_can_have_its_own_limit(tmp_path, run_dir):
    """eval.lm_eval.limit is the default subset; a task's own ``limit`` overrides it (eval=real keeps TruthfulQA's
    ~8 options per question to fewer questions than PIQA's two)."""
    from plwlab.evaluation.evaluate import evaluate

    cfg = compose_eval([f"run_dir={run_dir}", f"results={tmp_path / 'r.csv'}", "~eval.memorization", "~eval.generations",
                        "~eval.judges", "eval.lm_eval.limit=5", "+eval.lm_eval.tasks.truthfulqa_mc2.limit=2",
                        *(f"~eval.lm_eval.tasks.{t}" for t in
                          ("arc_challenge", "winogrande", "truthfulqa_gen", "wmt14_en_fr"))])  # fmt: skip
    got = {r["benchmark"]: r["n"] for r in evaluate(cfg)}
    assert got == {"piqa": 5, "truthfulqa_mc2": 2}


def test_a_local_judge_model_is_loaded_once_for_all_runs(tmp_path, run_dir, monkeypatch):
    import shutil

    from plwlab.evaluation.evaluate import evaluate
    from plwlab.evaluation.judges import PairwiseJudge

    judge_dir = tmp_path / "judge"
    shutil.copytree(run_dir / "hf_model", judge_dir)  # any HF causal LM folder (or hub id) can judge
    for name in ("a", "b"):
        shutil.copytree(run_dir / "hf_model", tmp_path / "sweep" / name / "hf_model")
    loads = []
    real = PairwiseJudge.from_pretrained.__func__
    monkeypatch.setattr(PairwiseJudge, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a) or real(cls, *a, **k)))
    cfg = compose_eval([f"run_dir={tmp_path / 'sweep'}/*", f"results={tmp_path / 'r.csv'}", "~eval.memorization",
                        "~eval.lm_eval", "~eval.judges.pandalm", f"eval.judges.alpaca_eval.model={judge_dir}"])  # fmt: skip
    rows = evaluate(cfg)
    assert loads == [(str(judge_dir), "float32", "cpu")]
    win = [r for r in rows if r["metric"] == "win_rate"]
    assert [(r["run_id"], r["n"]) for r in win] == [("sweep/a", 6), ("sweep/b", 6)]  # no config.yaml: the folder
    assert win[0]["score"] == win[1]["score"]  # same weights, same judge, same seeded order


def test_a_lora_run_is_evaluated_with_its_base_model(tmp_path, run_dir):
    """A LoRA run's export is the adapter; load_run puts it on the base model named in adapter_config.json (here a
    local folder; on a cluster a hub id) with peft."""
    lora = "model.lora={r:4,lora_alpha:8,target_modules:[q_proj,v_proj]}"
    base = f"model.name_or_path={run_dir / 'hf_model'}"
    train(compose_train([*QUICK, "model.config=null", base, lora, "callbacks.param_distance=null"], tmp_path / "lora"))
    run = load_run(tmp_path / "lora")
    assert type(run.model).__name__ == "PeftModelForCausalLM" and run.run_id == "plwlab/lora"
    assert len(generate(run.model, run.tokenizer, ["### Instruction:\nSay hi."], max_new_tokens=3, progress=False)[0]) <= 3


def _copy_run(run_dir: Path, to: Path, name: str) -> Path:
    """A copy of the trained run as if it had been trained with ``name=<name>``."""
    import shutil

    from omegaconf import OmegaConf

    shutil.copytree(run_dir / "hf_model", to / "hf_model")
    for f in ("status.json", "metrics.json"):
        shutil.copy(run_dir / f, to / f)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    cfg.name = name
    OmegaConf.save(cfg, to / "config.yaml")
    return to


def test_sweeps_with_the_same_overrides_keep_their_own_rows(tmp_path, run_dir):
    from plwlab.evaluation.evaluate import evaluate

    a = _copy_run(run_dir, tmp_path / "a" / "plw=0.1", "a")
    b = _copy_run(run_dir, tmp_path / "b" / "plw=0.1", "b")
    shared = tmp_path / "shared.csv"
    for run in (a, b):
        evaluate(compose_eval([f"run_dir='{run}'", f"results={shared}", *MEMORIZATION_ONLY]))
    rows = list(csv.DictReader(shared.open()))
    assert sorted(r["run_id"] for r in rows) == ["a/plw=0.1", "b/plw=0.1"]  # not one replacing the other
    assert {r["config_digest"] for r in rows} == {json.loads((run_dir / "status.json").read_text())["config_digest"]}
    assert {r["train_steps"] for r in rows} == {"6"}
    assert {r["data_sha256"] for r in rows} == {json.loads((run_dir / "metrics.json").read_text())["data_sha256"]}
    evaluate(compose_eval([f"run_dir='{a}'", *MEMORIZATION_ONLY]))  # default: the sweep's own table
    assert [r["run_id"] for r in csv.DictReader((tmp_path / "a" / "results.csv").open())] == ["a/plw=0.1"]
    with pytest.raises(ValueError, match="the runs lie in 2 sweep directories; name the results table"):
        evaluate(compose_eval([f"run_dir='{tmp_path}/*/plw=0.1'", *MEMORIZATION_ONLY]))


@pytest.mark.parametrize("bad", ["extra fields", "truncated last line"])
def test_a_malformed_results_table_stops_before_any_work(tmp_path, run_dir, bad):
    from plwlab.evaluation.evaluate import evaluate
    from plwlab.results import COLUMNS as RESULT_COLUMNS

    run = _copy_run(run_dir, tmp_path / "sweep" / "plw=0.1", "plwlab")
    table = tmp_path / "r.csv"
    good = "plwlab/x,m,d,0.1,1.0,piqa,acc,0.5,0.01,6,abc,6,f00d"
    lines = {"extra fields": [good, good + ",1,2"], "truncated last line": [good, "plwlab/y,m,d,0.1,1.0,pi"]}[bad]
    table.write_text("\n".join([",".join(RESULT_COLUMNS), *lines]) + ("\n" if bad == "extra fields" else ""))
    before = table.read_text()
    with pytest.raises(ValueError, match="r.csv: line 3 has .* fields, not 13"):
        evaluate(compose_eval([f"run_dir='{run}'", f"results={table}", *MEMORIZATION_ONLY]))
    assert table.read_text() == before and not (run / "eval").exists()  # nothing rewritten, nothing evaluated


def test_a_failing_judge_keeps_the_other_benchmarks_rows(tmp_path, run_dir, monkeypatch):
    import plwlab.evaluation.evaluate as ev

    run = _copy_run(run_dir, tmp_path / "sweep" / "plw=0.1", "plwlab")

    def crash(*args, **kwargs):
        raise TypeError("Invalid value '1.5' for dtype 'int64'")  # what alpaca_eval 0.6.6 raises with pandas 3

    monkeypatch.setattr(ev, "judge_rows", crash)
    cfg = compose_eval([f"run_dir='{run}'", "eval.memorization.n=2", "eval.memorization.max_new_tokens=4",
                        "~eval.judges.pandalm", *(f"~eval.lm_eval.tasks.{t}" for t in
                        ("arc_challenge", "truthfulqa_mc2", "winogrande", "truthfulqa_gen", "wmt14_en_fr"))])  # fmt: skip
    with pytest.raises(RuntimeError, match="1 evaluations failed .*: plw=0.1 alpaca_eval: TypeError: Invalid value"):
        ev.evaluate(cfg)
    rows = list(csv.DictReader((tmp_path / "sweep" / "results.csv").open()))
    assert {r["benchmark"] for r in rows} == {"memorization", "alpaca_eval", "pandalm", "piqa"}  # kept
    status = json.loads((run / "eval" / "status.json").read_text())
    assert status["piqa"] == "ok" and status["alpaca_eval"].startswith("failed: TypeError")
    from importlib.metadata import version

    assert status["harness"] == {"lm_eval_version": version("lm_eval"), "add_bos_token": False}  # eval=quick: the paper's


def test_cached_responses_are_keyed_by_dtype_and_weights(run_dir, tmp_path, monkeypatch):
    import shutil

    import plwlab.evaluation.responses as ev
    import plwlab.evaluation.engines as engines

    copy = tmp_path / "run"
    shutil.copytree(run_dir / "hf_model", copy / "hf_model")
    records = [{"instruction": "Say hi.", "input": ""}]
    calls = []
    real = engines.generate
    monkeypatch.setattr(engines, "generate", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    ev.responses(load_run(copy), copy, "demo", records, max_new_tokens=4)
    ev.responses(load_run(copy), copy, "demo", records, max_new_tokens=4)  # cached
    ev.responses(load_run(copy, dtype="float64"), copy, "demo", records, max_new_tokens=4)
    weights = next((copy / "hf_model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # the run was trained again: new weight files
    ev.responses(load_run(copy, dtype="float64"), copy, "demo", records, max_new_tokens=4)
    assert len(calls) == 3


def test_rows_that_cannot_be_added_are_kept_beside_the_table(tmp_path):
    table = tmp_path / "r.csv"
    table.write_text("not,a,results,table\n")  # e.g. overwritten by hand while a long evaluation ran
    rows = [{"run_id": "s/r", "benchmark": "piqa", "metric": "acc", "score": 0.5}]
    with pytest.raises(RuntimeError, match=r"line 1 is not a plwlab results header.*the 1 new rows are kept in"):
        append_results(table, rows)
    (pending,) = tmp_path.glob("r.pending-*.csv")
    assert [(r["run_id"], r["score"]) for r in csv.DictReader(pending.open())] == [("s/r", "0.5")]
    assert table.read_text() == "not,a,results,table\n"


def test_hydra_group_overrides_with_a_slash_are_not_run_folders():
    """``hydra/launcher=slurm`` (the docs' SLURM evaluation) has a '/' before its '=' like a sweep's run folder: it
    was taken for a run folder ("no finished training run matches hydra/launcher=slurm")."""
    from plwlab.evaluation.main import arguments

    assert arguments(["-m", "run_dir='out/*'", "hydra/launcher=slurm", "hydra/sweeper=basic", "shard=0,1"]) == [
        "-m", "run_dir='out/*'", "hydra/launcher=slurm", "hydra/sweeper=basic", "shard=0,1"]  # fmt: skip
    assert arguments(["outputs/plwlab/data.limit=48,plw=0.1", "eval=quick"]) == [
        "eval=quick", "run_dir='outputs/plwlab/data.limit=48,plw=0.1'"]  # fmt: skip
