"""Preprocessing speed on Alpaca 52K with the LLaMA tokenizer: plwlab's batched tokenization vs Stanford Alpaca's
per-example preprocessing (``_tokenize_fn``: one ``tokenizer(text, return_tensors="pt", padding="longest",
max_length=..., truncation=True)`` call per source and per full example), same tokenizer; ids and masks must be
identical. Also times a warm load from the tokenized-data cache (every run of a sweep after the first).

    python benchmarks/bench_preprocess.py [--alpaca PATH] [--tokenizer PATH] [--limit N]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from plwlab.alpaca import alpaca_prompt, load_records
from plwlab.tokenization import cached_tokenize, tokenize_examples
from plwlab.model import load_tokenizer

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
    args = parser.parse_args()
    if not Path(args.alpaca).exists():
        print(f"skipped: {args.alpaca} not found")
        return
    tokenizer = load_tokenizer(args.tokenizer)
    tokenizer.pad_token = tokenizer.unk_token  # Stanford adds [PAD]; padding="longest" pads nothing for one text
    records = load_records(args.alpaca, on_invalid="skip")[: args.limit]
    # Fast path first: each measurement starts without the other's millions of live objects (Python's
    # generational GC otherwise slows whichever runs second).
    t0 = time.perf_counter()
    fast, _ = tokenize_examples(records, tokenizer, 512)
    t_fast = time.perf_counter() - t0
    fast = [(e.input_ids, e.completion_mask) for e in fast]
    t0 = time.perf_counter()
    baseline = stanford_preprocess(records, tokenizer, 512)
    t_base = time.perf_counter() - t0
    mismatches = [i for i, (b, f) in enumerate(zip(baseline, fast)) if b != f]
    identical = not mismatches
    del baseline, fast
    with tempfile.TemporaryDirectory() as cache:
        cached_tokenize(records, tokenizer, 512, cache)
        t0 = time.perf_counter()
        cached_tokenize(records, tokenizer, 512, cache)
        t_cache = time.perf_counter() - t0
    print(f"examples: {len(records)}")
    print(f"Stanford per-example: {t_base:.2f} s | plwlab batched: {t_fast:.2f} s | warm cache: {t_cache:.2f} s")
    print(f"identical ids and masks: {identical}" + (f" ({len(mismatches)} differ, e.g. {mismatches[:5]})" if mismatches else ""))
    print(f"RATIO batched vs per-example: {t_base / t_fast:.1f}x ; warm cache vs per-example: {t_base / t_cache:.1f}x")


if __name__ == "__main__":
    main()
