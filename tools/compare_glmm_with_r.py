"""Fit the beta GLMM with plwlab and with R's glmmTMB on the same tables, and count where their flags agree.

    python tools/compare_glmm_with_r.py [--synthetic 12] [--noisy-fixture 8] [--out outputs/glmm_vs_r]

Needs Rscript with glmmTMB, mgcv and jsonlite (Debian: r-base-core r-cran-glmmtmb r-cran-mgcv r-cran-jsonlite).
The tables: ``synthetic_results(seed)`` of tests/test_analysis.py (3 datasets each), and the simulated fixture in
``../shared/fixtures/analysis`` with N(0, 0.01 k) noise added to its scores (5 datasets each, k = 1..4). Per dataset
it prints R's and plwlab's (convergence, pdHess, warnings) and whether they agree, then the tallies, including how
often the `clean` verdict agrees (docs/analysis.md has the numbers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_analysis import synthetic_results  # noqa: E402

from plwlab.analysis.analyze import fit_with_r  # noqa: E402
from plwlab.analysis.glmm import fit_beta_glmm  # noqa: E402
from plwlab.analysis.scores import relative_scores  # noqa: E402

FIXTURE = ROOT.parent / "shared" / "fixtures" / "analysis" / "results.csv"
PREFIX, SUFFIX = "Model convergence problem; ", ". See vignette('troubleshooting')"


def tables(n_synthetic: int, n_noisy: int) -> dict[str, pd.DataFrame]:
    out = {f"synthetic{seed}": synthetic_results(seed) for seed in range(n_synthetic)}
    if n_noisy and FIXTURE.exists():
        fixture, rng = pd.read_csv(FIXTURE), np.random.default_rng(7)
        for k in range(n_noisy):
            noise = rng.normal(0, 0.01 * (k % 4 + 1), len(fixture))
            out[f"fixture_noise{k}"] = fixture.assign(score=fixture["score"] + noise)
    return out


def warnings_of(r_fit: dict) -> list[str]:
    """jsonlite writes a one-element list as a plain string."""
    return [r_fit["warnings"]] if isinstance(r_fit["warnings"], str) else list(r_fit["warnings"])


def short(warnings: list[str]) -> list[str]:
    return [w.removeprefix(PREFIX).removesuffix(SUFFIX) for w in warnings]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", type=int, default=12)
    parser.add_argument("--noisy-fixture", type=int, default=8)
    parser.add_argument("--out", default="outputs/glmm_vs_r")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flags_agree, clean_agree, total, errors, errors_equal = 0, 0, 0, 0, 0
    for name, table in tables(args.synthetic, args.noisy_fixture).items():
        table.to_csv(out / f"{name}.csv", index=False)
        r_fits = fit_with_r(out / f"{name}.csv", out / f"{name}.json")["glmm"]
        rel = relative_scores(table)
        for dataset, r in r_fits.items():
            fit = fit_beta_glmm(rel[rel["dataset"] == dataset], dataset)
            if "error" in r:  # glmmTMB stopped: compare its error and whether nlminb met a NaN objective before it
                theirs = ("NA/NaN function evaluation" in warnings_of(r), r["error"])
                ours = ("NA/NaN function evaluation" in fit.warnings, fit.error)
                errors, errors_equal = errors + 1, errors_equal + (fit.error == r["error"])
            else:
                theirs = (r["convergence"], r["pd_hess"], short(warnings_of(r)), None)
                ours = (fit.convergence, fit.pd_hess, short(fit.warnings), fit.error or None)
            same = ours == theirs
            total, flags_agree, clean_agree = total + 1, flags_agree + same, clean_agree + (fit.clean == r["clean"])
            print(f"{'same' if same else 'DIFF'}  {name:15s} {dataset:20s} R {theirs}  plwlab {ours}", flush=True)
    print(f"flags equal on {flags_agree}/{total} fits; clean verdict equal on {clean_agree}/{total}; glmmTMB stopped with "
          f"an error on {errors}, plwlab names the same error on {errors_equal} of them")


if __name__ == "__main__":
    main()
