"""Analysis of PLW studies: relative aggregate, beta GLMM with critical PLW, and PLW recommendations by Rg."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, special, stats

from plwlab.benchmarks import WMT_TASKS

log = logging.getLogger(__name__)
WP_EXPONENT = 0.30103  # log10(2), so wp(0.1) = 0.5
GLMM_TERMS = ("intercept", "b1", "b2")


def wp(plw: np.ndarray | float) -> np.ndarray | float:
    """The paper's transformed PLW, ``PLW ** 0.30103`` (0 -> 0, 0.1 -> 0.5, 1 -> 1)."""
    return np.power(plw, WP_EXPONENT)


# The metric the analysis uses for each benchmark of an evaluate.py results table (all higher-is-better).
PRIMARY_METRICS = {
    "arc_challenge": "acc_norm", "piqa": "acc_norm", "truthfulqa_mc2": "acc", "winogrande": "acc",
    "truthfulqa_gen": "bleu_acc", "alpaca_eval": "win_rate", "pandalm": "win_rate",
    **dict.fromkeys(WMT_TASKS, "bleu"),
}  # fmt: skip


def primary_scores(results: pd.DataFrame, metrics: dict[str, str] | None = None) -> pd.DataFrame:
    """One score per run and benchmark from an evaluate.py table (which has a ``metric`` column): the rows of
    ``PRIMARY_METRICS`` updated by ``metrics``; other rows (memorization, generation length, secondary metrics) are
    dropped, as are NaN scores (e.g. a judge with no parseable verdict) and benchmarks not in either (with a warning).
    The ``metric`` column is kept (it says which scores are percentages). A table without it is returned as is."""
    if "metric" not in results.columns:
        return results
    chosen = {**PRIMARY_METRICS, **(metrics or {})}
    unknown = sorted(set(results["benchmark"]) - set(chosen) - {"memorization"})
    if unknown:
        log.warning("benchmarks without a chosen metric are left out (add --metric BENCHMARK=METRIC): %s", unknown)
    keep = results["metric"] == results["benchmark"].map(chosen)
    return results[keep & results["score"].notna()].reset_index(drop=True)


PERCENT_METRICS = ("win_rate", "bleu", "chrf", "ter")  # reported on 0-100; accuracies on 0-1


def unit_scores(results: pd.DataFrame) -> pd.Series:
    """Scores on one 0-1 scale for averaging across benchmarks: percentages (win rates, BLEU) divided by 100.
    Uses the ``metric`` column, or each benchmark's :data:`PRIMARY_METRICS` entry where there is none."""
    metric = results["metric"] if "metric" in results.columns else results["benchmark"].map(PRIMARY_METRICS)
    return results["score"].where(~metric.isin(PERCENT_METRICS), results["score"] / 100)


def relative_scores(results: pd.DataFrame) -> pd.DataFrame:
    """Add ``y_mm`` (score min-max scaled within each (dataset, benchmark)) and ``wp`` to a results table with
    columns model, dataset, rg, plw, benchmark, score. A constant group gets 0.5."""
    missing = {"model", "dataset", "rg", "plw", "benchmark", "score"} - set(results.columns)
    if missing:
        raise ValueError(f"results table lacks columns {sorted(missing)}")
    for column, what, fix in (("rg", "Rg values", "give each data file its own data.name"),
                              ("data_sha256", "data files (content hashes)", "give each data file its own data.name"),
                              ("train_steps", "training lengths (steps)", "analyse one study at a time")):  # fmt: skip
        if column not in results.columns:
            continue
        mixed = results.groupby(["dataset", "model"])[column].nunique()
        if (mixed > 1).any():
            (dataset, model), n = mixed.idxmax(), mixed.max()
            raise ValueError(f"dataset {dataset!r} has {n} different {what} for model {model!r}: different runs "
                             f"would be fitted as one group; {fix}")  # fmt: skip
    out = results.copy()
    group = out.groupby(["dataset", "benchmark"])["score"]
    lo, hi = group.transform("min"), group.transform("max")
    out["y_mm"] = np.where(hi > lo, (out["score"] - lo) / (hi - lo).where(hi > lo, 1.0), 0.5)
    out["wp"] = wp(out["plw"].to_numpy(float))
    return out


def squeeze(y: np.ndarray, n: int) -> np.ndarray:
    """Smithson & Verkuilen's boundary squeeze into (0, 1): ``(y (n - 1) + 0.5) / n``."""
    return (np.asarray(y, float) * (n - 1) + 0.5) / n


def critical_plw(b1: float, b2: float) -> float | None:
    """PLW at the vertex of ``b1 wp + b2 wp^2``: ``(-b1 / (2 b2)) ** (1 / 0.30103)`` when ``b2 < 0`` and the vertex
    lies in (0, 1]; None (no interior optimum) otherwise."""
    if b2 >= 0:
        return None
    vertex = -b1 / (2 * b2)
    return float(vertex ** (1 / WP_EXPONENT)) if 0 < vertex <= 1 else None


@dataclass
class GLMMFit:
    """Beta GLMM ``y ~ wp + wp^2 + (0 + wp + wp^2 | benchmark) + (1 | model)`` (logit link), fitted by maximum
    likelihood with the Laplace approximation. ``clean`` = converged (max |gradient| < 1e-4) with a
    positive-definite Hessian, as glmmTMB's flags; variance components on the boundary (an SD below 1e-4 or a
    correlation of ±1, a "singular fit") are listed in ``boundary`` (reported, never hidden)."""

    dataset: str
    n: int
    coef: dict[str, float]
    se: dict[str, float]
    p: dict[str, float]
    phi: float
    sd_benchmark: tuple[float, float]
    corr_benchmark: float
    sd_model: float
    loglik: float
    converged: bool
    pd_hess: bool
    boundary: list[str]
    restarts: int
    message: str

    @property
    def clean(self) -> bool:
        return self.converged and self.pd_hess

    @property
    def critical_plw(self) -> float | None:
        return critical_plw(self.coef["b1"], self.coef["b2"])

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"dataset": self.dataset, "n": self.n}
        for term in GLMM_TERMS:
            row[term], row[f"se_{term}"], row[f"p_{term}"] = self.coef[term], self.se[term], self.p[term]
        row.update(
            critical_plw=self.critical_plw, phi=self.phi, sd_benchmark_wp=self.sd_benchmark[0],
            sd_benchmark_wp2=self.sd_benchmark[1], corr_benchmark=self.corr_benchmark, sd_model=self.sd_model,
            loglik=self.loglik, converged=self.converged, pd_hess=self.pd_hess, boundary=";".join(self.boundary),
            clean=self.clean, restarts=self.restarts, message=self.message,
        )  # fmt: skip
        return row


class _BetaGLMMLaplace:
    """Negative Laplace log-likelihood of the beta GLMM in lme4's spherical form: random effects
    ``u = Lambda z`` with ``z ~ N(0, I)``, ``Lambda`` = blockdiag(13 x the 2x2 Cholesky factor of the benchmark
    covariance, sd_model I). Outer parameters ``theta = (b0, b1, b2, log phi, l11, l21, l22, sd_model)``.
    ``z`` is integrated out by the Laplace approximation around its conditional mode (exact Newton), the
    objective glmmTMB maximises; unlike a log-sd parameterisation it stays smooth at zero variances."""

    def __init__(self, y: np.ndarray, wp_: np.ndarray, benchmark: np.ndarray, model: np.ndarray) -> None:
        n = len(y)
        self.X = np.column_stack([np.ones(n), wp_, wp_**2])
        n_b, n_m = benchmark.max() + 1, model.max() + 1
        self.Z = np.zeros((n, 2 * n_b + n_m))
        rows = np.arange(n)
        self.Z[rows, 2 * benchmark] = wp_
        self.Z[rows, 2 * benchmark + 1] = wp_**2
        self.Z[rows, 2 * n_b + model] = 1.0
        self.n_b, self.n_m = n_b, n_m
        self.logit_y = np.log(y) - np.log1p(-y)
        self.log_y, self.log_1my = np.log(y), np.log1p(-y)
        self.z = np.zeros(self.Z.shape[1])

    def cholesky(self, theta: np.ndarray) -> np.ndarray:
        """Lambda (q x q), lower triangular."""
        block = np.array([[theta[4], 0.0], [theta[5], theta[6]]])
        lam = np.zeros((self.Z.shape[1],) * 2)
        for k in range(self.n_b):
            lam[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = block
        lam[2 * self.n_b :, 2 * self.n_b :] = np.eye(self.n_m) * theta[7]
        return lam

    def _terms(self, eta: np.ndarray, phi: float) -> tuple[float, np.ndarray, np.ndarray]:
        mu = np.clip(special.expit(eta), 1e-12, 1 - 1e-12)
        a, b = mu * phi, (1 - mu) * phi
        ll = special.gammaln(phi) - special.gammaln(a) - special.gammaln(b) + (a - 1) * self.log_y + (b - 1) * self.log_1my
        v = mu * (1 - mu)
        resid = self.logit_y - special.digamma(a) + special.digamma(b)
        d1 = phi * resid * v
        d2 = -(phi**2) * (special.polygamma(1, a) + special.polygamma(1, b)) * v**2 + phi * resid * v * (1 - 2 * mu)
        return float(ll.sum()), d1, d2

    def mode(self, theta: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        """Conditional mode of z: (z, log joint at z, H = -d2 log joint / dz2)."""
        phi = np.exp(theta[3])
        offset = self.X @ theta[:3]
        ZL = self.Z @ self.cholesky(theta)
        eye = np.eye(ZL.shape[1])

        def joint(z: np.ndarray) -> float:
            return self._terms(offset + ZL @ z, phi)[0] - 0.5 * z @ z

        z = self.z.copy()
        value = joint(z)
        for _ in range(200):
            _, d1, d2 = self._terms(offset + ZL @ z, phi)
            grad = ZL.T @ d1 - z
            H = ZL.T @ (-d2[:, None] * ZL) + eye
            try:
                step = np.linalg.solve(H, grad)
                if grad @ step <= 0:  # not a descent direction: H not positive definite here
                    raise np.linalg.LinAlgError
            except np.linalg.LinAlgError:
                step = grad
            t = 1.0
            while True:
                new_value = joint(z + t * step)
                if new_value >= value - 1e-12 or t < 1e-10:
                    break
                t /= 2
            z, value = z + t * step, new_value
            if np.max(np.abs(t * step)) < 1e-11:
                break
        _, _, d2 = self._terms(offset + ZL @ z, phi)
        self.z = z
        return z, value, ZL.T @ (-d2[:, None] * ZL) + eye

    def __call__(self, theta: np.ndarray) -> float:
        if not np.all(np.isfinite(theta)) or abs(theta[3]) > 30:
            return np.inf
        _, value, H = self.mode(theta)
        sign, logdet_h = np.linalg.slogdet(H)
        return -(value - 0.5 * logdet_h) if sign > 0 else np.inf

    @staticmethod
    def variance_components(theta: np.ndarray) -> tuple[float, float, float, float]:
        """(sd of the wp slope, sd of the wp^2 slope, their correlation, sd of the model intercept)."""
        l11, l21, l22 = theta[4:7]
        s1, s2 = abs(l11), float(np.hypot(l21, l22))
        corr = float(np.sign(l11) * l21 / s2) if s1 > 0 and s2 > 0 else 0.0
        return s1, s2, corr, abs(theta[7])


def _gradient(f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    g = np.empty_like(x)
    for i in range(len(x)):
        e = np.zeros_like(x)
        e[i] = h
        g[i] = (f(x + e) - f(x - e)) / (2 * h)
    return g


def _hessian(f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-4) -> np.ndarray:
    k = len(x)
    H = np.empty((k, k))
    for i in range(k):
        ei = np.zeros(k)
        ei[i] = h
        H[i] = (_gradient(f, x + ei, h) - _gradient(f, x - ei, h)) / (2 * h)
    return (H + H.T) / 2


def fit_beta_glmm(data: pd.DataFrame, dataset: str = "", restarts: int = 3, seed: int = 0) -> GLMMFit:
    """Fit the paper's beta GLMM to one dataset's rows of :func:`relative_scores` output.

    The response is ``y_mm`` squeezed into (0, 1) with n = rows of the dataset. Maximum likelihood by Laplace
    approximation: BFGS on the outer parameters, then Newton steps on the numerical Hessian; Wald SEs and
    p-values from that Hessian. A fit whose Hessian is not positive definite is restarted from perturbed
    starting values (up to ``restarts`` times) and the best fit is returned with its flags.
    """
    n = len(data)
    plws = sorted(data["plw"].unique())
    if len(plws) < 3:  # with PLW in {0, 1}, wp = wp^2: b1 and b2 are not identified
        raise ValueError(f"dataset {dataset!r}: the quadratic in wp needs at least 3 distinct PLW values, got "
                         f"{len(plws)} ({', '.join(f'{p:g}' for p in plws)}); add PLW values to the sweep")  # fmt: skip
    if n < 8:
        raise ValueError(f"dataset {dataset!r}: {n} rows are too few for the GLMM's 8 parameters")
    y = squeeze(data["y_mm"].to_numpy(float), n)
    benchmark = pd.factorize(data["benchmark"], sort=True)[0]
    model = pd.factorize(data["model"], sort=True)[0]
    objective = _BetaGLMMLaplace(y, data["wp"].to_numpy(float), benchmark, model)
    start = np.array([np.log(y.mean() / (1 - y.mean())), 0.0, 0.0, np.log(10.0), 1.0, 0.0, 1.0, 0.5])
    rng = np.random.default_rng(seed)
    best: tuple | None = None
    for attempt in range(restarts + 1):
        objective.z[:] = 0
        x0 = start if attempt == 0 else start + rng.normal(0, 0.5, size=start.shape)
        res = optimize.minimize(objective, x0, jac=lambda t: _gradient(objective, t), method="BFGS",
                                options={"gtol": 1e-7, "maxiter": 2000})  # fmt: skip
        x, hess = res.x, _hessian(objective, res.x)
        for _ in range(3):  # Newton polish: BFGS with numerical gradients stops a little early
            if not _positive_definite(hess):
                break
            candidate = x - np.linalg.solve(hess, _gradient(objective, x))
            if not objective(candidate) <= objective(x):
                break
            x, hess = candidate, _hessian(objective, candidate)
        pd_hess = _positive_definite(hess)
        if best is None or (pd_hess, -objective(x)) > (best[2], -objective(best[0])):
            best = (x, hess, pd_hess, attempt, res.message)
        if pd_hess:
            break
    x, hess, pd_hess, attempt, message = best
    cov = np.linalg.inv(hess) if pd_hess else np.linalg.pinv(np.nan_to_num(hess))
    se = np.sqrt(np.clip(np.diag(cov)[:3], 0, None))
    p = 2 * stats.norm.sf(np.abs(x[:3] / np.where(se > 0, se, np.nan)))
    sd_wp, sd_wp2, corr, sd_model = objective.variance_components(x)
    boundary = [name for name, sd in (("sd_benchmark_wp", sd_wp), ("sd_benchmark_wp2", sd_wp2), ("sd_model", sd_model)) if sd < 1e-4]
    if abs(corr) > 0.9999:
        boundary.append("corr_benchmark=±1")
    grad_norm = float(np.max(np.abs(_gradient(objective, x))))
    return GLMMFit(
        dataset=dataset, n=n,
        coef=dict(zip(GLMM_TERMS, map(float, x[:3]))), se=dict(zip(GLMM_TERMS, map(float, se))),
        p=dict(zip(GLMM_TERMS, map(float, p))), phi=float(np.exp(x[3])), sd_benchmark=(sd_wp, sd_wp2),
        corr_benchmark=corr, sd_model=sd_model, loglik=float(-objective(x)), converged=grad_norm < 1e-4,
        pd_hess=pd_hess, boundary=boundary, restarts=attempt, message=f"{message} (max |gradient| {grad_norm:.2g})",
    )  # fmt: skip


def _positive_definite(matrix: np.ndarray) -> bool:
    return bool(np.isfinite(matrix).all() and np.all(np.linalg.eigvalsh(matrix) > 0))
