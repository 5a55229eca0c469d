"""The paper's figures from a results table, GLMM/GAM fits and a table of runs; each saved as PNG and PDF."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import special  # noqa: E402

from plwlab.analysis.gam import TensorGAMFit  # noqa: E402
from plwlab.analysis.glmm import GLMMFit  # noqa: E402
from plwlab.analysis.scores import unit_scores, wp  # noqa: E402

RUN_METRICS = {
    "loss_rsd": "training-loss RSD (5-step windows)",
    "param_distance": "L2 distance from pretrained weights",
    "memorization_bleu": "memorization BLEU",
    "generation_length": "generation length (tokens)",
}


def save(fig: plt.Figure, stem: Path) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf``; return both paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def performance_by_wp(rel: pd.DataFrame, fits: dict[str, GLMMFit], stem: Path) -> list[Path]:
    """Mean score on a 0-1 scale (simple aggregate; win rates and BLEU divided by 100) and mean min-max score
    (relative aggregate) by wp, per dataset, with the GLMM's fixed-effect curve and critical PLW on the relative
    panel."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    datasets = sorted(rel["dataset"].unique(), key=lambda d: rel.loc[rel["dataset"] == d, "rg"].iloc[0])
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(datasets)))
    grid = np.linspace(0, 1, 200)
    rel = rel.assign(unit_score=unit_scores(rel))
    for color, dataset in zip(colors, datasets):
        part = rel[rel["dataset"] == dataset]
        rg = part["rg"].iloc[0]
        simple = part.groupby("wp")["unit_score"].mean()
        relative = part.groupby("wp")["y_mm"].mean()
        label = f"{dataset} (Rg {rg:g})"
        axes[0].plot(simple.index, simple.values, "o-", color=color, label=label, ms=4)
        axes[1].plot(relative.index, relative.values, "o", color=color, ms=4, label=label)
        fit = fits.get(dataset)
        if fit is not None:
            c = fit.coef
            axes[1].plot(grid, special.expit(c["intercept"] + c["b1"] * grid + c["b2"] * grid**2), "-", color=color)
            if fit.critical_plw is not None:
                axes[1].axvline(wp(fit.critical_plw), color=color, ls=":", lw=1)
    axes[0].set(title="Simple aggregate", xlabel="wp = PLW^0.30103", ylabel="mean score (0-1; win rate, BLEU / 100)")
    axes[1].set(title="Relative aggregate + beta GLMM (dotted: critical PLW)", xlabel="wp = PLW^0.30103",
                ylabel="mean min-max score")  # fmt: skip
    ticks = [0, 0.01, 0.1, 0.5, 1]
    for ax in axes:
        ax.set_xticks(wp(np.array(ticks, float)), [f"{t:g}" for t in ticks])
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("PLW (wp scale)")
    axes[1].set_xlabel("PLW (wp scale)")
    axes[1].legend(fontsize=7, loc="lower center")
    return save(fig, stem)


def run_metric_boxplots(runs: pd.DataFrame, stem: Path, metrics: Sequence[str] | None = None) -> list[Path]:
    """Box plots by PLW of each run metric present in ``runs`` (loss RSD, weight distance, memorization BLEU,
    generation length)."""
    metrics = [m for m in (metrics or RUN_METRICS) if m in runs.columns and runs[m].notna().any()]
    if not metrics:
        raise ValueError(f"runs table has none of the metrics {list(RUN_METRICS)}")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    plws = sorted(runs["plw"].unique())
    for ax, metric in zip(axes[0], metrics):
        values = [runs.loc[runs["plw"] == p, metric].dropna().to_numpy() for p in plws]
        ax.boxplot(values, tick_labels=[f"{p:g}" for p in plws])
        ax.set(title=RUN_METRICS.get(metric, metric), xlabel="PLW")
        ax.tick_params(axis="x", rotation=45)
        ax.grid(alpha=0.3)
    return save(fig, stem)


def plw_rg_contour(gam: TensorGAMFit, stem: Path, rg_max: float = 8.0, optimal: dict[float, float] | None = None) -> list[Path]:
    """Contour of the GAM's te(PLW, Rg) term with the optimal PLW per Rg."""
    plw = np.linspace(0, 1, 201)
    rg = np.linspace(0.05, rg_max, 160)
    P, R = np.meshgrid(plw, rg)
    values = gam.te(P.ravel(), R.ravel()).reshape(P.shape)
    fig, ax = plt.subplots(figsize=(6.2, 4.6))
    filled = ax.contourf(P, R, values, levels=20, cmap="RdYlGn")
    ax.contour(P, R, values, levels=20, colors="k", linewidths=0.3, alpha=0.5)
    fig.colorbar(filled, ax=ax, label="te(PLW, Rg) (centred partial effect)")
    optimal = optimal or gam.optimal_plw(np.linspace(0.25, rg_max, 32))
    lo, hi = gam.rg_range
    inside = {r: p for r, p in optimal.items() if lo <= r <= hi}
    ax.plot(list(optimal.values()), list(optimal.keys()), "k.--", lw=0.8, ms=3, label="optimal PLW (extrapolated)")
    ax.plot(list(inside.values()), list(inside.keys()), "k.-", label=f"optimal PLW (data: Rg {lo:g}-{hi:g})")
    for a, b in ((rg[0], lo), (hi, rg[-1])):  # outside the data's Rg: hatched, an extrapolation
        if b > a:
            ax.axhspan(a, b, facecolor="white", alpha=0.55, hatch="//", edgecolor="grey", lw=0)
    ax.set(xlabel="PLW", ylabel="Rg (completion / prompt tokens)", title="GAM: score ~ te(PLW, Rg) + benchmark")
    ax.legend(loc="upper left")
    return save(fig, stem)
