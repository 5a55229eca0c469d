"""The paper's Alpaca dataset variants and token-length statistics (Rg) of any instruction dataset.

Rg (generation ratio) of a dataset = mean completion tokens / mean prompt tokens, where the prompt is the
``instruction`` plus the ``input`` field and the completion is ``output``; each field is tokenized on its own
without special tokens or the Alpaca template. (With the LLaMA tokenizer this gives 3.28 for Alpaca 52K, the
paper reports 3.27.)

Variants (see :func:`build_variant`):

- ``short``: every long-completion example (completion longer than prompt, in tokens) is *inverted*: new input =
  old output, new output = old instruction, new instruction = "Predict the prompt that generated the following
  AI output." (no input) or "Predict the prompt that generated the below AI output given the following context.
  Context: <old input>".
- ``rg_target`` (Medium: 1.0, Tiny: 0.042, or any value): examples are ranked by their own completion/prompt ratio,
  highest first (ties: original order), and the first *k* of them are inverted, *k* chosen to bring the dataset
  Rg nearest the target. Inverting exactly the examples with ratio > 1 is ``short``, so this is the same
  procedure stopped at another ratio. A target below what inversion reaches is met by then dropping examples in
  the same ranking (highest remaining ratio first), and a target above the source Rg by dropping the
  lowest-ratio examples. The result is within ``tolerance`` (default 1%) of the target or an error is raised.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import track

from plwlab.files import atomic_write


log = logging.getLogger(__name__)

# Stanford Alpaca templates (tatsu-lab/stanford_alpaca train.py). The completion follows "### Response:" directly.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
FIELDS = ("instruction", "input", "output")


class DataError(ValueError):
    """Malformed instruction data; the message names the offending record."""


def alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - Alpaca's field name
    """The Stanford Alpaca prompt for one example (the no-input template when ``input`` is empty)."""
    template = ALPACA_PROMPT_INPUT if input else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=input)


def load_records(path: str, split: str = "train", on_invalid: str = "error", empty_output: str = "keep",
                 columns: dict[str, str] | None = None) -> list[dict[str, str]]:  # fmt: skip
    """Alpaca-format records from a local ``.json`` (a list) / ``.jsonl`` / ``.parquet`` file or, failing that, an
    HF hub id (:func:`plwlab.sources.read_rows`); ``columns`` maps plwlab's field names to the dataset's
    (``{"output": "response"}``).

    Every record needs string ``instruction`` (non-empty) and ``output`` fields; ``input`` may be missing (= "").
    A malformed record raises :class:`DataError` naming it (``on_invalid="error"``) or is skipped, counted and
    reported (``on_invalid="skip"``). A record with an empty ``output`` (28 in Alpaca 52K) is kept, as Stanford's
    training code keeps it (it trains on EOS alone), or skipped and counted with ``empty_output="skip"``.
    """
    from plwlab.sources import read_rows, rename_columns

    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    if empty_output not in ("keep", "skip"):
        raise ValueError(f"empty_output must be 'keep' or 'skip', got {empty_output!r}")
    raw = rename_columns(read_rows(path, split), columns)
    records, problems, n_empty = [], [], 0
    for i, record in enumerate(raw):
        problem = _record_problem(record, i)
        if problem is None and empty_output == "skip" and not record["output"].strip():
            n_empty += 1
        elif problem is None:
            records.append({f: record.get(f, "") for f in FIELDS})
        elif on_invalid == "error":
            raise DataError(f"{path}: {problem}")
        else:
            problems.append(problem)
    if n_empty:
        log.warning("%s: skipped %d records with an empty output (empty_output=skip)", path, n_empty)
    if problems:
        log.warning("%s: skipped %d invalid records, e.g. %s", path, len(problems), "; ".join(problems[:3]))
    if not records:
        skipped = f", {n_empty} with an empty output skipped" if n_empty else ""
        raise DataError(f"{path}: no usable records ({len(raw)} in the file, {len(problems)} invalid{skipped})")
    return records


def _record_problem(record: Any, index: int) -> str | None:
    if not isinstance(record, dict):
        return f"record {index} is a {type(record).__name__}, not an object"
    for field in FIELDS:
        value = record.get(field, "" if field == "input" else None)
        if value is None:
            return f"record {index} has no {field!r} field"
        if not isinstance(value, str):
            return f"record {index} field {field!r} is {type(value).__name__}, not a string"
        if field == "instruction" and not value.strip():
            return f"record {index} has an empty {field!r}"
    return None


INVERT_NO_INPUT = "Predict the prompt that generated the following AI output."
INVERT_WITH_INPUT = "Predict the prompt that generated the below AI output given the following context. Context: {input}"
VARIANTS = ("as_is", "short", "rg_target")
PAPER_RG = {"alpaca_data": 3.27, "alpaca_data_cleaned": 7.83, "alpaca_data_short": 0.082,
            "alpaca_data_medium": 1.0, "alpaca_data_tiny": 0.042}  # fmt: skip


def invert(record: dict[str, str]) -> dict[str, str]:
    """The paper's prompt inversion: predict the instruction from the output (and the input, as context)."""
    instruction = INVERT_WITH_INPUT.format(input=record["input"]) if record["input"] else INVERT_NO_INPUT
    return {"instruction": instruction, "input": record["output"], "output": record["instruction"]}


@dataclass
class FieldLengths:
    """Token counts per example of each field (no special tokens, no template)."""

    instruction: np.ndarray
    input: np.ndarray
    output: np.ndarray

    @property
    def prompt(self) -> np.ndarray:
        return self.instruction + self.input

    @property
    def rg(self) -> float:
        return float(self.output.sum() / max(self.prompt.sum(), 1))


def token_lengths(
    records: Sequence[dict[str, str]], tokenizer: Any, batch_size: int = 4096, progress: bool = False
) -> FieldLengths:
    """Batched token counts of ``instruction``, ``input`` and ``output`` for every record."""
    out: dict[str, list[int]] = {"instruction": [], "input": [], "output": []}
    starts = range(0, len(records), batch_size)
    for start in track(starts, description="tokenizing", disable=not progress, transient=True):
        chunk = records[start : start + batch_size]
        for field, lengths in out.items():
            ids = tokenizer([r[field] for r in chunk], add_special_tokens=False, return_attention_mask=False)["input_ids"]
            lengths.extend(len(x) for x in ids)
    return FieldLengths(**{k: np.asarray(v, dtype=np.int64) for k, v in out.items()})


def short_variant(records: Sequence[dict[str, str]], tokenizer: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """AlpacaDataShort from any source: invert every long-completion example."""
    lengths = token_lengths(records, tokenizer)
    long = lengths.output > lengths.prompt
    out = [invert(r) if is_long else r for r, is_long in zip(records, long, strict=True)]
    return out, {"n_inverted": int(long.sum()), "n_dropped": 0, "rg_source": lengths.rg}


def _best_prefix(numerator: np.ndarray, denominator: np.ndarray, target: float) -> tuple[int, float]:
    """k in 0..n minimising |numerator[k] / denominator[k] - target| (first such k)."""
    ratios = numerator / np.maximum(denominator, 1)
    k = int(np.argmin(np.abs(ratios - target)))
    return k, float(ratios[k])


def rg_target_variant(
    records: Sequence[dict[str, str]], tokenizer: Any, target: float, tolerance: float = 0.01
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Invert (then, if needed, drop) examples in order of decreasing completion/prompt ratio to reach ``target``."""
    if target <= 0:
        raise ValueError(f"target Rg must be > 0, got {target}")
    n = len(records)
    orig = token_lengths(records, tokenizer)
    inv = token_lengths([invert(r) for r in records], tokenizer)
    c0, p0 = orig.output.astype(float), orig.prompt.astype(float)
    order = np.lexsort((np.arange(n), -c0 / np.maximum(p0, 1)))  # highest ratio first, ties by index
    inverted = np.zeros(n, dtype=bool)
    kept = np.ones(n, dtype=bool)

    if target <= orig.rg:
        # completion and prompt totals after inverting the first k ranked examples, k = 0..n
        c = np.concatenate([[c0.sum()], c0.sum() + np.cumsum(inv.output[order] - c0[order])])
        p = np.concatenate([[p0.sum()], p0.sum() + np.cumsum(inv.prompt[order] - p0[order])])
        k, achieved = _best_prefix(c, p, target)
        inverted[order[:k]] = True
        if achieved > target * (1 + tolerance):  # inversion alone cannot go low enough: drop high-ratio examples
            cur_c = np.where(inverted, inv.output, c0)
            cur_p = np.where(inverted, inv.prompt, p0)
            drop_order = np.lexsort((np.arange(n), -cur_c / np.maximum(cur_p, 1)))
            c = cur_c.sum() - np.concatenate([[0], np.cumsum(cur_c[drop_order])])[:-1]
            p = cur_p.sum() - np.concatenate([[0], np.cumsum(cur_p[drop_order])])[:-1]
            m, achieved = _best_prefix(c, p, target)
            kept[drop_order[:m]] = False
    else:  # raise Rg: drop the lowest-ratio examples
        drop_order = order[::-1]
        c = c0.sum() - np.concatenate([[0], np.cumsum(c0[drop_order])])[:-1]
        p = p0.sum() - np.concatenate([[0], np.cumsum(p0[drop_order])])[:-1]
        m, achieved = _best_prefix(c, p, target)
        kept[drop_order[:m]] = False

    if abs(achieved - target) > tolerance * target:
        raise DataError(f"cannot reach Rg {target} within {tolerance:.1%} (best {achieved:.4g}) from this data")
    out = [invert(r) if inverted[i] else r for i, r in enumerate(records) if kept[i]]
    info = {"n_inverted": int((inverted & kept).sum()), "n_dropped": int((~kept).sum()), "target_rg": target,
            "rg_source": orig.rg}  # fmt: skip
    return out, info


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Short hash of how a tokenizer tokenizes: its whole ``tokenizer.json`` (vocabulary, merges, normalizer,
    pre-tokenizer, special tokens) for a fast tokenizer, else its vocabulary. Data tokenized or measured with
    another tokenizer, or the same vocabulary merged differently, is rebuilt."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        if backend.truncation is not None or backend.padding is not None:  # left on by a previous call: not part
            backend = copy.deepcopy(backend)  # of how it tokenizes, so hashed as off (the copy costs, rarely)
            backend.no_truncation()
            backend.no_padding()
        return _sha256(backend.to_str().encode())[:16]
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return _sha256(vocab.encode())[:16]


def build_variant(
    source: str, variant: str, tokenizer: Any, out_dir: str | Path, target_rg: float | None = None,
    tolerance: float = 0.01, on_invalid: str = "error", empty_output: str = "keep",
    records: list[dict[str, str]] | None = None,
) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """Build (or reuse) a dataset variant of ``source`` and write it as JSON beside a ``.manifest.json``.
    ``records``: the source's records already loaded (e.g. single-turn conversations as records), else read.

    The file name is keyed by the source content, variant, target and tokenizer, so a sweep builds it once and
    every run can say exactly what it trained on. Returns the JSON path and the manifest.
    """
    if variant not in VARIANTS or variant == "as_is":
        raise ValueError(f"variant must be 'short' or 'rg_target', got {variant!r}")
    if variant == "rg_target" and target_rg is None:
        raise ValueError("variant rg_target needs target_rg")
    if records is None:
        records = load_records(source, on_invalid=on_invalid, empty_output=empty_output)
    source_sha = _sha256(json.dumps(records, sort_keys=True, ensure_ascii=False).encode())
    tok_sha = tokenizer_fingerprint(tokenizer)
    key = _sha256(f"{source_sha}|{variant}|{target_rg}|{tolerance}|{tok_sha}".encode())[:12]  # skipped records
    # change source_sha, so on_invalid and empty_output need no place in the key
    out_dir = Path(out_dir)
    path = out_dir / f"{variant}{'' if target_rg is None else f'-{target_rg:g}'}-{key}.json"
    manifest_path = path.with_suffix(".manifest.json")
    if path.exists() and manifest_path.exists():
        return path, json.loads(manifest_path.read_text())

    if variant == "short":
        built, info = short_variant(records, tokenizer)
        procedure = "invert every example whose output has more tokens than instruction + input"
    else:
        built, info = rg_target_variant(records, tokenizer, target_rg, tolerance)
        procedure = "invert, then drop, examples in order of decreasing output/(instruction+input) tokens to reach target_rg"
    lengths = token_lengths(built, tokenizer)
    manifest = {
        "variant": variant,
        "procedure": procedure,
        "source": source,
        "source_records_sha256": source_sha,
        "source_file_sha256": _sha256(Path(source).read_bytes()) if Path(source).is_file() else None,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "tokenizer_vocab_sha256": tok_sha,
        "n_source": len(records),
        "n": len(built),
        **info,
        "rg": lengths.rg,
        "output_sha256": None,
        "output_path": str(path),
    }
    payload = json.dumps(built, indent=1, ensure_ascii=False) + "\n"
    manifest["output_sha256"] = _sha256(payload.encode())
    for target, text in ((path, payload), (manifest_path, json.dumps(manifest, indent=2) + "\n")):
        with atomic_write(target) as tmp:  # an interrupted build never leaves a half-written variant
            tmp.write_text(text, encoding="utf-8")
    log.info("built %s variant of %s: %s", variant, source, {k: manifest[k] for k in ("n", "n_inverted", "rg")})
    return path, manifest
