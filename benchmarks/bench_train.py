"""Training throughput, CPU, 1 thread: plwlab's default path (train.py through Lightning, every default callback)
against a bare PyTorch loop on the very same batches and against the HF Trainer in its default configuration
(and its best one, length grouping), all from the same initial weights, on the same 160 Alpaca examples.

Model: a random 4-layer, 256-wide LLaMA; tokenizer: LLaMA's (vocab 32,001 with [PAD]) from ../shared/data when
present, else the bundled tiny one. Throughput is real (non-pad) tokens per second over the steps after a 3-step
warm-up; each configuration runs ``--repeats`` times, alternating, and the median is reported. TRL is an optional
extra: skipped when not installed. Prints RATIO lines measured in this one invocation.

    python benchmarks/bench_train.py [--epochs 1] [--repeats 3] [--plwlab-batching padded,packed]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from plwlab import ASSETS, CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
LLAMA_TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizer" / "llama_tokenizer.model"
MODEL = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 4}  # fmt: skip
N_TRAIN, WARMUP = 160, 3


class StepTimer:
    """Real tokens and wall time of every training step after the warm-up (a Lightning callback), written to
    ``path`` as JSON when training ends."""

    def __init__(self, path: str) -> None:
        self.path, self.tokens, self.start, self.end = path, 0, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == WARMUP and self.start is None:
            self.start = time.perf_counter()
        if self.start is not None:
            self.tokens += int(batch["token_mask"].sum())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.end = time.perf_counter()

    def on_train_end(self, trainer, module) -> None:  # noqa: ANN001
        Path(self.path).write_text(json.dumps({"tokens": self.tokens, "seconds": self.end - self.start}))


def _lightning_callback(cls: type) -> type:
    import lightning as L

    return type(cls.__name__, (cls, L.Callback), {})


def overrides(tokenizer: str, batching: str | None, out: Path) -> list[str]:
    model = [f"model.config.{k}={v}" for k, v in MODEL.items()]
    data = ["data.limit=170", "data.val_size=10", "data.cache_dir=null"] + ([f"data.batching={batching}"] if batching else [])
    return [f"model.tokenizer={tokenizer}", "model.add_pad_token=true", *model, *data, "trainer.max_epochs=2",
            "logger=csv", "callbacks.progress=null", "+trainer.enable_progress_bar=false", f"paths.output_dir={out}",
            f"paths.run_dir={out / 'run'}", "seed=0"]  # fmt: skip


def plwlab_run(tokenizer: str, batching: str | None, epochs: int) -> float:
    """Real tokens/s of plwlab's train() with its default callbacks (and a step timer)."""
    from hydra import compose, initialize_config_dir

    from plwlab.training.config import register
    from plwlab.training.train import train

    register()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        timing = out / "timing.json"
        extra = [f"trainer.max_epochs={epochs}", "+callbacks.timer._target_=bench_train_timer.Timer",
                 f"+callbacks.timer.path={timing}"]  # fmt: skip
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=overrides(tokenizer, batching, out) + extra)
        train(cfg)
        result = json.loads(timing.read_text())
    return result["tokens"] / result["seconds"]


def plwlab_batches(tokenizer: str, epochs: int) -> tuple[list[dict[str, torch.Tensor]], object, int]:
    """The batches plwlab's default path trains on (its datamodule and sampler), the initial model, and pad id."""
    from hydra import compose, initialize_config_dir

    from plwlab.data.datamodule import InstructionDataModule
    from plwlab.training.config import register
    from plwlab.training.model import load_model

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides(tokenizer, None, Path(tempfile.gettempdir())))
    torch.manual_seed(cfg.seed)
    loaded = load_model(name="bench", tokenizer=tokenizer, config=dict(cfg.model.config), add_pad_token=True)
    kwargs = {k: v for k, v in cfg.data.items() if k not in ("name",)}
    dm = InstructionDataModule(loaded.tokenizer, name=cfg.data.name, seed=cfg.seed, **kwargs)
    dm.setup("fit")
    batches = []
    for epoch in range(epochs):
        sampler = dm.train_sampler()
        sampler.set_epoch(epoch)
        batches += list(dm._loader(dm.train_set, dm.batch_size, sampler))
    return batches, loaded, dm.batching


def bare_loop(batches: list[dict[str, torch.Tensor]], loaded: object, plw: float = 0.1) -> float:
    """The minimum around the same math: forward, plwlab's pure loss functions, backward, fused AdamW step, on
    given batches; no Lightning, no callbacks, no logging. The ratio to it is the framework's overhead."""
    from plwlab.training.loss import completion_mask, next_token_nll, prompt_weighted_loss

    model = loaded.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, fused=True)
    tokens, start = 0, None
    for step, batch in enumerate(batches):
        if step == WARMUP:
            start = time.perf_counter()
        if start is not None:
            tokens += int(batch["token_mask"].sum())
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["token_mask"], use_cache=False).logits
        loss = prompt_weighted_loss(next_token_nll(logits, batch["input_ids"]), completion_mask(batch["segment_ids"]),
                                    batch["token_mask"], plw).loss  # fmt: skip
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return tokens / (time.perf_counter() - start)


def hf_trainer(tokenizer: str, epochs: int, sampling: str = "random") -> float | None:
    """HF Trainer with its defaults (batch 8, fused AdamW, random batches), prompt tokens masked (PLW 0: it has no
    fractional weight), on the same 160 examples tokenized by plwlab; ``sampling="group_by_length"`` is its
    fastest built-in option."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from plwlab.data.alpaca import load_records
    from plwlab.data.tokenization import tokenize_examples
    from plwlab.training.model import load_model

    torch.manual_seed(0)
    loaded = load_model(name="bench", tokenizer=tokenizer, config={"model_type": "llama", **MODEL,
                                                                  "max_position_embeddings": 1024}, add_pad_token=True)  # fmt: skip
    records = load_records(str(ASSETS / "alpaca_sample.json"))[:N_TRAIN]
    examples, _ = tokenize_examples(records, loaded.tokenizer, 512)
    dataset = [{"input_ids": e.input_ids, "labels": [t if c else -100 for t, c in zip(e.input_ids, e.completion_mask)]}
               for e in examples]  # fmt: skip
    pad = loaded.tokenizer.pad_token_id
    counts: list[int] = []

    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(i["input_ids"]) for i in items)
        counts.append(sum(len(i["input_ids"]) for i in items))
        return {"input_ids": torch.tensor([i["input_ids"] + [pad] * (width - len(i["input_ids"])) for i in items]),
                "attention_mask": torch.tensor([[1] * len(i["input_ids"]) + [0] * (width - len(i["input_ids"])) for i in items]),
                "labels": torch.tensor([i["labels"] + [-100] * (width - len(i["labels"])) for i in items])}  # fmt: skip

    clock: dict[str, float] = {}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            if state.global_step == WARMUP:
                clock["start"], clock["first_batch"] = time.perf_counter(), len(counts) - 1

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            clock["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        kwargs = {"train_sampling_strategy": sampling} if sampling != "random" else {}
        args = TrainingArguments(output_dir=tmp, num_train_epochs=epochs, learning_rate=3e-3, save_strategy="no",
                                 report_to=[], logging_strategy="no", disable_tqdm=True, seed=0, use_cpu=True,
                                 **kwargs)  # fmt: skip
        trainer = Trainer(model=loaded.model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[Timer()])
        trainer.train()
    return sum(counts[clock["first_batch"] :]) / (clock["end"] - clock["start"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plwlab-batching", default="", help="also time these data.batching values, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    sys.modules["bench_train_timer"] = type(sys)("bench_train_timer")
    sys.modules["bench_train_timer"].Timer = _lightning_callback(StepTimer)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    tokenizer = str(LLAMA_TOKENIZER) if LLAMA_TOKENIZER.exists() else str(ASSETS / "tiny_tokenizer")
    batches, loaded, default_batching = plwlab_batches(tokenizer, args.epochs)
    initial = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    configs = {f"plwlab default ({default_batching})": lambda: plwlab_run(tokenizer, None, args.epochs),
               "bare loop, same batches": lambda: (loaded.model.load_state_dict(initial), bare_loop(batches, loaded))[1],
               "HF Trainer default": lambda: hf_trainer(tokenizer, args.epochs),
               "HF Trainer group_by_length": lambda: hf_trainer(tokenizer, args.epochs, "group_by_length")}  # fmt: skip
    for b in filter(None, args.plwlab_batching.split(",")):
        configs[f"plwlab {b}"] = lambda b=b: plwlab_run(tokenizer, b, args.epochs)
    speeds: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, run in configs.items():
            speeds[name].append(run())
    try:
        import trl  # noqa: F401

        print("TRL is installed but its SFTTrainer comparison is not part of this script yet")
    except ModuleNotFoundError:
        print("TRL: not installed, skipped")
    print(f"tokenizer {Path(tokenizer).name}, vocab {len(loaded.tokenizer)}; {N_TRAIN} examples x {args.epochs} epochs, "
          f"{len(batches)} steps, median of {args.repeats} (tokens/s after {WARMUP} warm-up steps)")  # fmt: skip
    median = {name: statistics.median(v) for name, v in speeds.items()}
    for name, v in speeds.items():
        print(f"{name:32s} {median[name]:8.0f} real tokens/s   runs: {', '.join(f'{x:.0f}' for x in v)}")
    ours = median[f"plwlab default ({default_batching})"]
    print(f"RATIO plwlab default / bare loop on the same batches: {ours / median['bare loop, same batches']:.3f} (goal >= 0.97)")
    print(f"RATIO plwlab default / HF Trainer default: {ours / median['HF Trainer default']:.3f} (goal >= 1.5)")
    print(f"RATIO plwlab default / HF Trainer group_by_length: {ours / median['HF Trainer group_by_length']:.3f}")


if __name__ == "__main__":
    main()
