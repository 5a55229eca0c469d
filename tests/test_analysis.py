import json
import shutil

import numpy as np
import pandas as pd
import pytest

from plwlab.analysis import PRIMARY_METRICS, primary_scores, relative_scores, wp
from plwlab.cli import main as cli
from plwlab.gam import CubicRegressionSpline, fit_te_gam, place_knots
from plwlab.glmm import BetaGLMMLaplace, critical_plw, fit_beta_glmm, squeeze
from plwlab.report import analyze, collect_runs, fit_with_r

from conftest import SHARED_DATA

FIXTURES = SHARED_DATA.parent / "fixtures" / "analysis"
needs_fixture = pytest.mark.skipif(not (FIXTURES / "results.csv").exists(), reason="../shared/fixtures absent")


@pytest.fixture(scope="module")
def fixture():
    return relative_scores(pd.read_csv(FIXTURES / "results.csv")), json.loads((FIXTURES / "reference.json").read_text())


def synthetic_results(seed: int = 0) -> pd.DataFrame:
    """A small PLW study whose short-completion data peak at PLW 0.1 (wp 0.5)."""
    rng = np.random.default_rng(seed)
    rows = []
    for dataset, rg, curvature in (("short", 0.08, 3.0), ("medium", 1.0, 1.5), ("long", 3.3, 0.0)):
        for model in ("m1", "m2"):
            for plw in (0.0, 0.0005, 0.002236, 0.01, 0.02463, 0.05, 0.1, 0.2463, 0.5, 1.0):
                for b in range(6):
                    score = 0.5 + 0.05 * b + curvature * 0.02 * (1 - (wp(plw) - 0.5) ** 2 * 4) + rng.normal(0, 0.01)
                    rows.append((model, dataset, rg, plw, f"bench{b}", score))
    return pd.DataFrame(rows, columns=["model", "dataset", "rg", "plw", "benchmark", "score"])


def test_wp_squeeze_and_critical_plw():
    assert wp(0.1) == pytest.approx(0.5, abs=1e-5) and wp(0.0) == 0 and wp(1.0) == 1
    np.testing.assert_allclose(squeeze(np.array([0.0, 1.0]), 260), [0.5 / 260, 259.5 / 260])
    assert critical_plw(5.590, -4.284) == pytest.approx(0.242, abs=1e-3)  # the paper's numbers
    assert critical_plw(1.0, 0.5) is None and critical_plw(-1.0, -1.0) is None and critical_plw(5.0, -1.0) is None


def test_relative_scores_min_max_within_dataset_and_benchmark():
    rel = relative_scores(synthetic_results())
    grouped = rel.groupby(["dataset", "benchmark"])["y_mm"]
    assert (grouped.min() == 0).all() and (grouped.max() == 1).all()
    with pytest.raises(ValueError, match="lacks columns"):
        relative_scores(rel.drop(columns="score"))


def test_cubic_regression_spline_properties():
    knots = place_knots(np.array([0, 0.0005, 0.002236, 0.01, 0.02463, 0.05, 0.1, 0.2463, 0.5, 1.0]), 3)
    np.testing.assert_allclose(knots, [0.0, 0.037315, 1.0])  # mgcv's place.knots
    np.testing.assert_allclose(place_knots(np.array([0.042, 0.082, 1.0, 3.27, 7.83]), 3), [0.042, 1.0, 7.83])
    spline = CubicRegressionSpline(np.array([0.0, 0.3, 0.7, 1.0]))
    np.testing.assert_allclose(spline.basis(spline.knots), np.eye(4), atol=1e-12)  # coefficients = knot values
    line = 2 * spline.knots + 1
    assert line @ spline.penalty @ line == pytest.approx(0, abs=1e-10)  # straight lines are unpenalised
    x = np.linspace(-0.5, 1.5, 9)
    np.testing.assert_allclose(spline.basis(x) @ line, 2 * x + 1, atol=1e-12)  # ... and extend linearly
    np.testing.assert_allclose(spline.basis(x).sum(axis=1), 1.0, atol=1e-12)


@needs_fixture
def test_glmm_fits_and_flags_equal_glmmtmb_on_every_fixture_dataset(fixture):
    """nlminb's path from glmmTMB's start, in glmmTMB's parameters: R flags alpaca_data (singular convergence, the
    benchmark correlation running to -1) and no other; logLik is where nlminb stopped (medium's is 8e-6 below the
    maximum, as R's), so the path itself is reproduced, not only the optimum."""
    rel, reference = fixture
    assert len(reference["glmm"]) == 5
    for dataset, ref in reference["glmm"].items():
        fit = fit_beta_glmm(rel[rel["dataset"] == dataset], dataset)
        assert (fit.convergence, fit.pd_hess, fit.clean) == (ref["convergence"], ref["pd_hess"], ref["clean"]), dataset
        assert fit.warnings == ([ref["warnings"]] if isinstance(ref["warnings"], str) else ref["warnings"]), dataset
        assert fit.loglik == pytest.approx(ref["loglik"], abs=1e-6), dataset
        for term in ("intercept", "b1", "b2"):
            assert fit.coef[term] == pytest.approx(ref[term], abs=1e-6), (dataset, term)
            assert fit.se[term] == pytest.approx(ref[f"se_{term}"], rel=1e-5), (dataset, term)
        for term in ("b1", "b2"):
            assert fit.p[term] == pytest.approx(ref[f"p_{term}"], rel=1e-4), (dataset, term)
        if ref["lambda"] is None:
            assert fit.critical_plw is None
        else:
            assert fit.critical_plw == pytest.approx(ref["lambda"], abs=1e-5), dataset


def test_laplace_gradient_is_exact():
    rel = relative_scores(synthetic_results())
    part = rel[rel["dataset"] == "medium"]
    objective = BetaGLMMLaplace(squeeze(part["y_mm"].to_numpy(), len(part)), part["wp"].to_numpy(),
                                pd.factorize(part["benchmark"], sort=True)[0], pd.factorize(part["model"], sort=True)[0])  # fmt: skip
    for p in (np.zeros(8), np.random.default_rng(1).normal(0, 0.7, 8)):
        h = 1e-5
        numeric = [(objective(p + e) - objective(p - e)) / (2 * h) for e in np.eye(8) * h]
        np.testing.assert_allclose(objective.gradient(p), numeric, rtol=1e-6, atol=1e-6)


@needs_fixture
def test_gam_parity_with_mgcv(fixture):
    rel, reference = fixture
    gam = fit_te_gam(rel)
    rg_grid = np.arange(0.5, 8.01, 0.5)
    for rg, plw in gam.optimal_plw(rg_grid).items():
        assert plw == pytest.approx(reference["gam"]["optimal_plw"][f"{rg:.1f}"], abs=0.005), rg
    assert gam.gcv == pytest.approx(reference["gam"]["gcv"], rel=1e-6)
    assert gam.edf == pytest.approx(reference["gam"]["edf"], abs=0.01)
    robust = fit_te_gam(rel, x_transform="wp").optimal_plw(rg_grid)
    assert all(0 <= v <= 1 for v in robust.values())


def test_glmm_recovers_a_planted_optimum():
    rel = relative_scores(synthetic_results())
    fit = fit_beta_glmm(rel[rel["dataset"] == "short"], "short")
    assert fit.coef["b2"] < 0 and fit.p["b2"] < 1e-6
    assert "sd_model" in fit.boundary  # none planted: the model SD runs to 0 (glmmTMB warns, so does plwlab)
    assert not fit.clean and "singular convergence (7)" in fit.warnings[-1]
    assert fit.critical_plw == pytest.approx(0.1, rel=0.3)  # planted at wp 0.5 = PLW 0.1


def test_analyze_writes_tables_gam_and_figures(tmp_path):
    runs_root = tmp_path / "sweep"
    for i, plw in enumerate([0.0, 0.0, 0.1, 0.1, 1.0, 1.0]):
        run = runs_root / f"plw={plw},seed={i}"
        (run / "hf_model").mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({"plw": plw, "loss_rsd": 0.01 * (i + 1), "param_distance": 2.0 + plw}))
        (run / "hf_model" / "plwlab.json").write_text(json.dumps({"model": "tiny", "data": "alpaca_sample"}))
    runs = collect_runs(runs_root)
    assert len(runs) == 6 and set(runs["model"]) == {"tiny"}

    out = tmp_path / "analysis"
    summary = analyze(synthetic_results(), out, runs)
    for name in ("glmm.csv", "glmm.md", "gam.json", "gam_wp.json", "optimal_plw.md", "relative_scores.csv", "summary.json"):
        assert (out / name).exists(), name
    for stem in ("performance_by_wp", "plw_rg_contour", "run_metrics"):
        assert (out / f"{stem}.png").stat().st_size > 10_000 and (out / f"{stem}.pdf").exists()
    assert "critical_plw" in (out / "glmm.md").read_text()
    assert set(summary["glmm"]) == {"short", "medium", "long"}
    gam = json.loads((out / "gam.json").read_text())
    assert set(gam["optimal_plw"]) == {f"{r:g}" for r in np.round(np.arange(0.5, 8.01, 0.5), 1)}


def evaluate_table(wide: pd.DataFrame) -> pd.DataFrame:
    """``wide`` (one score per run and benchmark) as evaluate.py writes it: several metrics per benchmark plus
    mechanism rows, in long format."""
    rows = []
    for r in wide.itertuples(index=False):
        metric = PRIMARY_METRICS.get(r.benchmark, "acc")
        rows += [{**r._asdict(), "metric": metric}, {**r._asdict(), "metric": "other", "score": -1.0},
                 {**r._asdict(), "benchmark": "memorization", "metric": "bleu", "score": 50.0}]  # fmt: skip
    return pd.DataFrame(rows)


def test_primary_scores_pick_one_metric_per_benchmark():
    wide = synthetic_results().assign(benchmark=lambda d: d["benchmark"].map(
        dict(zip([f"bench{b}" for b in range(6)], ["arc_challenge", "piqa", "winogrande", "wmt16_ro_en", "alpaca_eval",
                                                   "truthfulqa_gen"]))))  # fmt: skip
    long = evaluate_table(wide)
    picked = primary_scores(long)
    assert list(picked["metric"]) == [PRIMARY_METRICS[b] for b in wide["benchmark"]]  # kept: says what is a percentage
    pd.testing.assert_frame_equal(picked.drop(columns="metric"), wide)
    assert primary_scores(wide) is wide  # already one score per benchmark
    other = primary_scores(long, {"piqa": "other"})
    assert (other.loc[other["benchmark"] == "piqa", "score"] == -1.0).all() and len(other) == len(wide)
    long.loc[long["benchmark"] == "alpaca_eval", "score"] = float("nan")  # e.g. no parseable verdict
    assert "alpaca_eval" not in set(primary_scores(long)["benchmark"])


def test_cli_analyze_and_recommend_from_the_fit(tmp_path, capsys):
    results = tmp_path / "results.csv"
    evaluate_table(synthetic_results()).to_csv(results, index=False)  # evaluate.py's long format
    cli(["analyze", str(results), "--out", str(tmp_path / "a"), *(f"--metric=bench{b}=acc" for b in range(6))])
    printed = capsys.readouterr().out
    assert "short: b1" in printed and "critical PLW" in printed and "GAM optimal PLW" in printed
    cli(["recommend", "--rg", "0.5", "--model-file", str(tmp_path / "a" / "gam.json")])
    assert "fitted model" in capsys.readouterr().out


@needs_fixture
@pytest.mark.skipif(shutil.which("Rscript") is None, reason="R (Rscript) not installed")
def test_r_backend_reproduces_the_reference(tmp_path):
    try:
        out = fit_with_r(FIXTURES / "results.csv", tmp_path / "r.json")
    except RuntimeError as e:  # R present but without glmmTMB/mgcv
        pytest.skip(str(e))
    reference = json.loads((FIXTURES / "reference.json").read_text())
    for dataset, ref in reference["glmm"].items():
        assert out["glmm"][dataset]["b1"] == pytest.approx(ref["b1"], abs=1e-6)
    assert out["gam"]["optimal_plw"] == pytest.approx({k: float(v) for k, v in reference["gam"]["optimal_plw"].items()})


def _study(plws=(0.0, 0.1, 1.0), rgs=(("short", 0.16), ("medium", 1.0), ("long", 3.5)), seed=0) -> pd.DataFrame:
    """An evaluate.py-style long table of a small study: two benchmarks (accuracy 0-1, win rate 0-100) plus the
    run metrics (memorization BLEU, AlpacaEval generation length)."""
    rng = np.random.default_rng(seed)
    rows = []
    for dataset, rg in rgs:
        for plw in plws:
            run_id = f"study/{dataset},plw={plw}"
            base = {"run_id": run_id, "model": "tiny", "dataset": dataset, "rg": rg, "plw": plw}
            rows += [{**base, "benchmark": "piqa", "metric": "acc_norm", "score": 0.5 + 0.1 * rng.random()},
                     {**base, "benchmark": "alpaca_eval", "metric": "win_rate", "score": 40 + 20 * rng.random()},
                     {**base, "benchmark": "memorization", "metric": "bleu", "score": 10 + 30 * plw},
                     {**base, "benchmark": "alpaca_eval", "metric": "generation_length", "score": 50 - 10 * plw}]  # fmt: skip
    return pd.DataFrame(rows)


def test_analyze_robustness_on_real_sweep_shapes(tmp_path, capsys):
    """Each failure seen on real sweep output gives a clear message or the right figure."""
    # a configuration evaluated twice (two runs of one config): the GAM used to raise "Singular matrix"
    table = _study()
    twice = pd.concat([table, table[table["dataset"] == "short"].assign(run_id=lambda d: d["run_id"] + "-again")])
    results = tmp_path / "twice.csv"
    twice.to_csv(results, index=False)
    cli(["analyze", str(results), "--out", str(tmp_path / "twice")])
    printed = capsys.readouterr().out
    gam = json.loads((tmp_path / "twice" / "gam.json").read_text())
    # the data span Rg 0.16..3.5: the table's rows beyond it are marked, in the file, the CSV and the console
    assert gam["rg_range"] == [0.16, 3.5] and gam["extrapolated"][0] == "4" and gam["extrapolated"][-1] == "8"
    optimal = pd.read_csv(tmp_path / "twice" / "optimal_plw.csv")
    assert list(optimal.loc[optimal["extrapolated"], "rg"]) == [4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0]
    assert "* = extrapolated: the data span Rg 0.16-3.5" in printed and "8*: " in printed
    cli(["recommend", "--rg", "6", "--model-file", str(tmp_path / "twice" / "gam.json")])
    assert "extrapolated: the fitted data span Rg 0.16..3.5" in capsys.readouterr().out
    # memorization BLEU and generation length from the results table: the Fig. 2 mechanism panels
    assert (tmp_path / "twice" / "run_metrics.png").exists()

    # only PLW 0 and 1: wp = wp^2, the quadratic is not identified; one PLW value: not "too few rows"
    for plws, expected in (((0.0, 1.0), "needs at least 3 distinct PLW values, got 2 (0, 1)"),
                           ((0.1,), "needs at least 3 distinct PLW values, got 1 (0.1)")):  # fmt: skip
        results = tmp_path / f"{len(plws)}.csv"
        _study(plws).to_csv(results, index=False)
        cli(["analyze", str(results), "--out", str(tmp_path / f"out{len(plws)}")])
        printed = capsys.readouterr().out
        assert f"short: GLMM skipped: dataset 'short': the quadratic in wp {expected}" in printed
        assert "short: b1" not in printed and "GAM skipped: the GAM te(PLW, Rg, k=3) needs at least 3 distinct" in printed


def test_simple_aggregate_puts_win_rates_and_accuracies_on_one_scale():
    from plwlab.analysis import unit_scores

    picked = primary_scores(_study())
    units = unit_scores(picked)
    assert units.between(0, 1).all()
    win = picked["metric"] == "win_rate"
    assert np.allclose(units[win], picked.loc[win, "score"] / 100) and np.allclose(units[~win], picked.loc[~win, "score"])
