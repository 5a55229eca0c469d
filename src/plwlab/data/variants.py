"""The paper's dataset variants of any single-turn instruction data, built once into a JSON file beside a manifest.

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

Token counts and Rg come from :mod:`plwlab.data.rg`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from plwlab.data.alpaca import load_records
from plwlab.data.rg import ratio, token_lengths
from plwlab.data.sources import DataError
from plwlab.data.tokenization import tokenizer_fingerprint
from plwlab.files import atomic_write

log = logging.getLogger(__name__)

INVERT_NO_INPUT = "Predict the prompt that generated the following AI output."
INVERT_WITH_INPUT = "Predict the prompt that generated the below AI output given the following context. Context: {input}"
VARIANTS = ("as_is", "short", "rg_target")


def invert(record: dict[str, str]) -> dict[str, str]:
    """The paper's prompt inversion: predict the instruction from the output (and the input, as context)."""
    instruction = INVERT_WITH_INPUT.format(input=record["input"]) if record["input"] else INVERT_NO_INPUT
    return {"instruction": instruction, "input": record["output"], "output": record["instruction"]}


def short_variant(records: Sequence[dict[str, str]], tokenizer: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """AlpacaDataShort from any source: invert every long-completion example."""
    lengths = token_lengths(records, tokenizer)
    long = lengths.output > lengths.prompt
    out = [invert(r) if is_long else r for r, is_long in zip(records, long, strict=True)]
    return out, {"n_inverted": int(long.sum()), "n_dropped": 0, "rg_source": lengths.rg}


def _best_prefix(numerator: np.ndarray, denominator: np.ndarray, target: float) -> tuple[int, float]:
    """k in 0..n minimising |numerator[k] / denominator[k] - target| (first such k)."""
    ratios = ratio(numerator, denominator)
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
    order = np.lexsort((np.arange(n), -ratio(c0, p0)))  # highest ratio first, ties by index
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
            drop_order = np.lexsort((np.arange(n), -ratio(cur_c, cur_p)))
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
