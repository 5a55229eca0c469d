"""Regenerate the bundled offline assets in src/plwlab/assets/ from the full Alpaca 52K JSON.

    python tools/make_assets.py ../shared/data/alpaca/alpaca_data.json

Writes ``alpaca_sample.json`` (a seeded random sample, CC BY-NC 4.0, see assets/README.md),
``chat_sample.jsonl`` (the same 400 examples chained into multi-turn ``messages`` conversations) and
``tiny_tokenizer/`` (a byte-level BPE trained here on Alpaca text, so the default job needs no download).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ASSETS = Path(__file__).resolve().parents[1] / "src" / "plwlab" / "assets"
SAMPLE_SIZE = 400
TOKENIZER_CORPUS = 10_000
VOCAB_SIZE = 2048
EXCHANGES = (1, 2, 3, 2)  # exchanges per conversation, cycled: 8 Alpaca examples make 4 conversations
SYSTEM_PROMPT = "You are a helpful assistant. Answer the user's request."


def chat_sample(sample: list[dict[str, str]]) -> list[dict[str, list[dict[str, str]]]]:
    """Alpaca examples chained into ``messages`` conversations of 1-3 exchanges (every 4th with a system prompt)."""
    conversations, i, k = [], 0, 0
    while i < len(sample):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}] if k % 4 == 3 else []
        for r in sample[i : i + EXCHANGES[k % len(EXCHANGES)]]:
            user = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
        i, k = i + EXCHANGES[k % len(EXCHANGES)], k + 1
        conversations.append({"messages": messages})
    return conversations


def main(alpaca_json: str) -> None:
    records = json.loads(Path(alpaca_json).read_text())
    rng = random.Random(42)
    sample = [records[i] for i in sorted(rng.sample(range(len(records)), SAMPLE_SIZE))]
    (ASSETS / "alpaca_sample.json").write_text(json.dumps(sample, indent=1, ensure_ascii=False) + "\n")
    write_chat_sample(sample)

    corpus = [" ".join(r.values()) for r in rng.sample(records, TOKENIZER_CORPUS)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(ASSETS / "tiny_tokenizer")


def write_chat_sample(sample: list[dict[str, str]]) -> None:
    lines = (json.dumps(c, ensure_ascii=False) for c in chat_sample(sample))
    (ASSETS / "chat_sample.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
