import csv
import json

import numpy as np
import pytest
from conftest import SAMPLE, SHARED_DATA, tiny_model

from plwlab.analysis.recommend import recommend_plw
from plwlab.cli import main as cli
from plwlab.data.alpaca import load_records
from plwlab.data.datamodule import InstructionDataModule
from plwlab.data.rg import token_lengths
from plwlab.data.sources import DataError
from plwlab.data.stats import dataset_stats
from plwlab.data.tokenization import tokenize_examples
from plwlab.data.variants import INVERT_NO_INPUT, build_variant, invert, rg_target_variant, short_variant

FIXTURE_REFERENCE = SHARED_DATA.parent / "fixtures" / "analysis" / "reference.json"


@pytest.fixture(scope="module")
def tok():
    return tiny_model().tokenizer


@pytest.fixture(scope="module")
def records():
    return load_records(str(SAMPLE))


def test_invert_follows_the_paper():
    assert invert({"instruction": "Write a poem.", "input": "", "output": "Roses are red."}) == {
        "instruction": INVERT_NO_INPUT, "input": "Roses are red.", "output": "Write a poem.",
    }  # fmt: skip
    assert invert({"instruction": "Summarise.", "input": "A long text.", "output": "Short."}) == {
        "instruction": "Predict the prompt that generated the below AI output given the following context. "
        "Context: A long text.",
        "input": "Short.",
        "output": "Summarise.",
    }


def test_token_lengths_and_rg(tok, records):
    lengths = token_lengths(records[:50], tok)
    r = records[7]
    assert lengths.output[7] == len(tok(r["output"], add_special_tokens=False)["input_ids"])
    assert lengths.rg == pytest.approx(lengths.output.sum() / (lengths.instruction + lengths.input).sum())


def test_short_inverts_exactly_the_long_completion_examples(tok, records):
    short, info = short_variant(records, tok)
    lengths = token_lengths(records, tok)
    long = lengths.output > lengths.prompt
    assert info["n_inverted"] == long.sum() > 0 and len(short) == len(records)
    for original, new, is_long in zip(records, short, long):
        assert new == (invert(original) if is_long else original)
    assert token_lengths(short, tok).rg < 1 < lengths.rg
    # Short is the rg_target procedure stopped at Short's own Rg
    same, _ = rg_target_variant(records, tok, target=token_lengths(short, tok).rg)
    assert same == short


@pytest.mark.parametrize("target", [2.0, 1.0, 0.5, 0.1, 0.042, 5.0])
def test_rg_target_within_one_percent(tok, records, target):
    built, info = rg_target_variant(records, tok, target)
    achieved = token_lengths(built, tok).rg
    assert abs(achieved - target) <= 0.01 * target
    assert len(built) == len(records) - info["n_dropped"]
    if 0.5 <= target < token_lengths(records, tok).rg:
        assert info["n_dropped"] == 0 and info["n_inverted"] > 0  # reachable by inversion alone
    else:
        assert info["n_dropped"] > 0  # below the inversion floor (~0.14 here) or above the source Rg
    assert rg_target_variant(records, tok, target)[0] == built  # deterministic


def test_rg_target_unreachable_raises(tok, records):
    with pytest.raises(DataError, match="cannot reach Rg"):
        rg_target_variant(records[:3], tok, 0.9, tolerance=1e-6)
    with pytest.raises(ValueError, match="> 0"):
        rg_target_variant(records, tok, 0)


def test_build_variant_writes_json_and_manifest_once(tok, tmp_path):
    path, manifest = build_variant(str(SAMPLE), "rg_target", tok, tmp_path, target_rg=1.0)
    assert path.exists() and path.with_suffix(".manifest.json").exists()
    assert json.loads(path.with_suffix(".manifest.json").read_text()) == manifest
    assert manifest["source_file_sha256"] and manifest["n"] == len(json.loads(path.read_text())) == 400
    assert manifest["rg"] == pytest.approx(1.0, rel=0.01) and manifest["n_inverted"] > 0
    mtime = path.stat().st_mtime_ns
    again, _ = build_variant(str(SAMPLE), "rg_target", tok, tmp_path, target_rg=1.0)
    assert again == path and path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    other, _ = build_variant(str(SAMPLE), "short", tok, tmp_path)
    assert other != path and not list(tmp_path.glob("*.tmp*"))


def test_datamodule_trains_on_a_variant(tok, tmp_path):
    dm = InstructionDataModule(tok, path=str(SAMPLE), variant="rg_target", target_rg=0.5, cache_dir=str(tmp_path), val_size=0)
    dm.setup("fit")
    assert dm.manifest["variant"] == "rg_target" and dm.stats["rg"] == pytest.approx(0.5, rel=0.01)


def test_dataset_stats_by_hand(tok, records):
    sample = records[:30]
    stats = dataset_stats(sample, tok, max_length=80)
    lengths = token_lengths(sample, tok)
    assert stats["n"] == 30
    assert stats["output_mean"] == pytest.approx(lengths.output.mean())
    assert stats["input_std"] == pytest.approx(np.std(lengths.input, ddof=1))
    assert stats["total_tokens"] == lengths.instruction.sum() + lengths.input.sum() + lengths.output.sum()
    assert stats["rg_mean_of_ratios"] == pytest.approx(np.mean(lengths.output / lengths.prompt))
    assert 0 < stats["empty_completion_share"] < stats["truncated_share"] < 1
    # Rg of what training sees: output tokens inside the max_length window (EOS not counted) over prompt tokens
    examples, _ = tokenize_examples(sample, tok, max_length=80)
    kept = sum(e.n_completion - int(e.input_ids[-1] == tok.eos_token_id) for e in examples)
    assert stats["rg_within_max_length"] == pytest.approx(kept / lengths.prompt.sum())
    assert stats["rg_within_max_length"] < stats["rg"]


@pytest.mark.parametrize(("rg", "plw"), [(0.5, 0.155), (1.0, 0.155), (1.25, 0.169), (1.5, 0.183), (2.0, 0.239), (0.1, 0.155)])
def test_recommend_from_table4(rg, plw):
    assert recommend_plw(rg).plw == pytest.approx(plw)


def test_recommend_edges_and_model_file(tmp_path):
    assert recommend_plw(3.27).plw is None and "hardly matters" in str(recommend_plw(3.27))
    assert "outside" in recommend_plw(0.1).note and recommend_plw(2.2).plw == pytest.approx(0.239)
    assert recommend_plw(1.0, column="mc").plw == pytest.approx(0.183)
    assert recommend_plw(1.25, column="mc").plw == pytest.approx((0.183 + 0.278) / 2)
    assert recommend_plw(2.0, column="mc").plw is None  # starred in the paper
    assert recommend_plw(1.0, column="gen").plw is None and recommend_plw(7.9, column="gen").plw == pytest.approx(0.654)
    with pytest.raises(ValueError, match="column must be one of"):
        recommend_plw(1.0, column="translation")
    fit = tmp_path / "fit.json"
    fit.write_text(json.dumps({"gam": {"optimal_plw": {"0.5": 0.2, "1.5": 0.4}}}))
    assert recommend_plw(1.0, model_file=fit).plw == pytest.approx(0.3)
    if FIXTURE_REFERENCE.exists():
        assert recommend_plw(1.0, model_file=FIXTURE_REFERENCE).plw == pytest.approx(0.397)


def test_embedded_table4_equals_the_papers_table():
    """plwlab's Table 4 (values and flat marks, all three columns) equals ../shared/paper/table4_optimal_plw.csv."""
    from plwlab.analysis.recommend import TABLE4

    path = SHARED_DATA.parent / "paper" / "table4_optimal_plw.csv"
    if not path.exists():
        pytest.skip("../shared/paper not present")
    rows = {float(r["rg"]): r for r in csv.DictReader(path.open())}
    assert set(rows) == set(TABLE4)
    for rg, row in rows.items():
        for col in ("all", "mc", "gen"):
            assert TABLE4[rg][col] == (float(row[col]), row[f"{col}_flat"] == "1"), (rg, col)


def test_cli_stats_build_and_recommend(tmp_path, capsys):
    out = tmp_path / "stats.csv"
    cli(["stats", "data=alpaca_sample,alpaca_data_medium", f"data.path={SAMPLE}", f"paths.data_dir={tmp_path}", "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert [r["dataset"] for r in rows] == ["alpaca_sample", "alpaca_data_medium"]
    assert float(rows[1]["rg"]) == pytest.approx(1.0, rel=0.01) and float(rows[0]["rg"]) > 2
    assert "Token statistics" in capsys.readouterr().out

    cli(["build-data", "data=alpaca_data_tiny", f"data.path={SAMPLE}", f"paths.data_dir={tmp_path}"])
    printed = capsys.readouterr().out
    assert "alpaca_data_tiny" in printed and "warning" in printed  # 400 examples cannot reach 0.042 by inversion
    [manifest] = [json.loads(p.read_text()) for p in tmp_path.glob("rg_target-0.042-*.manifest.json")]
    assert manifest["rg"] == pytest.approx(0.042, rel=0.01)

    cli(["recommend", "--rg", "0.5"])
    printed = capsys.readouterr().out
    assert "PLW 0.155" in printed and "gen: PLW hardly matters here" in printed and "paper Table 4 (Huerta" in printed
    cli(["recommend", "--rg", "1.0", "--column", "mc"])
    assert "Rg 1: PLW 0.183  [paper Table 4, column mc]" in capsys.readouterr().out
    cli(["recommend", "data=alpaca_data_short", f"data.path={SAMPLE}", f"paths.data_dir={tmp_path}"])
    assert "alpaca_data_short: Rg" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: data=alpaca_sample is used as is"):
        cli(["build-data"])


def test_alpaca_52k_stats_with_llama_tokenizer():
    from plwlab.training.model import load_tokenizer

    alpaca, spm = SHARED_DATA / "alpaca" / "alpaca_data.json", SHARED_DATA / "tokenizer" / "llama_tokenizer.model"
    if not (alpaca.exists() and spm.exists()):
        pytest.skip("../shared/data not present")
    stats = dataset_stats(load_records(str(alpaca)), load_tokenizer(str(spm)), max_length=512)
    assert round(stats["rg"], 4) == 3.2837  # 52,002 records, fields tokenized alone
    assert round(stats["rg_within_max_length"], 2) == 3.27  # the paper's Table 1, to its printed digit
