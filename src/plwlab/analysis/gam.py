"""The paper's GAM, ``score ~ te(plw, rg, k=3) + factor(benchmark)``, with mgcv's defaults reproduced.

mgcv's ``te()`` uses a cubic regression spline ("cr") basis per margin, with ``k`` knots placed evenly through
the sorted unique covariate values (``place.knots``). The coefficients are the spline's values at the knots,
the penalty is the integrated squared second derivative, and the spline extends linearly beyond the end knots.
The tensor product has one penalty per margin (``S_plw ⊗ I`` and ``I ⊗ S_rg``) and a sum-to-zero
identifiability constraint. The smoothing parameters minimise GCV, mgcv's default for a Gaussian model:
``n ||y - A y||^2 / (n - tr A)^2``. pygam does none of this, so it does not reproduce mgcv.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import optimize


def place_knots(x: np.ndarray, k: int) -> np.ndarray:
    """mgcv's ``place.knots``: ``k`` knots spread evenly through the sorted unique values of ``x``."""
    u = np.unique(np.asarray(x, float))
    if k > len(u):
        raise ValueError(f"k={k} knots need at least {k} distinct covariate values, got {len(u)}")
    delta = (len(u) - 1) / (k - 1)
    inner = delta * np.arange(1, k - 1)
    lower = np.floor(inner).astype(int)
    frac = inner - lower
    return np.concatenate([[u[0]], u[lower] * (1 - frac) + u[np.minimum(lower + 1, len(u) - 1)] * frac, [u[-1]]])


class CubicRegressionSpline:
    """mgcv's "cr" basis: coefficients = spline values at the knots, natural end conditions."""

    def __init__(self, knots: np.ndarray) -> None:
        self.knots = np.asarray(knots, float)
        k = len(self.knots)
        h = np.diff(self.knots)
        D = np.zeros((k - 2, k))
        B = np.zeros((k - 2, k - 2))
        for i in range(k - 2):
            D[i, i], D[i, i + 1], D[i, i + 2] = 1 / h[i], -1 / h[i] - 1 / h[i + 1], 1 / h[i + 1]
            B[i, i] = (h[i] + h[i + 1]) / 3
            if i < k - 3:
                B[i, i + 1] = B[i + 1, i] = h[i + 1] / 6
        self.h = h
        self.F = np.vstack([np.zeros(k), np.linalg.solve(B, D), np.zeros(k)])  # second derivatives = F @ beta
        self.penalty = D.T @ np.linalg.solve(B, D)

    def basis(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, float)
        knots, h, F = self.knots, self.h, self.F
        k = len(knots)
        eye = np.eye(k)
        X = np.zeros((len(x), k))
        j = np.clip(np.searchsorted(knots, x, side="right") - 1, 0, k - 2)
        inside = (x >= knots[0]) & (x <= knots[-1])
        for row in np.flatnonzero(inside):
            i, hi = j[row], h[j[row]]
            left, right = x[row] - knots[i], knots[i + 1] - x[row]
            X[row] = (right / hi) * eye[i] + (left / hi) * eye[i + 1]
            X[row] += ((right**3 / hi - hi * right) / 6) * F[i] + ((left**3 / hi - hi * left) / 6) * F[i + 1]
        below, above = x < knots[0], x > knots[-1]
        slope_lo = (eye[1] - eye[0]) / h[0] - h[0] / 3 * F[0] - h[0] / 6 * F[1]
        slope_hi = (eye[-1] - eye[-2]) / h[-1] + h[-1] / 6 * F[-2] + h[-1] / 3 * F[-1]
        X[below] = eye[0] + (x[below] - knots[0])[:, None] * slope_lo
        X[above] = eye[-1] + (x[above] - knots[-1])[:, None] * slope_hi
        return X


def _row_kron(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a[:, :, None] * b[:, None, :]).reshape(len(a), -1)


@dataclass
class TensorGAMFit:
    """A fitted ``y ~ te(x, z, k) + factor(group)`` model."""

    x_name: str
    margins: tuple[CubicRegressionSpline, CubicRegressionSpline]
    constraint: np.ndarray  # Z: te coefficients = Z @ free coefficients
    coef: np.ndarray  # [intercept, group effects..., free te coefficients]
    groups: list[str]
    log_lambda: np.ndarray
    edf: float
    gcv: float
    n: int
    x_transform: str = "identity"  # "wp" fits te(wp, rg) (PLW ** 0.30103) as a robustness check
    te_edf: float = field(default=0.0)

    @property
    def rg_range(self) -> tuple[float, float]:
        """The Rg values the data span (the end knots): outside them the fit extrapolates linearly."""
        return float(self.margins[1].knots[0]), float(self.margins[1].knots[-1])

    def te(self, plw: np.ndarray, rg: np.ndarray) -> np.ndarray:
        """Value of the (centred) tensor-product term at PLW values ``plw`` and ratios ``rg``."""
        x = np.asarray(plw, float)
        if self.x_transform == "wp":
            x = np.power(x, 0.30103)
        basis = _row_kron(self.margins[0].basis(x), self.margins[1].basis(np.asarray(rg, float)))
        return basis @ self.constraint @ self.coef[-self.constraint.shape[1] :]

    def optimal_plw(self, rg_grid: np.ndarray, plw_grid: np.ndarray | None = None) -> dict[float, float]:
        """argmax over ``plw_grid`` (default 0..1 step 0.001) of the te term, for each Rg in ``rg_grid``."""
        plw_grid = np.round(np.arange(0, 1.0005, 0.001), 3) if plw_grid is None else np.asarray(plw_grid, float)
        out = {}
        for rg in np.asarray(rg_grid, float):
            values = self.te(plw_grid, np.full_like(plw_grid, rg))
            out[float(rg)] = float(plw_grid[int(np.argmax(values))])
        return out


def fit_te_gam(
    data: pd.DataFrame, y: str = "y_mm", x: str = "plw", z: str = "rg", group: str = "benchmark", k: int = 3,
    x_transform: str = "identity",
) -> TensorGAMFit:  # fmt: skip
    """Fit ``y ~ te(x, z, k=k) + factor(group)`` as mgcv does by default (cr bases, GCV smoothing parameters;
    log smoothing parameters searched within ±30, where the fit no longer changes).

    ``x_transform="wp"`` fits on ``wp = plw ** 0.30103`` instead of raw PLW (knots placed on the wp values).
    """
    if x_transform not in ("identity", "wp"):
        raise ValueError(f"x_transform must be 'identity' or 'wp', got {x_transform!r}")
    xv = data[x].to_numpy(float)
    if x_transform == "wp":
        xv = np.power(xv, 0.30103)
    zv, yv = data[z].to_numpy(float), data[y].to_numpy(float)
    n = len(yv)
    margins = (CubicRegressionSpline(place_knots(xv, k)), CubicRegressionSpline(place_knots(zv, k)))
    te_basis = _row_kron(margins[0].basis(xv), margins[1].basis(zv))
    q, _ = np.linalg.qr(te_basis.sum(axis=0)[:, None], mode="complete")  # sum-to-zero constraint over the data
    Zc = q[:, 1:]
    codes, groups = pd.factorize(data[group], sort=True)
    dummies = (codes[:, None] == np.arange(1, len(groups))[None, :]).astype(float)  # treatment contrasts
    X = np.column_stack([np.ones(n), dummies, te_basis @ Zc])
    p_fixed = 1 + dummies.shape[1]
    penalties = []
    for S in (np.kron(margins[0].penalty, np.eye(k)), np.kron(np.eye(k), margins[1].penalty)):
        full = np.zeros((X.shape[1], X.shape[1]))
        full[p_fixed:, p_fixed:] = Zc.T @ S @ Zc
        penalties.append(full / np.linalg.norm(full))  # scaling only reparameterises lambda
    XtX, Xty = X.T @ X, X.T @ yv

    def solve(rho: np.ndarray) -> tuple[np.ndarray, float, float]:
        A = XtX + sum(np.exp(r) * S for r, S in zip(rho, penalties))
        try:
            beta = np.linalg.solve(A, Xty)
        except np.linalg.LinAlgError:  # an unpenalised direction the data do not determine
            return np.full(X.shape[1], np.nan), np.nan, np.inf
        edf = float(np.trace(np.linalg.solve(A, XtX)))
        rss = float(np.sum((yv - X @ beta) ** 2))
        return beta, edf, n * rss / (n - edf) ** 2

    grid = np.linspace(-12, 12, 25)
    start = min(((a, b) for a in grid for b in grid), key=lambda r: solve(np.array(r))[2])
    res = optimize.minimize(lambda r: solve(r)[2], np.array(start, float), method="Nelder-Mead",
                            bounds=[(-30.0, 30.0)] * 2, options={"xatol": 1e-8, "fatol": 1e-14, "maxiter": 4000})  # fmt: skip
    beta, edf, gcv = solve(res.x)
    if not np.isfinite(gcv):
        raise ValueError(f"the GAM cannot be fitted to these {n} rows: the design is singular for every smoothing "
                         "parameter (too few distinct PLW x Rg configurations per benchmark)")  # fmt: skip
    A = XtX + sum(np.exp(r) * S for r, S in zip(res.x, penalties))
    influence = np.diag(np.linalg.solve(A, XtX))
    return TensorGAMFit(
        x_name=x, margins=margins, constraint=Zc, coef=beta, groups=list(groups), log_lambda=res.x, edf=edf,
        gcv=gcv, n=n, x_transform=x_transform, te_edf=float(influence[p_fixed:].sum()),
    )  # fmt: skip
