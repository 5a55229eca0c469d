"""Share of pad tokens processed on AlpacaData at max length 512, for padded, length-grouped and packed batches
(one epoch of the real samplers), with the LLaMA tokenizer.

    python benchmarks/bench_batching.py [--alpaca PATH] [--tokenizer PATH] [--batch-size 4]
"""

import argparse
from pathlib import Path

from plwlab.data.alpaca import load_records
from plwlab.data.batching import GlobalBatchSampler, pack_examples, padding_share
from plwlab.data.tokenization import cached_tokenize
from plwlab.training.model import load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alpaca", default=str(SHARED / "alpaca" / "alpaca_data.json"))
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizer" / "llama_tokenizer.model"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cache-dir", default="outputs/data")
    args = parser.parse_args()
    if not Path(args.alpaca).exists():
        print(f"skipped: {args.alpaca} not found")
        return
    tokenizer = load_tokenizer(args.tokenizer)
    examples, _ = cached_tokenize(load_records(args.alpaca, on_invalid="skip"), tokenizer, 512, args.cache_dir)
    lengths = [len(e.input_ids) for e in examples]
    b = args.batch_size

    def share(item_lengths, group):
        order = list(GlobalBatchSampler(item_lengths, micro_batch=b, seed=42, group_size=group))
        return padding_share(item_lengths, [order[i : i + b] for i in range(0, len(order), b)])

    rows = pack_examples(lengths, 512)
    row_lengths = [sum(lengths[i] for i in row) for row in rows]
    padded, grouped, packed = share(lengths, 0), share(lengths, 50 * b), share(row_lengths, 0)
    print(f"examples {len(lengths)}, tokens {sum(lengths)}, packed rows {len(rows)} (fill {sum(lengths) / (512 * len(rows)):.2%})")
    print(f"pad share, batch {b}: padded {padded:.2%} | length-grouped {grouped:.2%} | packed {packed:.2%}")
    print(f"RATIO tokens processed padded/packed: {(1 - packed) / (1 - padded):.2f}x")


if __name__ == "__main__":
    main()
