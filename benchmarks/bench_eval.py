"""Evaluation throughput, contenders in their own processes on the same inputs, rounds alternated (A B C A B C).

    python benchmarks/bench_eval.py generation     # SmolLM2-135M-Instruct, CPU: plwlab's hf engine at its default
                                                   # settings vs a bare batched HF generate loop at each batch size
                                                   # (its best is the target), alpaca_eval's HF decoder and the
                                                   # served engine (vLLM's CPU build, tools/serve_model.sh)
    python benchmarks/bench_eval.py truthfulqa     # TruthfulQA-gen scoring: lm-eval's vs plwlab's (no bootstrap)
    python benchmarks/bench_eval.py harness        # lm-eval tasks (PIQA, WinoGrande, TruthfulQA-MC2) through plwlab
                                                   # (shared contexts once; and without) vs lm-eval's own CLI

Each prints a table and RATIO lines; results in docs/benchmarks.md. Prompts: the first ``--n`` AlpacaEval
instructions ($PLWLAB_DATA, default ../shared/data; else the bundled sample, repeated), through SmolLM2's chat
template, greedy, ``--max-new-tokens`` new tokens. Throughput = generated tokens (before the stop) per second of
the contender's generation call (model loading excluded; the server's startup excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PLWLAB_DATA", ROOT.parent / "shared" / "data"))
BARE_BATCHES = (8, 16, 32, 64, 128)


def model_dir() -> str:
    from plwlab.training.smollm2 import converted_model

    return converted_model(ROOT / "outputs" / "benchmarks" / "models")


def prompts(n: int) -> list[str]:
    """The first ``n`` AlpacaEval instructions as one user turn through SmolLM2's chat template."""
    from transformers import AutoTokenizer

    from plwlab.data.alpaca import user_text
    from plwlab.data.chat import render_chat

    source = DATA / "alpaca_eval" / "text_davinci_003_model_outputs.json"
    if not source.exists():
        source = ROOT / "src" / "plwlab" / "assets" / "eval_sample" / "alpaca_eval_reference.json"
    records = json.loads(source.read_text())
    records = (records * (n // len(records) + 1))[:n]
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    return [render_chat(tokenizer, [{"role": "user", "content": user_text(r["instruction"], r.get("input") or "")}], True)
            for r in records]  # fmt: skip


# -- contenders (each runs in its own process: `bench_eval.py --contender NAME ...`)


def _load(path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tokenizer


def contender_plwlab(path: str, texts: list[str], max_new_tokens: int, batch: int | None) -> tuple[float, int]:
    """plwlab's hf engine at its default settings (evaluate.yaml's batch_size unless ``batch``)."""
    from omegaconf import OmegaConf

    from plwlab.data.chat import end_of_turn_ids
    from plwlab.evaluation.engines import HFEngine

    model, tokenizer = _load(path)
    default = OmegaConf.load(ROOT / "src" / "plwlab" / "conf" / "evaluate.yaml").batch_size
    engine = HFEngine(model, tokenizer, batch or default)
    start = time.perf_counter()
    done = engine.complete(texts, max_new_tokens, add_bos=False, stop_ids=end_of_turn_ids(tokenizer), progress=False)
    return time.perf_counter() - start, sum(c.tokens for c in done)


def contender_bare(path: str, texts: list[str], max_new_tokens: int, batch: int | None) -> tuple[float, int]:
    """A bare batched HF generate loop: prompts sorted by length, left-padded, ``batch`` at a time."""
    import torch

    model, tokenizer = _load(path)
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    ordered = sorted(texts, key=lambda t: -len(tokenizer(t)["input_ids"]))
    tokens = 0
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(ordered), batch):
            enc = tokenizer(ordered[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                tokens += next((k for k, t in enumerate(row) if t in stops), len(row))
    return time.perf_counter() - start, tokens


def contender_alpaca_eval(path: str, texts: list[str], max_new_tokens: int, batch: int | None) -> tuple[float, int]:
    """alpaca_eval's own HF decoder (``huggingface_local_completions``: a transformers pipeline), batch ``batch``."""
    import logging

    from alpaca_eval.decoders.huggingface_local import huggingface_local_completions
    from transformers import AutoTokenizer

    import torch

    logging.disable(logging.INFO)
    # alpaca_eval 0.6.6 adds load_in_8bit=False to from_pretrained's arguments when no GPU is seen, which
    # transformers 5 refuses; seen as a GPU machine it passes none (the model still loads and runs on the CPU)
    torch.cuda.is_available = lambda: True
    start = time.perf_counter()  # it loads the model itself: its loading is timed too (~1 s for 135M)
    out = huggingface_local_completions(texts, path, batch_size=batch or 1, max_new_tokens=max_new_tokens,
                                        model_kwargs={"device_map": None}, cache_dir=None, device="cpu")  # fmt: skip
    seconds = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(path)
    return seconds, sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in out["completions"])


def contender_served(path: str, texts: list[str], max_new_tokens: int, batch: int | None) -> tuple[float, int]:
    """plwlab's openai engine against vLLM's CPU server on 127.0.0.1 (started before the rounds)."""
    from transformers import AutoTokenizer

    from plwlab.data.chat import end_of_turn_ids
    from plwlab.evaluation.engines import OpenAIEngine

    tokenizer = AutoTokenizer.from_pretrained(path)
    engine = OpenAIEngine(tokenizer, os.environ["PLWLAB_BENCH_URL"], str(Path(path).resolve()), concurrency=batch or 16)
    start = time.perf_counter()
    done = engine.complete(texts, max_new_tokens, add_bos=False, stop_ids=end_of_turn_ids(tokenizer), progress=False)
    return time.perf_counter() - start, sum(c.tokens for c in done)


def contender_rouge(kind: str, n: int) -> tuple[float, int]:
    """TruthfulQA-gen's scoring of ``n`` questions (each doc's best answer as the completion) by lm-eval or plwlab."""
    import datasets
    from lm_eval.tasks.truthfulqa.utils import process_docs_gen

    from plwlab.evaluation.harness import read_truthfulqa_gen

    if kind == "lm_eval":
        from lm_eval.tasks.truthfulqa.utils import process_results_gen
    else:
        from plwlab.evaluation.truthfulqa import process_results_gen
    records = read_truthfulqa_gen(DATA / "truthfulqa" / "TruthfulQA_2021-10.csv")[:n]
    docs = list(process_docs_gen(datasets.Dataset.from_list(records)))
    start = time.perf_counter()
    for doc in docs:
        process_results_gen(doc, [doc["best_answer"]])
    return time.perf_counter() - start, len(docs)


CONTENDERS = {"plwlab": contender_plwlab, "bare": contender_bare, "alpaca_eval": contender_alpaca_eval,
              "served": contender_served}  # fmt: skip


def run_contender(name: str, batch: int | None, args: argparse.Namespace, env: dict[str, str]) -> tuple[float, int]:
    cmd = [sys.executable, __file__, "--contender", name, "--n", str(args.n), "--max-new-tokens", str(args.max_new_tokens)]
    if batch:
        cmd += ["--batch", str(batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["seconds"], result["count"]


def rounds(contenders: list[tuple[str, str, int | None]], args: argparse.Namespace, env: dict[str, str],
           unit: str) -> dict[str, float]:  # fmt: skip
    """Median of ``unit``/s for each (label, contender, batch) over ``args.rounds`` alternated rounds."""
    rates: dict[str, list[float]] = {label: [] for label, _, _ in contenders}
    counts: dict[str, int] = {}
    for r in range(args.rounds):
        for label, name, batch in contenders:
            seconds, count = run_contender(name, batch, args, env)
            rates[label].append(count / seconds)
            counts[label] = count
            print(f"round {r + 1} {label:<28} {seconds:8.2f} s {count:7d} {unit} {count / seconds:9.2f} {unit}/s", flush=True)
    return {label: statistics.median(v) for label, v in rates.items()} | {f"{k} count": v for k, v in counts.items()}


def generation(args: argparse.Namespace) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1"}
    path = model_dir()
    contenders = [("plwlab hf (default settings)", "plwlab", None)]
    contenders += [(f"bare generate, batch {b}", "bare", b) for b in BARE_BATCHES]
    contenders += [("alpaca_eval HF decoder, batch 8", "alpaca_eval", 8)]
    server = None
    if (ROOT / ".venv-vllm" / "bin" / "python").exists() and not args.no_served:
        state = tempfile.mkdtemp()
        server = {**env, "PLWLAB_SERVER_DIR": state, "PLWLAB_SERVER_THREADS": env["OMP_NUM_THREADS"]}
        subprocess.run(["bash", str(ROOT / "tools" / "serve_model.sh"), "start", path, "18790"], env=server, check=True)
        env["PLWLAB_BENCH_URL"] = "http://127.0.0.1:18790/v1"
        contenders += [("served (vLLM CPU), concurrency 16", "served", 16)]
    try:
        rates = rounds(contenders, args, env, "tok")
    finally:
        if server:
            subprocess.run(["bash", str(ROOT / "tools" / "serve_model.sh"), "stop", "18790"], env=server, check=False)
    best = max((f"bare generate, batch {b}" for b in BARE_BATCHES), key=rates.__getitem__)
    print(f"\n| contender | tokens/s (median of {args.rounds}) | vs bare best |\n|---|---|---|")
    for label, _, _ in contenders:
        print(f"| {label} | {rates[label]:.1f} | {rates[label] / rates[best]:.2f}x |")
    print(f"RATIO plwlab_default_vs_bare_best {rates['plwlab hf (default settings)'] / rates[best]:.3f} (best: {best})")
    if "PLWLAB_BENCH_URL" in env:
        print(f"RATIO served_vs_bare_best {rates['served (vLLM CPU), concurrency 16'] / rates[best]:.3f}")


def truthfulqa(args: argparse.Namespace) -> None:
    times: dict[str, list[float]] = {"lm_eval": [], "plwlab": []}
    for r in range(args.rounds):
        for kind in times:
            cmd = [sys.executable, __file__, "--rouge", kind, "--n", str(args.n)]
            out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            times[kind].append(out["seconds"])
            print(f"round {r + 1} {kind:<8} {out['seconds']:8.2f} s for {out['count']} questions", flush=True)
    lm, ours = (statistics.median(times[k]) for k in ("lm_eval", "plwlab"))
    print(f"\n| TruthfulQA-gen scoring, {args.n} questions | seconds (median of {args.rounds}) |\n|---|---|")
    print(f"| lm-eval's process_results_gen (ROUGE with a 1,000-resample bootstrap per pair) | {lm:.2f} |")
    print(f"| plwlab.evaluation.truthfulqa (the same scores, no bootstrap) | {ours:.2f} |")
    print(f"RATIO truthfulqa_scoring_speedup {lm / ours:.1f}")


HARNESS_TASKS = {"piqa": ("piqa", 0), "winogrande": ("winogrande", 0), "truthfulqa_mc2": ("truthfulqa/mc_task_2021-10.json", 0)}


def harness_tasks(task_dir: Path) -> list[str]:
    """The harness section's tasks from the local files ($PLWLAB_DATA), as plwlab prepares them."""
    from plwlab.evaluation.harness import prepare_task

    return [prepare_task(name, task_dir, shots, str(DATA / data)) for name, (data, shots) in HARNESS_TASKS.items()]


def harness_contender(kind: str, task_dir: Path, limit: int) -> dict[str, float]:
    """One process's harness run: ``plwlab`` (shared contexts once), ``plwlab-no-sharing`` (lm-eval's HFLM in
    plwlab's run_lm_eval) or ``cli`` (lm-eval's own command line); returns each task's first metric and seconds."""
    if kind == "cli":
        out = task_dir / "cli_out"
        cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
               f"pretrained={model_dir()},dtype=float32,add_bos_token=False", "--tasks", ",".join(HARNESS_TASKS),
               "--include_path", str(task_dir), "--limit", str(limit), "--batch_size", "8", "--device", "cpu",
               "--output_path", str(out), "--seed", "0,0,0,1234"]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
        return {"seconds": seconds, **{t: results[t]["acc,none"] for t in HARNESS_TASKS}}
    from lm_eval.models.huggingface import HFLM

    from plwlab.evaluation.harness import harness_model, run_lm_eval

    start = time.perf_counter()
    model, tokenizer = _load(model_dir())
    run = argparse.Namespace(model=model, tokenizer=tokenizer)
    lm = harness_model(run, None, 8, "cpu", "float32", False) if kind == "plwlab" else HFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu", add_bos_token=False)  # fmt: skip
    rows = run_lm_eval(lm, list(HARNESS_TASKS), task_dir, limit)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, **{b: score for b, m, score, _, _ in rows if m == "acc"}}


def harness(args: argparse.Namespace) -> None:
    task_dir = Path(tempfile.mkdtemp())
    harness_tasks(task_dir)
    times: dict[str, list[float]] = {"plwlab": [], "plwlab-no-sharing": [], "cli": []}
    scores: dict[str, dict[str, float]] = {}
    for r in range(args.rounds):
        for kind in times:
            cmd = [sys.executable, __file__, "--harness", kind, "--task-dir", str(task_dir), "--n", str(args.n)]
            out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            times[kind].append(out.pop("seconds"))
            scores[kind] = out
            print(f"round {r + 1} {kind:<18} {times[kind][-1]:8.1f} s {out}", flush=True)
    print(f"\n| lm-eval, {', '.join(HARNESS_TASKS)} (first {args.n} items each), SmolLM2 fp32, batch 8 | seconds "
          f"(median of {args.rounds}, process wall) | acc |\n|---|---|---|")  # fmt: skip
    for kind in times:
        print(f"| {kind} | {statistics.median(times[kind]):.1f} | {scores[kind]} |")
    cli = statistics.median(times["cli"])
    print(f"RATIO plwlab_vs_lm_eval_cli_time {statistics.median(times['plwlab']) / cli:.3f}")
    print(f"RATIO no_sharing_vs_lm_eval_cli_time {statistics.median(times['plwlab-no-sharing']) / cli:.3f}")
    print(f"SAME_SCORES {scores['plwlab'] == scores['cli'] == scores['plwlab-no-sharing']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", nargs="?", choices=("generation", "truthfulqa", "harness"), default="generation")
    parser.add_argument("--n", type=int, default=64, help="prompts (generation) or questions (truthfulqa)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-served", action="store_true", help="leave out the served engine")
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--rouge", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--harness", help=argparse.SUPPRESS)
    parser.add_argument("--task-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        seconds, count = CONTENDERS[args.contender](model_dir(), prompts(args.n), args.max_new_tokens, args.batch)
        print(json.dumps({"seconds": seconds, "count": count}))
    elif args.rouge:
        seconds, count = contender_rouge(args.rouge, args.n)
        print(json.dumps({"seconds": seconds, "count": count}))
    elif args.harness:
        print(json.dumps(harness_contender(args.harness, args.task_dir, args.n)))
    else:
        {"generation": generation, "truthfulqa": truthfulqa, "harness": harness}[args.section](args)


if __name__ == "__main__":
    main()
