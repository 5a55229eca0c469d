"""Preprocessing speed on Alpaca 52K with the LLaMA tokenizer: plwlab's batched tokenization vs Stanford Alpaca's
per-example preprocessing (``_tokenize_fn``: one ``tokenizer(text, return_tensors="pt", padding="longest",
max_length=..., truncation=True)`` call per source and per full example), same tokenizer; ids and masks must be
identical. Also times a warm load from the tokenized-data cache (every run of a sweep after the first). The three
alternate over ``--repeats`` rounds; RATIO lines give the ratio of medians and the range of per-round ratios.

    python benchmarks/bench_preprocess.py [--alpaca PATH] [--tokenizer PATH] [--limit N] [--repeats 3]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from plwlab.data.alpaca import alpaca_prompt, load_records
from plwlab.data.tokenization import cached_tokenize, tokenize_examples
from plwlab.training.model import load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def stanford_preprocess(records, tokenizer, max_length):
    """tatsu-lab/stanford_alpaca train.py preprocess(): sources and examples tokenized one text at a time."""
    sources = [alpaca_prompt(r["instruction"], r["input"]) for r in records]
    examples = [s + r["output"] + tokenizer.eos_token for s, r in zip(sources, records)]

    def tokenize_fn(strings):  # Stanford's tokenizer adds bos itself; this one is told to, as an id
        tokenized = [tokenizer(t, return_tensors="pt", padding="longest", max_length=max_length - 1, truncation=True,
                               add_special_tokens=False) for t in strings]  # fmt: skip
        return [torch.cat([torch.tensor([tokenizer.bos_token_id]), t.input_ids[0]]) for t in tokenized]

    full, src = tokenize_fn(examples), tokenize_fn(sources)
    out = []
    for ids, s in zip(full, src):
        n = len(s)
        out.append((ids.tolist(), [0] * min(n, len(ids)) + [1] * max(len(ids) - n, 0)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alpaca", default=str(SHARED / "alpaca" / "alpaca_data.json"))
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizer" / "llama_tokenizer.model"))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not Path(args.alpaca).exists():
        print(f"skipped: {args.alpaca} not found")
        return
    tokenizer = load_tokenizer(args.tokenizer)
    tokenizer.pad_token = tokenizer.unk_token  # Stanford adds [PAD]; padding="longest" pads nothing for one text
    records = load_records(args.alpaca)[: args.limit]
    times: dict[str, list[float]] = {"batched": [], "stanford": [], "cache": []}
    identical = True
    with tempfile.TemporaryDirectory() as cache:
        cached_tokenize(records, tokenizer, 512, cache)  # fill the cache once
        for _ in range(args.repeats):
            # Fast path first: each measurement starts without the other's millions of live objects (Python's
            # generational GC otherwise slows whichever runs second).
            t0 = time.perf_counter()
            fast, _ = tokenize_examples(records, tokenizer, 512)
            times["batched"].append(time.perf_counter() - t0)
            fast = [(e.input_ids, e.completion_mask) for e in fast]
            t0 = time.perf_counter()
            baseline = stanford_preprocess(records, tokenizer, 512)
            times["stanford"].append(time.perf_counter() - t0)
            mismatches = [i for i, (b, f) in enumerate(zip(baseline, fast)) if b != f]
            identical = identical and not mismatches
            del baseline, fast
            t0 = time.perf_counter()
            cached_tokenize(records, tokenizer, 512, cache)
            times["cache"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"examples: {len(records)}; {args.repeats} alternating rounds")
    for name, label in (("stanford", "Stanford per-example"), ("batched", "plwlab batched"), ("cache", "warm cache")):
        print(f"{label:22s} median {med[name]:6.2f} s   runs: {', '.join(f'{t:.2f}' for t in times[name])}")
    print(f"identical ids and masks in every round: {identical}" + (f" (last round: {len(mismatches)} differ, e.g. "
                                                                    f"{mismatches[:5]})" if mismatches else ""))  # fmt: skip
    for name, label in (("batched", "batched vs per-example"), ("cache", "warm cache vs per-example")):
        ratios = [s / f for s, f in zip(times["stanford"], times[name])]
        print(f"RATIO {label}: {med['stanford'] / med[name]:.1f}x (rounds {min(ratios):.1f}x to {max(ratios):.1f}x)")


if __name__ == "__main__":
    main()
