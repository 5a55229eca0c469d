"""The paper's figures from a results table, GLMM/GAM fits and a table of runs; each saved as PNG and PDF."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
RUN_METRIC_UNITS = {"loss_rsd": "RSD (std / mean of the loss)", "param_distance": "L2 norm of weight change",
                    "memorization_bleu": "corpus BLEU (0-100)", "generation_length": "tokens per response"}  # fmt: skip
PLW_TICKS = [0, 0.01, 0.1, 0.5, 1]


def save(fig: plt.Figure, stem: Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` (``formats``); return the paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(f".{f}") for f in formats]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def dataset_colors(datasets: Sequence[str]) -> dict[str, Any]:
    """One colour per dataset, in the order given (by Rg): viridis, dark = low Rg."""
    return dict(zip(datasets, plt.cm.viridis(np.linspace(0, 0.9, len(datasets)))))


def dataset_label(dataset: str, rg: float) -> str:
    return f"{dataset} (Rg {rg:.2f})"


def _wp_axis(ax: plt.Axes) -> None:
    ax.set_xticks(wp(np.array(PLW_TICKS, float)), [f"{t:g}" for t in PLW_TICKS])
    ax.set_xlabel("PLW (wp = PLW^0.30103 scale)")
    ax.grid(alpha=0.3)


def _min_span(ax: plt.Axes, span: float) -> None:
    """Widen the y-axis to at least ``span`` around its data, so a flat line does not fill the panel."""
    lo, hi = ax.get_ylim()
    if hi - lo < span:
        mid = (lo + hi) / 2
        ax.set_ylim(mid - span / 2, mid + span / 2)


def performance_by_wp(rel: pd.DataFrame, fits: dict[str, GLMMFit], stem: Path) -> list[Path]:
    """Left: mean score on a 0-1 scale (simple aggregate; win rates and BLEU divided by 100) by wp, per dataset,
    with the standard error across benchmarks. Right: mean min-max score (relative aggregate) with the GLMM's
    fixed-effect curve and critical PLW; a fit that is not clean is drawn dashed and named so in the legend, one
    that is not identified (no standard errors) is not drawn. The legend sits below the panels."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharex=True)
    rgs = rel.groupby("dataset")["rg"].first().sort_values()
    colors = dataset_colors(list(rgs.index))
    grid = np.linspace(0, 1, 200)
    rel = rel.assign(unit_score=unit_scores(rel))
    for i, (dataset, rg) in enumerate(rgs.items()):
        color, part = colors[dataset], rel[rel["dataset"] == dataset]
        dodge = (i - (len(rgs) - 1) / 2) * 0.012  # error bars of datasets side by side, not on top of each other
        per_bench = part.groupby(["wp", "benchmark"])["unit_score"].mean().groupby("wp")
        mean, sem = per_bench.mean(), per_bench.sem().fillna(0)
        axes[0].errorbar(mean.index + dodge, mean.values, yerr=sem.values, fmt="o-", color=color, ms=4, capsize=3,
                         label=dataset_label(dataset, rg))  # fmt: skip
        rel_bench = part.groupby(["wp", "benchmark"])["y_mm"].mean().groupby("wp")
        axes[1].errorbar(rel_bench.mean().index + dodge, rel_bench.mean().values, yerr=rel_bench.sem().fillna(0).values,
                         fmt="o", color=color, ms=4, capsize=3)  # fmt: skip
        fit = fits.get(dataset)
        if fit is None:
            continue
        identified = np.isfinite(fit.se["b1"]) and np.isfinite(fit.se["b2"])
        if not identified:
            axes[1].plot([], [], " ", label=f"{dataset}: GLMM not identified (no curve)")
            continue
        c = fit.coef
        style = "-" if fit.clean else "--"
        note = "GLMM" if fit.clean else "GLMM NOT clean"
        crit = f", critical PLW {fit.critical_plw:.2g}" if fit.critical_plw is not None else ""
        axes[1].plot(grid, special.expit(c["intercept"] + c["b1"] * grid + c["b2"] * grid**2), style, color=color,
                     label=f"{dataset}: {note}{crit}")  # fmt: skip
        if fit.critical_plw is not None:
            axes[1].axvline(wp(fit.critical_plw), color=color, ls=":", lw=1)
    axes[0].set(title="Simple aggregate (mean ± SE over benchmarks)", ylabel="mean score (0-1; win rate, BLEU / 100)")
    axes[1].set(title="Relative aggregate + beta GLMM (dotted: critical PLW)", ylabel="mean min-max score (0-1)")
    for ax in axes:
        _wp_axis(ax)
    _min_span(axes[0], 0.1)
    axes[1].set_ylim(-0.05, 1.05)
    handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
    labels = [lab for ax in axes for lab in ax.get_legend_handles_labels()[1]]
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8, frameon=False)
    return save(fig, stem)


def run_metric_panels(runs: pd.DataFrame, stem: Path, metrics: Sequence[str] | None = None) -> list[Path]:
    """Each run metric present in ``runs`` (loss RSD, weight distance, memorization BLEU, generation length)
    against PLW, one line per dataset (mean and range over its runs at a PLW), coloured by Rg as in
    :func:`performance_by_wp`: a dataset's trend is not pooled with the others'."""
    metrics = [m for m in (metrics or RUN_METRICS) if m in runs.columns and runs[m].notna().any()]
    if not metrics:
        raise ValueError(f"runs table has none of the metrics {list(RUN_METRICS)}")
    runs = runs.copy()
    if "rg" not in runs.columns or runs["rg"].isna().all():
        runs["rg"] = 0.0
    runs["dataset"] = runs["dataset"].fillna("?") if "dataset" in runs.columns else "?"
    rgs = runs.groupby("dataset")["rg"].first().sort_values()
    colors = dataset_colors(list(rgs.index))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.9), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for dataset, rg in rgs.items():
            part = runs[(runs["dataset"] == dataset) & runs[metric].notna()]
            if part.empty:
                continue
            stats = part.groupby("plw")[metric].agg(["mean", "min", "max"])
            x = wp(stats.index.to_numpy(float))
            ax.errorbar(x, stats["mean"], yerr=[stats["mean"] - stats["min"], stats["max"] - stats["mean"]], fmt="o-",
                        color=colors[dataset], ms=4, capsize=3, label=dataset_label(dataset, rg))  # fmt: skip
        ax.set(title=RUN_METRICS.get(metric, metric), ylabel=RUN_METRIC_UNITS.get(metric, metric))
        _wp_axis(ax)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 4), fontsize=8,
               frameon=False)  # fmt: skip
    return save(fig, stem)


def plw_rg_contour(gam: TensorGAMFit, stem: Path, optimal: dict[float, float] | None = None) -> list[Path]:
    """Contour of the GAM's te(PLW, Rg) term over the data's Rg range (padded by 15%; the padding hatched as
    extrapolation) with the optimal PLW per Rg, drawn above the axes so a PLW of 0 stays visible."""
    lo, hi = gam.rg_range
    pad = 0.15 * (hi - lo)
    plw = np.linspace(0, 1, 201)
    rg = np.linspace(max(lo - pad, 0.01), hi + pad, 160)
    P, R = np.meshgrid(plw, rg)
    values = gam.te(P.ravel(), R.ravel()).reshape(P.shape)
    fig, ax = plt.subplots(figsize=(6.2, 5.0))
    filled = ax.contourf(P, R, values, levels=20, cmap="RdYlGn")
    ax.contour(P, R, values, levels=20, colors="k", linewidths=0.3, alpha=0.5)
    fig.colorbar(filled, ax=ax, label="te(PLW, Rg) (centred partial effect; green = better)")
    optimal = optimal or gam.optimal_plw(np.linspace(rg[0], rg[-1], 32))
    inside = {r: p for r, p in optimal.items() if lo <= r <= hi}
    ax.plot(list(optimal.values()), list(optimal.keys()), "k--", lw=0.8, clip_on=False, zorder=5,
            label="optimal PLW (extrapolated)")  # fmt: skip
    ax.plot(list(inside.values()), list(inside.keys()), "o-", color="k", mfc="white", ms=4, clip_on=False, zorder=6,
            label=f"optimal PLW (data: Rg {lo:.2f}-{hi:.2f})")  # fmt: skip
    for a, b in ((rg[0], lo), (hi, rg[-1])):  # outside the data's Rg: hatched, an extrapolation
        if b > a:
            ax.axhspan(a, b, facecolor="white", alpha=0.55, hatch="//", edgecolor="grey", lw=0)
    ax.set_xlim(-0.02, 1.0)
    ax.set(xlabel="PLW", ylabel="Rg (completion / prompt tokens)", title="GAM: score ~ te(PLW, Rg) + benchmark")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, frameon=False)
    return save(fig, stem)
