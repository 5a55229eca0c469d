import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_DATA

from plwlab.analysis.analyze import analyze, collect_runs, fit_with_r
from plwlab.analysis.gam import CubicRegressionSpline, fit_te_gam, place_knots
from plwlab.analysis.glmm import (
    BetaGLMMLaplace,
    critical_plw,
    fit_beta_glmm,
    hessian_checks,
    numderiv_jacobian,
    squeeze,
)  # fmt: skip
from plwlab.analysis.scores import PRIMARY_METRICS, primary_scores, relative_scores, wp
from plwlab.cli import main as cli

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


def glmmtmb_warning(what: str) -> str:
    """A warning as glmmTMB 1.1.5 words it (written out here, not taken from plwlab)."""
    return f"Model convergence problem; {what}. See vignette('troubleshooting')"


# glmmTMB 1.1.5 (R 4.2.2) on synthetic_results(0), as `plwlab analyze --backend r` printed it:
# (convergence, pdHess, warnings, logLik); logLik is NA where the Hessian is not positive definite.
GLMMTMB_ON_SYNTHETIC = {
    "long": (0, True, [], 3.75793058071175),
    "medium": (1, False, ["non-positive-definite Hessian matrix", "singular convergence (7)"], None),
    "short": (1, False, ["non-positive-definite Hessian matrix", "singular convergence (7)"], None),
}


def test_glmm_flags_and_loglik_equal_glmmtmb_off_the_fixture():
    """Two fits whose variance components run to 0: glmmTMB's Hessian is not positive definite (nor on its second
    look with numDeriv), so it warns, and its logLik is NA; plwlab's too (the objective is still kept)."""
    rel = relative_scores(synthetic_results(0))
    for dataset, (convergence, pd_hess, warnings, loglik) in GLMMTMB_ON_SYNTHETIC.items():
        fit = fit_beta_glmm(rel[rel["dataset"] == dataset], dataset)
        expected = [glmmtmb_warning(w) for w in warnings]
        if not pd_hess and fit.pd_hess:
            # the SD at 0 leaves a Hessian eigenvalue of ~1e-108, whose Cholesky pivot is rounding noise: which way it
            # falls depends on the BLAS kernel (OPENBLAS_CORETYPE=Sandybridge: not positive definite, as glmmTMB;
            # AMD EPYC's default: positive definite). Either way the fit is flagged degenerate and not clean.
            expected[0] = glmmtmb_warning("extreme or very small eigenvalues detected")
            assert not fit.clean and np.isfinite(fit.loglik), dataset
        else:
            assert fit.pd_hess == pd_hess, dataset
            if loglik is None:
                assert np.isnan(fit.loglik) and np.isfinite(fit.objective) and fit.to_dict()["loglik"] is None
            else:
                assert fit.loglik == pytest.approx(loglik, abs=1e-6) and fit.objective == -fit.loglik
        assert (fit.convergence, fit.warnings, fit.error) == (convergence, expected, ""), dataset


def test_glmm_where_glmmtmb_itself_stops():
    """On synthetic_results(1) glmmTMB stops on 'long' (R: "Error in eigen(h): infinite or missing values in 'x'",
    after the warning "NA/NaN function evaluation"; checked live in test_r_backend_on_synthetic_studies): the model SD
    runs to where 1 / sd^2 overflows a double, TMB's objective is NaN beyond it, and numDeriv's steps cross it.
    plwlab keeps the fit, names the error, and does not call it clean."""
    rel = relative_scores(synthetic_results(1))
    fit = fit_beta_glmm(rel[rel["dataset"] == "long"], "long")
    assert fit.error == "infinite or missing values in 'x'" and not fit.clean
    assert fit.warnings[0] == "NA/NaN function evaluation" and fit.convergence == 1
    assert np.log(fit.sd_model) == pytest.approx(-0.5 * np.log(np.finfo(float).max), abs=1e-5)  # at the wall
    objective = BetaGLMMLaplace(squeeze(np.full(4, 0.5), 4), np.array([0.0, 0.5, 1, 1]), np.array([0, 0, 1, 1]),
                                np.array([0, 1, 0, 1]))  # fmt: skip
    wall = -0.5 * np.log(np.finfo(float).max)
    assert np.isfinite(objective(np.r_[np.zeros(7), wall + 1e-9])) and np.isnan(objective(np.r_[np.zeros(7), wall - 1e-9]))


def test_numderiv_jacobian_equals_r():
    """numDeriv::jacobian(f, c(0.7, 1e-9)) as R 4.2.2 / numDeriv 2016.8-1.1 printed it (Richardson, r = 4; the
    second coordinate is below zero.tol, so it steps by eps): equal to the last bits, inexact parts included."""
    def f(x):
        return np.array([np.sin(x[0]) * np.exp(x[1]), x[0] ** 3 / (1 + x[1] ** 2), np.log(2 + x[0] * x[1])])

    r = [[0.76484218806075577, 0.64421768788537626], [1.4699999999973996, -6.861014786869972e-10],
         [5.1035293680986451e-10, 0.34999999987236258]]  # fmt: skip
    np.testing.assert_allclose(numderiv_jacobian(f, np.array([0.7, 1e-9])), r, rtol=1e-13, atol=0)


def test_hessian_checks_follow_glmmtmb():
    """Each branch of glmmTMB's checks, on gradients whose Hessians are known."""
    zero = np.zeros(2)
    pd_hess, cov, warnings, error = hessian_checks(lambda x: np.array([2 * x[0], 4 * x[1]]), zero)
    assert (pd_hess, warnings, error) == (True, [], "")
    np.testing.assert_allclose(cov, np.diag([0.5, 0.25]))
    # positive definite, but an eigenvalue below 10 eps
    pd_hess, _, warnings, _ = hessian_checks(lambda x: np.array([x[0], 1e-17 * x[1]]), zero)
    assert pd_hess and warnings == [glmmtmb_warning("extreme or very small eigenvalues detected")]
    # optimHess (step 1e-3) sees 1 - 2e6 * 1e-6 = -1; numDeriv's Richardson sees the true curvature 1: glmmTMB
    # then calls it positive definite, without a warning, and takes numDeriv's inverse as the covariance
    pd_hess, cov, warnings, error = hessian_checks(lambda x: np.array([x[0], x[1] - 2e6 * x[1] ** 3]), zero)
    assert (pd_hess, warnings, error) == (True, [], "")
    np.testing.assert_allclose(cov, np.eye(2), atol=1e-6)
    # negative curvature on both looks
    pd_hess, _, warnings, error = hessian_checks(lambda x: np.array([x[0], -x[1]]), zero)
    assert (pd_hess, warnings, error) == (False, [glmmtmb_warning("non-positive-definite Hessian matrix")], "")
    # a gradient that cannot be computed off the point: glmmTMB stops in eigen() with this error
    pd_hess, _, warnings, error = hessian_checks(lambda x: np.array([x[0], -x[1] if x[1] == 0 else np.nan]), zero)
    assert (pd_hess, warnings, error) == (False, [], "infinite or missing values in 'x'")


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
    return pd.DataFrame(rows).drop_duplicates(["model", "dataset", "plw", "benchmark", "metric"])  # one per run


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
    assert "alpaca_eval" not in set(relative_scores(primary_scores(long))["benchmark"])  # left out, counted


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
        for flag in ("convergence", "pd_hess", "clean", "warnings"):
            assert out["glmm"][dataset][flag] == ref[flag], (dataset, flag)
    assert out["gam"]["optimal_plw"] == pytest.approx({k: float(v) for k, v in reference["gam"]["optimal_plw"].items()})


@pytest.mark.skipif(shutil.which("Rscript") is None, reason="R (Rscript) not installed")
def test_r_backend_on_synthetic_studies(tmp_path):
    """GLMMTMB_ON_SYNTHETIC is what glmmTMB gives on synthetic_results(0); on synthetic_results(1) glmmTMB itself stops
    with an error on two datasets, and the R backend reports it per dataset instead of failing the whole table."""
    second = synthetic_results(1).assign(dataset=lambda d: "s1_" + d["dataset"])
    pd.concat([synthetic_results(0), second]).to_csv(tmp_path / "results.csv", index=False)
    try:
        out = fit_with_r(tmp_path / "results.csv", tmp_path / "r.json")
    except RuntimeError as e:
        pytest.skip(str(e))
    for dataset, (convergence, pd_hess, warnings, loglik) in GLMMTMB_ON_SYNTHETIC.items():
        r = out["glmm"][dataset]
        r_warnings = [r["warnings"]] if isinstance(r["warnings"], str) else r["warnings"]
        expected = [glmmtmb_warning(w) for w in warnings]
        assert (r["convergence"], r["pd_hess"], r_warnings) == (convergence, pd_hess, expected), dataset
        assert r["loglik"] == (None if loglik is None else pytest.approx(loglik, abs=1e-8)), dataset
    assert out["glmm"]["s1_long"]["error"] == "infinite or missing values in 'x'" and not out["glmm"]["s1_long"]["clean"]
    assert "error" not in out["glmm"]["s1_medium"]


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
    from plwlab.analysis.scores import unit_scores

    picked = primary_scores(_study())
    units = unit_scores(picked)
    assert units.between(0, 1).all()
    win = picked["metric"] == "win_rate"
    assert np.allclose(units[win], picked.loc[win, "score"] / 100) and np.allclose(units[~win], picked.loc[~win, "score"])


def test_the_report_of_a_real_model_has_its_scores_and_no_tiny_model_caveat(tmp_path):
    import pandas as pd

    from plwlab.analysis.report import write_report

    table = pd.DataFrame({"run_id": ["a", "b", "a", "b", "a"], "model": ["smollm2-135m-instruct"] * 5,
                          "dataset": ["short"] * 5, "rg": [0.16] * 5, "plw": [0.0, 1.0, 0.0, 1.0, 0.0],
                          "benchmark": ["piqa", "piqa", "piqa", "piqa", "pandalm"],
                          "metric": ["acc_norm", "acc_norm", "acc", "acc", "unparsed_verdicts"],
                          "score": [0.6267, 0.6533, 0.61, 0.62, 3.0], "n": [150] * 5})  # fmt: skip
    (tmp_path / "analysis").mkdir()
    report = write_report(tmp_path, table, {}, {"train": 1.0}, []).read_text()
    assert "say nothing about PLW" not in report
    header = next(line for line in report.splitlines() if line.startswith("| dataset") and "piqa" in line)
    assert [c.strip() for c in header.strip("|").split("|")] == ["dataset", "rg", "plw", "piqa acc_norm"]
    rows = [line for line in report.splitlines() if line.startswith("| short") and line.count("|") == 5]
    assert [[c.strip() for c in r.strip("|").split("|")] for r in rows] == [["short", "0.16", "0", "0.627"],
                                                                          ["short", "0.16", "1", "0.653"]]
    assert "unparsed_verdicts" not in report  # one primary score per benchmark; diagnostics stay in results.csv


def test_the_report_says_when_a_judge_says_little():
    import pandas as pd

    from plwlab.analysis.report import judge_notes

    rows = [("pandalm", "unparsed_verdicts", 25.0, 30), ("pandalm", "first_position_rate", 100.0, 5),
            ("alpaca_eval", "unparsed_verdicts", 0.0, 30), ("alpaca_eval", "first_position_rate", 55.0, 30)]
    notes = judge_notes(pd.DataFrame(rows, columns=["benchmark", "metric", "score", "n"]))
    assert notes == ["pandalm: 83% of the judge's verdicts could not be parsed; its win rates rest on the few that "
                     "could.", "pandalm: the judge preferred the output shown first in 100% of its decisive verdicts "
                     "(position bias): its win rate measures the order coin, not the outputs."]  # fmt: skip


def test_the_report_says_which_fits_are_not_clean_or_not_identified():
    from plwlab.analysis.report import fit_notes

    fit = {"b1": 0.4, "b2": -2.4, "se_b1": None, "se_b2": None, "critical_plw": 3e-4, "clean": False,
           "message": "function evaluation limit reached without convergence (9)", "error": "", "boundary": "sd_model"}
    summary = {"glmm": {"a": fit, "b": {**fit, "se_b1": 0.3, "se_b2": 0.5},
                        "c": {**fit, "clean": True, "b2": 0.3, "critical_plw": None}},
               "glmm_skipped": {"d": "needs 3 PLW values"},
               "gam": {"optimal_plw": {"0.5": 0.0, "1": 0.0, "4": 0.0}, "rg_range": [0.15, 3.5], "extrapolated": ["4"]}}
    notes = fit_notes(summary)
    assert notes[0].startswith("a: NOT clean and not identified") and "sd_model" in notes[0]
    assert notes[1].startswith("b: NOT clean (function evaluation limit") and "with caution" in notes[1]
    assert notes[2].startswith("c: clean fit without an interior optimum")
    assert notes[3] == "d: no GLMM (needs 3 PLW values)."
    assert "optimal PLW is 0 at every Rg" in notes[4] and "1 of 3 Rg values" in notes[5]


def test_analysis_refuses_a_table_it_would_misread_in_one_line(tmp_path):
    """A table concatenated with itself, a PLW outside [0, 1] and a score off its metric's scale are refused before
    any fit (they were fitted silently, or failed minutes later naming another cause), naming the rows."""
    table = _study(plws=(0.0, 0.01, 0.1, 1.0))

    def refused(bad: pd.DataFrame) -> str:
        path = tmp_path / "bad.csv"
        bad.to_csv(path, index=False)
        with pytest.raises(SystemExit) as stop:
            cli(["analyze", str(path), "--out", str(tmp_path / "out")])
        message = str(stop.value)
        assert message.startswith("error: ") and "\n" not in message
        assert not (tmp_path / "out" / "glmm.csv").exists()  # refused before fitting
        return message

    doubled = refused(pd.concat([table, table]))
    assert f"{2 * len(table)} rows repeat {len(table)} (run_id, benchmark, metric) keys" in doubled
    assert "line 2 (study/short,plw=0.0 piqa)" in doubled
    negative = table.copy()
    negative.loc[5, "plw"] = -0.01
    assert "plw must lie in [0, 1]" in refused(negative) and "got -0.01 in line 7 (study/short,plw=0.01" in refused(negative)
    percent = table.copy()
    percent.loc[0, "score"] = 55.0  # an accuracy given as a percentage
    assert "acc_norm scores lie in [0, 1], got 55 in line 2" in refused(percent)
    win = table.copy()
    win.loc[1, "score"] = 140.0
    assert "win_rate scores lie in [0, 100], got 140" in refused(win)
    # another tool's table (no run_id): one row per (model, dataset, rg, plw, benchmark)
    plain = synthetic_results()
    assert "(model, dataset, rg, plw, benchmark) keys" in refused(pd.concat([plain, plain.head(3)]))


def test_cli_study_and_notebook_fit_the_same_rows(tmp_path):
    """analyze_table is the one analysis entry: an evaluate.py table is fitted on its primary metric per benchmark
    (the notebook fitted every metric row, memorization included)."""
    from plwlab.analysis.analyze import analysis_inputs, analyze_table

    path = tmp_path / "results.csv"
    table = _study(plws=(0.0, 0.01, 0.1, 1.0))
    table.to_csv(path, index=False)
    raw, scores = analysis_inputs(path)
    assert len(raw) == len(table) and len(scores) == len(table) // 2  # piqa acc_norm + alpaca_eval win_rate per run
    assert set(zip(scores["benchmark"], scores["metric"])) == {("piqa", "acc_norm"), ("alpaca_eval", "win_rate")}
    summary = analyze_table(path, tmp_path / "nb")
    cli(["analyze", str(path), "--out", str(tmp_path / "cli")])
    for name in ("relative_scores.csv", "glmm.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "nb" / name), pd.read_csv(tmp_path / "cli" / name))
    assert len(pd.read_csv(tmp_path / "nb" / "relative_scores.csv")) == len(scores)
    assert "run_metrics" in summary["figures"]  # memorization BLEU and generation length from the table


def test_a_judges_first_position_rate_is_on_its_percent_scale():
    """evaluate.py writes first_position_rate in % (plwlab.evaluation.verdicts); the table check took it for a
    fraction and refused evaluate.py's own table (the cluster rehearsal of docs/evaluation.md found it)."""
    from plwlab.analysis.scores import check_scores

    table = _study(plws=(0.0, 0.01, 0.1, 1.0))
    judge = table[table["benchmark"] == table["benchmark"].iloc[0]].copy()
    judge["benchmark"], judge["metric"], judge["score"] = "alpaca_eval", "first_position_rate", 100.0
    check_scores(pd.concat([table, judge], ignore_index=True))  # accepted
    judge["score"] = 140.0
    with pytest.raises(ValueError, match=r"first_position_rate scores lie in \[0, 100\], got 140"):
        check_scores(pd.concat([table, judge], ignore_index=True))
