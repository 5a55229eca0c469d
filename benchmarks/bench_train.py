"""Training throughput of the tiny model on the bundled Alpaca sample (CPU): real (non-pad) tokens per second
for padded, length-grouped and packed batches of the same examples, with the same number of tokens per step
budget (padded/grouped: 8 examples per micro-batch; packed: rows of up to 512 tokens, 2 rows per micro-batch).

    python benchmarks/bench_train.py [--steps 40]
"""

import argparse
import time

import torch

from plwlab.config import ASSETS
from plwlab.datamodule import AlpacaDataModule
from plwlab.loss import prompt_weighted_loss
from plwlab.model import load_model
from plwlab.module import PLWModule

TINY = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 1024}  # fmt: skip


def run(batching: str, batch_size: int, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    loaded = load_model(name="bench", tokenizer=str(ASSETS / "tiny_tokenizer"), config=TINY)
    module = PLWModule(loaded.model, plw=0.1)
    dm = AlpacaDataModule(loaded.tokenizer, path=str(ASSETS / "alpaca_sample.json"), val_size=0, batch_size=batch_size,
                          batching=batching, cache_dir=None)  # fmt: skip
    dm.setup("fit")
    loader = dm._loader(dm.train_set, batch_size, dm.train_sampler())
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    real = processed = 0
    batches = iter(loader)
    start = None
    for step in range(steps + 3):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        if step == 3:  # warm-up done
            start, real, processed = time.perf_counter(), 0, 0
        out = prompt_weighted_loss(module(batch), batch["completion_mask"], batch["token_mask"], 0.1)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        real += int((batch["input_ids"] != loaded.tokenizer.pad_token_id).sum())
        processed += batch["input_ids"].numel()
    elapsed = time.perf_counter() - start
    return real / elapsed, 1 - real / processed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {name: run(name, bs, args.steps) for name, bs in (("padded", 8), ("length_grouped", 8), ("packed", 2))}
    for name, (tps, pad) in results.items():
        print(f"{name:15s} {tps:8.0f} real tokens/s   pad share {pad:.1%}")
    base = results["padded"][0]
    print(f"RATIO packed/padded: {results['packed'][0] / base:.2f}x ; length-grouped/padded: {results['length_grouped'][0] / base:.2f}x")


if __name__ == "__main__":
    main()
