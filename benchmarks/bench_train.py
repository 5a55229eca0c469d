"""Training throughput, CPU, 1 thread: plwlab's default path (``train()`` through Lightning with every default
callback, as train.py runs it) against a bare PyTorch loop on plwlab's own batches, the HF Trainer (default, and
group_by_length) and TRL's SFTTrainer (completion-only loss; padding-free; packed) when TRL is installed.

Fair by construction:
- every contender trains on the same examples: the training split plwlab's datamodule draws (``data.limit=170``,
  10 for validation, seed 0), tokenized once by plwlab, from the same initial weights (the same seed);
- tokens are counted at the model's input: a forward pre-hook adds the non-pad input ids of every training
  forward (grad enabled, model in training mode), so a loader that fetches ahead counts nothing extra;
- time runs from the end of optimizer step ``WARMUP`` to the end of the last one (a global optimizer-step hook):
  startup, the first steps and the teardown (saving) are outside; each step's data loading, callbacks and logging
  are inside. plwlab runs without its validation (the others have none);
- each contender runs in its own process (``--contender NAME`` prints one JSON line), contenders alternate within
  each round, and the median over rounds is reported.

Model: a random 4-layer, 256-wide LLaMA; tokenizer: LLaMA's (vocab 32,001 with [PAD]) from ../shared/data when
present, else the bundled tiny one. Prints RATIO lines measured in this one invocation.

    python benchmarks/bench_train.py [--epochs 1] [--rounds 3] [--contenders plwlab,bare,hf,...]
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
from typing import Any

import lightning as L
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from plwlab import ASSETS, CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
LLAMA_TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizer" / "llama_tokenizer.model"
MODEL = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 4}  # fmt: skip
WARMUP, BATCH, LR, PLW = 3, 8, 3e-3, 0.1


class Meter:
    """Real tokens at a model's input after optimizer step ``WARMUP``, and the time from the end of that step to
    the end of the last one, for any training loop."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id
        self.step_ends: list[float] = []
        self.counts: list[tuple[int, torch.Tensor]] = []  # (optimizer steps done before the forward, real tokens)
        self.handles = [register_optimizer_step_post_hook(lambda *_: self.step_ends.append(time.perf_counter()))]

    def attach(self, model: torch.nn.Module) -> None:
        self.handles.append(model.register_forward_pre_hook(self._forward, with_kwargs=True))

    def close(self) -> None:
        """Remove the hooks (the optimizer-step one is global)."""
        for handle in self.handles:
            handle.remove()

    def _forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and torch.is_grad_enabled():
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            self.counts.append((len(self.step_ends), (ids != self.pad_id).sum()))

    def result(self) -> dict[str, float]:
        tokens = sum(int(n) for done, n in self.counts if done >= WARMUP)
        return {"tokens": tokens, "seconds": self.step_ends[-1] - self.step_ends[WARMUP - 1], "steps": len(self.step_ends)}


METER: Meter | None = None


class MeterCallback(L.Callback):
    """Attaches :data:`METER` to plwlab's model when fitting starts (``+callbacks.meter``)."""

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        METER.pad_id = trainer.datamodule.tokenizer.pad_token_id
        METER.attach(module.model)


def tokenizer_path() -> str:
    return str(LLAMA_TOKENIZER) if LLAMA_TOKENIZER.exists() else str(ASSETS / "tiny_tokenizer")


def overrides(out: Path, epochs: int, batching: str | None = None) -> list[str]:
    model = [f"model.config.{k}={v}" for k, v in MODEL.items()]
    data = ["data.limit=170", "data.val_size=10", "data.cache_dir=null", f"data.batch_size={BATCH}"]
    data += [f"data.batching={batching}"] if batching else []
    return [f"model.tokenizer={tokenizer_path()}", "model.add_pad_token=true", *model, *data, f"trainer.max_epochs={epochs}",
            "+trainer.limit_val_batches=0", "logger=csv", "callbacks.progress=null", "+trainer.enable_progress_bar=false",
            f"optim.lr={LR}", f"plw={PLW}", f"paths.output_dir={out}", f"paths.run_dir={out / 'run'}", "seed=0"]  # fmt: skip


def compose(out: Path, epochs: int, batching: str | None = None, extra: tuple[str, ...] = ()) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from plwlab.config import register
    from plwlab.training.smollm2 import RESOLVERS

    register(RESOLVERS)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=overrides(out, epochs, batching) + list(extra))


def plwlab_data(epochs: int) -> tuple[Any, Any, Any]:
    """The config, initial model and set-up datamodule of plwlab's default path (seed 0)."""
    from plwlab.data.datamodule import InstructionDataModule
    from plwlab.training.model import load_model

    cfg = compose(Path(tempfile.gettempdir()), epochs)
    torch.manual_seed(cfg.seed)
    loaded = load_model(name="bench", tokenizer=tokenizer_path(), config=dict(cfg.model.config), add_pad_token=True)
    kwargs = {k: v for k, v in cfg.data.items() if k != "name"}
    dm = InstructionDataModule(loaded.tokenizer, name=cfg.data.name, seed=cfg.seed, **kwargs)
    dm.setup("fit")
    return cfg, loaded, dm


def run_plwlab(epochs: int, batching: str | None) -> dict[str, float]:
    """plwlab's ``train()`` with its default callbacks and the meter's."""
    from plwlab.training.train import train

    global METER
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(Path(tmp), epochs, batching, ("+callbacks.meter._target_=__main__.MeterCallback",))
        METER = Meter(pad_id=-1)  # the tokenizer's, once fitting starts
        train(cfg)
    return METER.result()


def run_bare(epochs: int) -> dict[str, float]:
    """The minimum around the same math on plwlab's batches, collated before timing: forward, plwlab's pure loss
    functions, backward, fused AdamW; no Lightning, no callbacks, no logging. The ratio to it is the overhead."""
    from plwlab.data.segments import COMPLETION_IDS, weight_table
    from plwlab.training.loss import next_token_nll, segment_weighted_loss

    cfg, loaded, dm = plwlab_data(epochs)
    batches = []
    for epoch in range(epochs):
        sampler = dm.train_sampler()
        sampler.set_epoch(epoch)
        batches += list(dm._loader(dm.train_set, dm.batch_size, sampler))
    meter = Meter(loaded.tokenizer.pad_token_id)
    model = loaded.model.train()
    meter.attach(model)
    weights = weight_table(cfg.plw, None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    for batch in batches:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        logits = model(**inputs, use_cache=False).logits
        out = segment_weighted_loss(next_token_nll(logits, batch["input_ids"]), batch["segment_ids"], batch["token_mask"],
                                    weights, COMPLETION_IDS, cfg.loss.normalization)  # fmt: skip
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return meter.result()


def _hf_examples(epochs: int) -> tuple[Any, list[dict[str, list[int]]]]:
    """The initial model and plwlab's training examples as input ids and completion masks."""
    _, loaded, dm = plwlab_data(epochs)
    return loaded, [{"input_ids": e.input_ids, "completion_mask": e.completion_mask} for e in dm.train_set.examples]


def run_hf(epochs: int, sampling: str) -> dict[str, float]:
    """HF Trainer, batch 8, fused AdamW, prompt tokens masked (PLW 0: it has no fractional weight);
    ``sampling="group_by_length"`` is its fastest built-in option."""
    from transformers import Trainer, TrainingArguments

    loaded, examples = _hf_examples(epochs)
    examples = [{"input_ids": e["input_ids"], "labels": [t if c else -100 for t, c in zip(e["input_ids"], e["completion_mask"])]}
                for e in examples]  # fmt: skip
    pad = loaded.tokenizer.pad_token_id
    meter = Meter(pad)
    meter.attach(loaded.model)

    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(i["input_ids"]) for i in items)
        fill = [width - len(i["input_ids"]) for i in items]
        return {"input_ids": torch.tensor([i["input_ids"] + [pad] * f for i, f in zip(items, fill)]),
                "attention_mask": torch.tensor([[1] * len(i["input_ids"]) + [0] * f for i, f in zip(items, fill)]),
                "labels": torch.tensor([i["labels"] + [-100] * f for i, f in zip(items, fill)])}  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        extra = {"train_sampling_strategy": sampling} if sampling != "random" else {}
        args = TrainingArguments(output_dir=tmp, num_train_epochs=epochs, learning_rate=LR, per_device_train_batch_size=BATCH,
                                 save_strategy="no", report_to=[], logging_strategy="no", disable_tqdm=True, seed=0,
                                 use_cpu=True, **extra)  # fmt: skip
        Trainer(model=loaded.model, args=args, train_dataset=examples, data_collator=collate).train()
    return meter.result()


def run_trl(epochs: int, packing: bool) -> dict[str, float]:
    """TRL's SFTTrainer on the pre-tokenized examples (already truncated to 512 by plwlab): completion-only loss,
    padding-free (the examples of a batch concatenated, position ids restarting); ``packing``: best-fit-decreasing
    packing into 512-token rows, 8 rows a batch. TRL's own defaults bf16=True and gradient_checkpointing=True are
    turned off, as every other contender computes in fp32 without checkpointing (with them TRL took 4.1x as long here)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    loaded, examples = _hf_examples(epochs)
    meter = Meter(loaded.tokenizer.pad_token_id)
    meter.attach(loaded.model)
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, num_train_epochs=epochs, learning_rate=LR, per_device_train_batch_size=BATCH,
                         save_strategy="no", report_to=[], logging_strategy="no", disable_tqdm=True, seed=0, use_cpu=True,
                         completion_only_loss=True, padding_free=True, packing=packing, max_length=512 if packing else None,
                         bf16=False, gradient_checkpointing=False)  # fmt: skip
        trainer = SFTTrainer(model=loaded.model, args=args, train_dataset=Dataset.from_list(examples),
                             processing_class=loaded.tokenizer)  # fmt: skip
        trainer.train()
    return meter.result()


CONTENDERS = {
    "plwlab": ("plwlab default", lambda e: run_plwlab(e, None)),
    "plwlab_padded": ("plwlab data.batching=padded", lambda e: run_plwlab(e, "padded")),
    "plwlab_packed": ("plwlab data.batching=packed", lambda e: run_plwlab(e, "packed")),
    "bare": ("bare loop, plwlab's batches", run_bare),
    "hf": ("HF Trainer default", lambda e: run_hf(e, "random")),
    "hf_group": ("HF Trainer group_by_length", lambda e: run_hf(e, "group_by_length")),
    "trl": ("TRL SFTTrainer padding-free", lambda e: run_trl(e, False)),
    "trl_packed": ("TRL SFTTrainer packing (bfd)", lambda e: run_trl(e, True)),
}


def contender(name: str, epochs: int) -> None:
    """Run one contender in this process and print its JSON line."""
    import logging
    import warnings

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    print("RESULT " + json.dumps(CONTENDERS[name][1](epochs)), flush=True)


def measure(name: str, epochs: int) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--contender", name, "--epochs", str(epochs)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"contender {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--contenders", default="plwlab,bare,hf,hf_group,trl,trl_packed", help=f"of {', '.join(CONTENDERS)}")
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        return contender(args.contender, args.epochs)
    names = args.contenders.split(",")
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contender(s) {unknown}: choose from {', '.join(CONTENDERS)}")
    try:
        import trl  # noqa: F401
    except ModuleNotFoundError:
        print("TRL: not installed, its contenders skipped (pip install trl, or the dev extra)")
        names = [n for n in names if not n.startswith("trl")]
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(measure(name, args.epochs))
    _, loaded, dm = plwlab_data(args.epochs)
    print(f"tokenizer {Path(tokenizer_path()).name}, vocab {len(loaded.tokenizer)}; {len(dm.train_set.examples)} examples "
          f"(plwlab's default batching: {dm.batching}) "
          f"x {args.epochs} epoch(s), batch {BATCH}; real tokens/s at the model's input after {WARMUP} warm-up steps, "
          f"median of {args.rounds} rounds, each run in its own process")  # fmt: skip
    median = {n: statistics.median(x["tokens"] / x["seconds"] for x in v) for n, v in runs.items()}
    for name, v in runs.items():
        speeds = ", ".join(f"{x['tokens'] / x['seconds']:.0f}" for x in v)
        print(f"{CONTENDERS[name][0]:32s} {median[name]:8.0f} tokens/s  ({v[0]['steps']} steps, {v[0]['tokens']} tokens timed)  runs: {speeds}")
    if "plwlab" in median:
        for other, goal in (("bare", " (goal >= 0.97)"), ("hf", ""), ("hf_group", ""), ("trl", ""), ("trl_packed", "")):
            if other in median:
                print(f"RATIO plwlab default / {CONTENDERS[other][0]}: {median['plwlab'] / median[other]:.3f}{goal}")


if __name__ == "__main__":
    main()
