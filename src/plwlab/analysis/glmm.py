"""The paper's beta GLMM, fitted as glmmTMB 1.1.5 fits it: same parameters, start, optimizer and diagnostics.

``y ~ wp + I(wp^2) + (0 + wp + I(wp^2) | benchmark) + (1 | model)``, ``family = beta_family()`` (logit link),
maximum likelihood with the Laplace approximation over the random effects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import special, stats

from plwlab.analysis.nlminb import EPS, nlminb
from plwlab.analysis.scores import WP_EXPONENT

GLMM_TERMS = ("intercept", "b1", "b2")
# glmmTMB's outer parameters, in its order: beta, betad, theta (per term: log SDs, then correlation parameters).
PARAMETERS = ("intercept", "b1", "b2", "log_phi", "log_sd_benchmark_wp", "log_sd_benchmark_wp2", "corr_benchmark",
              "log_sd_model")  # fmt: skip
GLMMTMB_CONTROL = {"iter_max": 300, "eval_max": 400}  # glmmTMBControl()'s optCtrl
OPTIM_HESS_STEP = 1e-3  # optimHess's ndeps, as TMB's sdreport uses it
LOG_MAX = float(np.log(np.finfo(float).max))  # above this, exp() overflows a double


def critical_plw(b1: float, b2: float) -> float | None:
    """PLW at the vertex of ``b1 wp + b2 wp^2``: ``(-b1 / (2 b2)) ** (1 / 0.30103)`` when ``b2 < 0`` and the vertex
    lies in (0, 1]; None (no interior optimum) otherwise."""
    if b2 >= 0:
        return None
    vertex = -b1 / (2 * b2)
    return float(vertex ** (1 / WP_EXPONENT)) if 0 < vertex <= 1 else None


def squeeze(y: np.ndarray, n: int) -> np.ndarray:
    """Smithson & Verkuilen's boundary squeeze into (0, 1): ``(y (n - 1) + 0.5) / n``."""
    return (np.asarray(y, float) * (n - 1) + 0.5) / n


def _warning(what: str) -> str:
    return f"Model convergence problem; {what}. See vignette('troubleshooting')"


@dataclass
class GLMMFit:
    """A fitted beta GLMM with glmmTMB's diagnostics: ``convergence`` and ``message`` are nlminb's,
    ``pd_hess`` is glmmTMB's (sdreport's Cholesky test of the finite-difference Hessian in the optimizer's
    parameters, then glmmTMB's own second look with numDeriv), ``warnings`` are the ones glmmTMB would print and
    ``error`` the one it would stop with (the fit is kept). ``clean`` = converged, positive-definite Hessian, no
    warning and no error.
    ``boundary`` lists variance components at the edge of the parameter space (an SD below 1e-4 or a correlation
    beyond ±0.9999: a singular fit), which glmmTMB does not report but which explain most of its warnings."""

    dataset: str
    n: int
    coef: dict[str, float]
    se: dict[str, float]
    p: dict[str, float]
    phi: float
    sd_benchmark: tuple[float, float]
    corr_benchmark: float
    sd_model: float
    objective: float
    convergence: int
    message: str
    iterations: int
    pd_hess: bool
    warnings: list[str]
    error: str
    boundary: list[str]

    @property
    def clean(self) -> bool:
        return self.convergence == 0 and self.pd_hess and not self.warnings and not self.error

    @property
    def loglik(self) -> float:
        """``logLik`` as glmmTMB gives it: minus nlminb's final objective, NaN where the Hessian is not positive
        definite (``objective`` keeps the value)."""
        return -self.objective if self.pd_hess else float("nan")

    @property
    def critical_plw(self) -> float | None:
        return critical_plw(self.coef["b1"], self.coef["b2"])

    def to_dict(self) -> dict[str, Any]:
        """One flat row; NaN (an SE or logLik glmmTMB gives as NA) becomes None, so summary.json stays strict JSON."""
        row: dict[str, Any] = {"dataset": self.dataset, "n": self.n}
        for term in GLMM_TERMS:
            row[term], row[f"se_{term}"], row[f"p_{term}"] = self.coef[term], self.se[term], self.p[term]
        row.update(
            critical_plw=self.critical_plw, phi=self.phi, sd_benchmark_wp=self.sd_benchmark[0],
            sd_benchmark_wp2=self.sd_benchmark[1], corr_benchmark=self.corr_benchmark, sd_model=self.sd_model,
            loglik=self.loglik, objective=self.objective, convergence=self.convergence, message=self.message,
            iterations=self.iterations, pd_hess=self.pd_hess, warnings="; ".join(self.warnings), error=self.error,
            boundary=";".join(self.boundary), clean=self.clean,
        )  # fmt: skip
        return {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in row.items()}


def _inner_hessian_overflows(p: np.ndarray) -> bool:
    """Where TMB's objective is NaN: glmmTMB solves the inner problem for the random effects in their own scale,
    whose Hessian holds ``Q_ij / (sd_i sd_j)`` (Q: the inverse correlation matrix, ``1 + theta^2`` on its diagonal);
    once an entry overflows a double the Laplace value is NaN, which nlminb counts as +Inf with a warning."""
    log_q = np.log1p(p[6] ** 2)
    log_rho = np.log(abs(p[6])) - 0.5 * log_q if p[6] != 0 else -np.inf
    largest = max(log_q - 2 * p[4], log_q - 2 * p[5], log_q + log_rho - p[4] - p[5], -2 * p[7])
    return bool(largest > LOG_MAX)


class BetaGLMMLaplace:
    """Negative Laplace log-likelihood of the beta GLMM and its exact gradient, in glmmTMB's parameters
    (:data:`PARAMETERS`): phi = exp(log_phi); benchmark SDs exp(log_sd); correlation theta / sqrt(1 + theta^2).

    The random effects are written ``u = Lambda z`` with ``z ~ N(0, I)`` (a linear change of variables, under which
    the Laplace approximation is unchanged), ``eta = X beta + A z`` with ``A = Z Lambda``. With ``l(z)`` the joint
    log density, ``z^`` its mode and ``H = A' W A + I`` (``W = -d2 loglik / d eta2``)::

        F(p) = -l(z^) + 1/2 log det H

    The gradient is exact: ``dF/dp = -dl/dp + 1/2 sum_i s_i (w'_i deta_i/dp + dw_i/dp) [+ tr(H^-1 A' W dA/dp)]``
    with ``s = diag(A H^-1 A')`` and ``deta/dp`` including the move of the mode, ``dz^/dp = H^-1 d(dl/dz)/dp``.
    """

    def __init__(self, y: np.ndarray, wp_: np.ndarray, benchmark: np.ndarray, model: np.ndarray) -> None:
        n = len(y)
        self.X = np.column_stack([np.ones(n), wp_, wp_**2])
        self.n_b, self.n_m = benchmark.max() + 1, model.max() + 1
        self.Z = np.zeros((n, 2 * self.n_b + self.n_m))
        rows = np.arange(n)
        self.Z[rows, 2 * benchmark] = wp_
        self.Z[rows, 2 * benchmark + 1] = wp_**2
        self.Z[rows, 2 * self.n_b + model] = 1.0
        self.logit_y, self.log_y, self.log_1my = np.log(y) - np.log1p(-y), np.log(y), np.log1p(-y)
        self.z = np.zeros(self.Z.shape[1])
        self._cache: tuple[bytes, float, np.ndarray | None] | None = None
        self.best_value, self.best = np.inf, np.zeros(len(PARAMETERS))

    def _block(self, p: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The 2x2 Cholesky factor of the benchmark covariance and its derivatives by (log_sd1, log_sd2, theta)."""
        s1, s2, t = np.exp(p[4]), np.exp(p[5]), p[6]
        root = np.sqrt(1 + t * t)
        block = np.array([[s1, 0.0], [s2 * t / root, s2 / root]])
        d_t = s2 / root**3
        return block, [np.array([[s1, 0.0], [0.0, 0.0]]), np.array([[0.0, 0.0], [s2 * t / root, s2 / root]]),
                       np.array([[0.0, 0.0], [d_t, -t * d_t]])]  # fmt: skip

    def _lambda(self, p: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        block, d_block = self._block(p)
        q = self.Z.shape[1]

        def expand(b: np.ndarray, model_sd: float) -> np.ndarray:
            lam = np.zeros((q, q))
            for k in range(self.n_b):
                lam[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = b
            lam[2 * self.n_b :, 2 * self.n_b :] = np.eye(self.n_m) * model_sd
            return lam

        sd_model = np.exp(p[7])
        return expand(block, sd_model), [expand(b, 0.0) for b in d_block] + [expand(np.zeros((2, 2)), sd_model)]

    def _derivatives(self, eta: np.ndarray, phi: float, order: int) -> dict[str, Any]:
        mu = np.clip(special.expit(eta), 1e-12, 1 - 1e-12)
        a, b = mu * phi, (1 - mu) * phi
        v = mu * (1 - mu)
        r = self.logit_y - special.digamma(a) + special.digamma(b)
        t1 = special.polygamma(1, a) + special.polygamma(1, b)
        out = {
            "ll": float(np.sum(special.gammaln(phi) - special.gammaln(a) - special.gammaln(b)
                               + (a - 1) * self.log_y + (b - 1) * self.log_1my)),
            "d1": phi * r * v,
            "d2": -(phi**2) * v**2 * t1 + phi * r * v * (1 - 2 * mu),
        }  # fmt: skip
        if order > 2:
            psi2_a, psi2_b = special.polygamma(2, a), special.polygamma(2, b)
            out["d3"] = (-(phi**2) * v**2 * (2 * (1 - 2 * mu) * t1 + phi * v * (psi2_a - psi2_b))
                         + phi * (-phi * v * t1 * v * (1 - 2 * mu) + r * (v * (1 - 2 * mu) ** 2 - 2 * v**2)))  # fmt: skip
            r_phi = -mu * special.polygamma(1, a) + (1 - mu) * special.polygamma(1, b)
            t1_phi = mu * psi2_a + (1 - mu) * psi2_b
            out["ll_phi"] = float(np.sum(special.digamma(phi) - mu * special.digamma(a) - (1 - mu) * special.digamma(b)
                                         + mu * self.log_y + (1 - mu) * self.log_1my))  # fmt: skip
            out["d1_phi"] = v * r + phi * v * r_phi
            out["d2_phi"] = -2 * phi * v**2 * t1 - phi**2 * v**2 * t1_phi + (r + phi * r_phi) * v * (1 - 2 * mu)
        return out

    def _mode(self, offset: np.ndarray, A: np.ndarray, phi: float) -> np.ndarray:
        """Conditional mode of z by damped Newton, warm-started from the last one (as TMB's inner problem)."""
        eye = np.eye(A.shape[1])

        def joint(z: np.ndarray) -> float:
            return self._derivatives(offset + A @ z, phi, 2)["ll"] - 0.5 * z @ z

        z = self.z.copy()
        value = joint(z)
        for _ in range(200):
            d = self._derivatives(offset + A @ z, phi, 2)
            grad = A.T @ d["d1"] - z
            H = A.T @ (-d["d2"][:, None] * A) + eye
            try:
                step = np.linalg.solve(H, grad)
                if grad @ step <= 0:  # not an ascent direction: H not positive definite here
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
            if np.max(np.abs(t * step)) < 1e-12:
                break
        self.z = z
        return z

    def evaluate(self, p: np.ndarray, gradient: bool = False) -> tuple[float, np.ndarray | None]:
        """(F(p), dF/dp or None); F is +inf where it cannot be computed."""
        p = np.asarray(p, float)
        key = p.tobytes()
        if self._cache is not None and self._cache[0] == key and (self._cache[2] is not None or not gradient):
            return self._cache[1], self._cache[2]
        if not np.all(np.isfinite(p)) or np.max(p[3:]) > 700:  # exp() would overflow
            return np.inf, None
        if _inner_hessian_overflows(p):
            return np.nan, None
        phi = np.exp(p[3])
        lam, d_lam = self._lambda(p)
        A = self.Z @ lam
        offset = self.X @ p[:3]
        z = self._mode(offset, A, phi)
        eta = offset + A @ z
        d = self._derivatives(eta, phi, 3 if gradient else 2)
        w = -d["d2"]
        H = A.T @ (w[:, None] * A) + np.eye(A.shape[1])
        sign, logdet = np.linalg.slogdet(H)
        value = -(d["ll"] - 0.5 * z @ z) + 0.5 * logdet if sign > 0 else np.inf
        grad = None
        if gradient and np.isfinite(value):
            h_inv = np.linalg.inv(H)
            s = np.einsum("ij,jk,ik->i", A, h_inv, A)
            w1 = -d["d3"]
            grad = np.empty(len(p))

            def total(dl: float, c: np.ndarray, e: np.ndarray, omega: np.ndarray | float) -> float:
                d_eta = e + A @ (h_inv @ c)
                return -dl + 0.5 * float(s @ (w1 * d_eta + omega))

            for k in range(3):
                xk = self.X[:, k]
                grad[k] = total(float(d["d1"] @ xk), A.T @ (d["d2"] * xk), xk, 0.0)
            grad[3] = total(phi * d["ll_phi"], A.T @ (phi * d["d1_phi"]), np.zeros_like(eta), -phi * d["d2_phi"])
            for k, dl in enumerate(d_lam, start=4):
                B = self.Z @ dl
                bz = B @ z
                grad[k] = total(float(d["d1"] @ bz), B.T @ d["d1"] + A.T @ (d["d2"] * bz), bz, 0.0)
                grad[k] += float(np.sum(h_inv * (A.T @ (w[:, None] * B))))
        self._cache = (key, value, grad)
        return value, grad

    def __call__(self, p: np.ndarray) -> float:
        """The objective as the optimizer calls it; the lowest finite value seen is kept in ``best`` (TMB's
        ``last.par.best``, where sdreport and glmmTMB's Hessian checks are made)."""
        value = self.evaluate(p)[0]
        if value < self.best_value:
            self.best_value, self.best = value, np.array(p, float)
        return value

    def gradient(self, p: np.ndarray) -> np.ndarray:
        grad = self.evaluate(p, gradient=True)[1]
        return grad if grad is not None else np.full(len(p), np.nan)


def optim_hess(gradient: Callable[[np.ndarray], np.ndarray], x: np.ndarray, step: float = OPTIM_HESS_STEP) -> np.ndarray:
    """R's ``optimHess(par, fn, gr)``: central differences of the gradient (step ndeps = 1e-3), symmetrised."""
    k = len(x)
    H = np.empty((k, k))
    for i in range(k):
        e = np.zeros(k)
        e[i] = step
        H[i] = (gradient(x + e) - gradient(x - e)) / (2 * step)
    return 0.5 * (H + H.T)


def _cholesky_succeeds(matrix: np.ndarray) -> bool:
    if not np.all(np.isfinite(matrix)):
        return False
    try:
        np.linalg.cholesky(matrix)
    except np.linalg.LinAlgError:
        return False
    return True


def _inverse_or_nan(matrix: np.ndarray) -> np.ndarray:
    """``solve(matrix)``, or NaN where R's ``try(solve(...))`` fails (as sdreport's ``Vtheta``)."""
    try:
        return np.linalg.inv(matrix) if np.all(np.isfinite(matrix)) else matrix * np.nan
    except np.linalg.LinAlgError:
        return matrix * np.nan


def numderiv_jacobian(func: Callable[[np.ndarray], np.ndarray], x: np.ndarray, eps: float = 1e-4, d: float = 1e-4,
                      r: int = 4, v: float = 2) -> np.ndarray:  # fmt: skip
    """R's ``numDeriv::jacobian(func, x)`` (method "Richardson", its defaults): central differences with steps
    ``h = |d x| + eps [|x| < zero.tol]`` halved ``r - 1`` times, combined by Richardson extrapolation."""
    x = np.asarray(x, float)
    n = len(x)
    rows = len(func(x))  # numDeriv evaluates func(x) first
    h = np.abs(d * x) + eps * (np.abs(x) < np.sqrt(EPS / 7e-7))
    a = np.empty((r, rows, n))
    for k in range(r):
        for i in range(n):
            e = np.zeros(n)
            e[i] = h[i]
            a[k, :, i] = (func(x + e) - func(x - e)) / (2 * h[i])
        h = h / v
    for m in range(1, r):
        a = (a[1:] * 4**m - a[:-1]) / (4**m - 1)
    return a[0]


def hessian_checks(gradient: Callable[[np.ndarray], np.ndarray],
                   best: np.ndarray) -> tuple[bool, np.ndarray, list[str], str]:  # fmt: skip
    """glmmTMB 1.1.5's checks at ``best`` (TMB's ``last.par.best``): ``(pd_hess, covariance, warnings, error)``.

    sdreport: ``optimHess`` of the gradient, ``pdHess`` = its Cholesky succeeds, covariance = its inverse. If not
    positive definite, glmmTMB looks again with numDeriv's Jacobian of the gradient (symmetrised): positive definite
    when its smallest eigenvalue exceeds machine epsilon (that Jacobian's inverse is then the covariance), else the
    warning "non-positive-definite Hessian matrix"; a non-finite Jacobian makes glmmTMB stop with ``eigen``'s error,
    returned as ``error``. If positive definite at once: "extreme or very small eigenvalues detected" when an
    eigenvalue of the inverse covariance is below 10 epsilon.
    """
    hess = optim_hess(gradient, best)
    pd_hess = _cholesky_succeeds(hess)
    cov = _inverse_or_nan(hess)
    warnings, error = [], ""
    if not pd_hess:
        h = numderiv_jacobian(gradient, best)
        h = 0.5 * (h + h.T)
        if not np.all(np.isfinite(h)):
            error = "infinite or missing values in 'x'"
        elif np.min(np.linalg.eigvalsh(h)) > EPS:
            pd_hess, cov = True, _inverse_or_nan(h)
        else:
            warnings.append(_warning("non-positive-definite Hessian matrix"))
    elif np.min(1 / np.linalg.eigvalsh(cov)) < EPS * 10:
        warnings.append(_warning("extreme or very small eigenvalues detected"))
    return pd_hess, cov, warnings, error


def fit_beta_glmm(data: pd.DataFrame, dataset: str = "") -> GLMMFit:
    """Fit the paper's beta GLMM to one dataset's rows of ``relative_scores`` output, as glmmTMB 1.1.5 does.

    The response is ``y_mm`` squeezed into (0, 1) with n = rows of the dataset. From glmmTMB's start (all
    parameters 0) nlminb minimises the Laplace objective (``iter.max = 300, eval.max = 400``); coefficients are
    nlminb's result, ``pd_hess``, the covariance (SEs, Wald p-values) and the Hessian warnings come from
    :func:`hessian_checks` at the best point evaluated, and nlminb's message is added when its code is not 3-6
    (e.g. "singular convergence (7)"), all worded as glmmTMB words them.
    """
    n = len(data)
    plws = sorted(data["plw"].unique())
    if len(plws) < 3:  # with PLW in {0, 1}, wp = wp^2: b1 and b2 are not identified
        raise ValueError(f"dataset {dataset!r}: the quadratic in wp needs at least 3 distinct PLW values, got "
                         f"{len(plws)} ({', '.join(f'{p:g}' for p in plws)}); add PLW values to the sweep")  # fmt: skip
    if n < len(PARAMETERS):
        raise ValueError(f"dataset {dataset!r}: {n} rows are too few for the GLMM's {len(PARAMETERS)} parameters")
    y = squeeze(data["y_mm"].to_numpy(float), n)
    benchmark = pd.factorize(data["benchmark"], sort=True)[0]
    model = pd.factorize(data["model"], sort=True)[0]
    objective = BetaGLMMLaplace(y, data["wp"].to_numpy(float), benchmark, model)
    result = nlminb(objective, objective.gradient, np.zeros(len(PARAMETERS)), **GLMMTMB_CONTROL)
    x = result.x
    pd_hess, cov, hessian_warnings, error = hessian_checks(objective.gradient, objective.best)
    # R's nlminb warns at every NaN objective (how many times depends on the path; plwlab says it once), before
    # glmmTMB's own warnings
    warnings = ["NA/NaN function evaluation"] * bool(result.nan_evaluations) + hessian_warnings
    if result.convergence != 0:
        warnings.append(_warning(result.message))
    with np.errstate(invalid="ignore"):  # a negative variance gives NaN, as in R
        se = np.sqrt(np.diag(cov)[:3])
    p = 2 * stats.norm.sf(np.abs(x[:3] / np.where(se > 0, se, np.nan)))
    sd_wp, sd_wp2, corr, sd_model = np.exp(x[4]), np.exp(x[5]), x[6] / np.sqrt(1 + x[6] ** 2), np.exp(x[7])
    boundary = [name for name, sd in (("sd_benchmark_wp", sd_wp), ("sd_benchmark_wp2", sd_wp2), ("sd_model", sd_model))
                if sd < 1e-4]  # fmt: skip
    if abs(corr) > 0.9999:
        boundary.append("corr_benchmark=±1")
    return GLMMFit(
        dataset=dataset, n=n,
        coef=dict(zip(GLMM_TERMS, map(float, x[:3]))), se=dict(zip(GLMM_TERMS, map(float, se))),
        p=dict(zip(GLMM_TERMS, map(float, p))), phi=float(np.exp(x[3])), sd_benchmark=(float(sd_wp), float(sd_wp2)),
        corr_benchmark=float(corr), sd_model=float(sd_model), objective=float(result.objective),
        convergence=result.convergence, message=result.message, iterations=result.iterations, pd_hess=pd_hess,
        warnings=warnings, error=error, boundary=boundary,
    )  # fmt: skip
