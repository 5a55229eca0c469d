"""R's ``nlminb`` for unconstrained minimisation with a gradient: the PORT library's DRMNG (David M. Gay's
double-dogleg trust region with BFGS updates of a Cholesky factor), translated from the Fortran that R ships
(``src/library/stats/src/portsrc.f``: DRMNG, DA7SST, DD7DOG, DW7ZBF, DL7UPD, DRLDST) with R's defaults
(``Rf_divset(2, ...)`` then ``nlminb``'s control: absolute function convergence off, scale 1).

glmmTMB fits with ``nlminb(par, fn, gr, control = list(iter.max = 300, eval.max = 400))`` and warns with nlminb's
message when the return code is not 3-6 ("singular convergence (7)", "false convergence (8)", ...). Those words
depend on where this quasi-Newton path stops, so plwlab follows the same path: the Fortran's GO TO labels are kept
as the states of two small loops (``_assess`` is DA7SST, ``nlminb`` is DRMNG plus R's driver).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

EPS = np.finfo(float).eps
MESSAGES = {
    3: "X-convergence (3)", 4: "relative convergence (4)", 5: "both X-convergence and relative convergence (5)",
    6: "absolute function convergence (6)", 7: "singular convergence (7)", 8: "false convergence (8)",
    9: "function evaluation limit reached without convergence (9)",
    10: "iteration limit reached without convergence (10)", 63: "fn cannot be computed at initial par (63)",
}  # fmt: skip


@dataclass
class NlminbResult:
    """What R's ``nlminb`` returns: ``convergence`` is 0 for codes 3-6 and 1 otherwise."""

    x: np.ndarray
    objective: float
    code: int
    iterations: int
    evaluations: tuple[int, int]  # (function, gradient)
    nan_evaluations: int = 0  # NaN objective values, each taken as +Inf with R's warning "NA/NaN function evaluation"

    @property
    def convergence(self) -> int:
        return 0 if 3 <= self.code <= 6 else 1

    @property
    def message(self) -> str:
        return MESSAGES.get(self.code, f"See PORT documentation.  Code ({self.code})")


@dataclass
class _State:
    """The IV and V entries DRMNG and DA7SST share (named as in the Fortran), at R's defaults."""

    # tolerances and factors (DV7DFL; nlminb's rel.tol, x.tol, step.min, step.max, sing.tol)
    afctol: float = 0.0  # R sets it to 0: no absolute function convergence test
    rfctol: float = 1e-10
    sctol: float = 1e-10
    xctol: float = 1.5e-8
    xftol: float = 100 * EPS
    lmax0: float = 1.0
    lmaxs: float = 1.0
    bias: float = 0.8
    decfac: float = 0.5
    incfac: float = 2.0
    rdfcmn: float = 0.1
    rdfcmx: float = 4.0
    tuner1: float = 0.1
    tuner2: float = 1e-4
    tuner3: float = 0.75
    tuner4: float = 0.5
    tuner5: float = 0.75
    # V scratch, zero as R allocates it
    f: float = 0.0
    f0: float = 0.0
    fdif: float = 0.0
    flstgd: float = 0.0
    dstnrm: float = 0.0
    dstsav: float = 0.0
    dst0: float = 0.0
    gtstep: float = 0.0
    gtslst: float = 0.0
    nreduc: float = 0.0
    preduc: float = 0.0
    plstgd: float = 0.0
    radfac: float = 0.0
    radius: float = 0.0
    reldx: float = 0.0
    stppar: float = 0.0
    dgnorm: float = 0.0
    gthg: float = 0.0
    # IV
    irc: int = 0
    mlstgd: int = 0
    model: int = 1
    nfcall: int = 1
    nfgcal: int = 1
    ngcall: int = 1
    niter: int = 0
    radinc: int = 0
    restor: int = 0
    stage: int = 0
    stglim: int = 1
    switch: int = 0
    toobig: int = 0
    xirc: int = 0


def _assess(s: _State) -> None:
    """DA7SST: assess the candidate step; sets ``s.irc`` (1-2 retry, 3-4 accept, 5-6 recompute, 7-12 stop)."""
    nfc, s.switch, s.restor, rfac1, goodx = s.nfcall, 0, 0, 1.0, True
    emaxs = 0.0
    i = s.irc
    if not 1 <= i <= 12:
        s.irc = 13
        return
    label = (20, 30, 10, 10, 40, 280, 220, 220, 220, 220, 220, 170)[i - 1]
    while True:
        if label == 10:  # new iteration
            s.stage, s.radinc, s.flstgd = 1, 0, s.f0
            if s.toobig == 0:
                label = 110
                continue
            s.stage, s.xirc, label = -1, i, 60
        elif label == 20:  # step recomputed: new model or smaller radius
            if s.model != s.mlstgd:
                label = 30
                continue
            s.stage, s.radinc, label = s.stglim, -1, 110
        elif label == 30:
            s.stage += 1
            label = 40
        elif label == 40:
            if s.stage > 0:
                label = 50
            elif s.toobig != 0:
                label = 60
            else:
                s.stage = -s.stage
                label = (20, 30, 110, 110, 70)[s.xirc - 1]
        elif label == 50:
            if s.toobig == 0:
                label = 70
            elif s.radinc > 0:
                label = 80
            else:
                s.stage, s.xirc, label = -s.stage, s.irc, 60
        elif label == 60:  # oversize step
            s.radfac, s.radinc, s.irc, s.restor = s.decfac, s.radinc - 1, 5, 1
            return
        elif label == 70:
            if s.f < s.flstgd:
                label = 110
                continue
            if s.model != s.mlstgd:
                s.model, s.switch = s.mlstgd, 1
            label = 80
        elif label == 80:  # restore the step that gave the lower f
            if s.flstgd < s.f0:
                s.restor, s.f, s.preduc, s.gtstep = 1, s.flstgd, s.plstgd, s.gtslst
                if s.switch == 0:
                    rfac1 = s.dstnrm / s.dstsav
                s.dstnrm, nfc, goodx = s.dstsav, s.nfgcal, False
            label = 110
        elif label == 110:
            s.fdif = s.f0 - s.f
            if s.fdif > s.tuner2 * s.preduc or s.radinc > 0:
                label = 140
                continue
            if s.f < s.f0:  # no (or only a trivial) decrease: new model or smaller radius
                s.nfgcal = nfc
            else:
                s.mlstgd, s.flstgd, s.f, s.restor = s.model, s.f, s.f0, 1
            s.irc = 1
            if s.stage >= s.stglim:
                s.irc, s.radinc = 5, s.radinc - 1
            label = 160
        elif label == 140:  # nontrivial decrease
            s.nfgcal, rfac1, s.dstsav = nfc, 1.0, s.dstnrm
            if s.fdif > s.preduc * s.tuner1:
                label = 190
                continue
            s.irc = 4 if s.stage >= s.stglim else 2
            label = 160
        elif label == 160:  # Fletcher's decrease factor
            s.xirc = s.irc
            emax = s.gtstep + s.fdif
            s.radfac = 0.5 * rfac1
            if emax < s.gtstep:
                s.radfac = rfac1 * max(s.rdfcmn, 0.5 * s.gtstep / emax)
            label = 170
        elif label == 170:  # false convergence test
            if s.reldx <= s.xftol:
                s.irc, label = 12, 240
                continue
            s.irc = s.xirc
            label = 200 if s.f < s.f0 else 230
        elif label == 190:  # good decrease
            if s.fdif < -s.tuner3 * s.gtstep or s.radinc < 0 or s.restor == 1:
                s.radfac, s.irc, label = 1.0, 3, 230
                continue
            s.radfac = s.rdfcmx
            gts = s.gtstep
            if s.fdif < (0.5 / s.radfac - 1.0) * gts:
                s.radfac = max(s.incfac, 0.5 * gts / (gts + s.fdif))
            s.irc = 4
            if s.stppar == 0 or (s.dst0 >= 0 and (s.dst0 < 2 * s.dstnrm or s.nreduc < 1.2 * s.fdif)):
                label = 230
                continue
            s.irc, s.radinc, label = 5, s.radinc + 1, 200
        elif label == 200:  # save the good step
            s.flstgd, s.mlstgd = s.f, s.model
            if s.restor != 1:
                s.restor = 2
            s.dstsav, s.nfgcal, s.plstgd, s.gtslst = s.dstnrm, nfc, s.preduc, s.gtstep
            label = 230
        elif label == 220:  # restart after convergence
            s.irc = s.xirc if s.dstsav >= 0 else 12
            label = 240
        elif label == 230:
            s.xirc, label = s.irc, 240
        elif label == 240:  # convergence tests
            if s.restor == 1 and s.flstgd < s.f0:
                s.restor = 3
            if abs(s.f) < s.afctol:
                s.irc = 10
            if 0.5 * s.fdif > s.preduc:
                return
            emax, emaxs = s.rfctol * abs(s.f0), s.sctol * abs(s.f0)
            if s.preduc <= emaxs and (s.dstnrm > s.lmaxs or s.stppar == 0):
                s.irc = 11
            if s.dst0 >= 0:
                i = 2 if (0 < s.nreduc <= emax) or (s.nreduc == 0 and s.preduc == 0) else 0
                if s.stppar == 0 and s.reldx <= s.xctol and goodx:
                    i += 1
                if i > 0:
                    s.irc = i + 6
            label = 250
        elif label == 250:  # consider a step of length lmaxs for the singular convergence test
            if (s.irc > 5 and s.irc != 12) or s.stppar == 0:
                return
            if s.dstnrm > s.lmaxs:
                if 0.5 * s.dstnrm <= s.lmaxs:
                    return
                xmax = s.lmaxs / s.dstnrm
                if xmax * (2 - xmax) * s.preduc >= emaxs:
                    return
            else:
                if s.preduc >= emaxs or (s.dst0 > 0 and 0.5 * s.dst0 <= s.lmaxs):
                    return
            label = 270
        elif label == 270:
            if s.nreduc < 0:
                label = 290
                continue
            s.gtslst, s.dstsav = s.gtstep, (-s.dstnrm if s.irc == 12 else s.dstnrm)
            s.plstgd, restor = s.preduc, s.restor
            s.restor = 0 if restor == 3 else 2
            s.irc = 6
            return
        elif label == 280:  # singular convergence test with the recomputed preduc
            s.gtstep, s.dstnrm = s.gtslst, abs(s.dstsav)
            s.irc = 12 if s.dstsav <= 0 else s.xirc
            s.nreduc, s.preduc, s.restor = -s.preduc, s.plstgd, 3
            label = 290
        elif label == 290:
            if -s.nreduc <= s.rfctol * abs(s.f0):
                s.irc = 11
            return


def _dogleg(s: _State, dig: np.ndarray, newton: np.ndarray) -> np.ndarray:
    """DD7DOG: the double-dogleg step for radius ``s.radius`` (``newton`` = H^-1 g, ``dig`` = g, scale 1)."""
    nwtnrm = s.dst0
    rlambd = s.radius / nwtnrm if nwtnrm > 0 else 1.0
    gnorm, ghinvg = s.dgnorm, 2 * s.nreduc
    if rlambd >= 1:  # Newton step inside the trust region
        s.stppar, s.dstnrm, s.gtstep, s.preduc = 0.0, nwtnrm, -ghinvg, s.nreduc
        return -newton
    s.dstnrm = s.radius
    cfact = (gnorm / s.gthg) ** 2
    cnorm = gnorm * cfact
    relax = 1 - s.bias * (1 - gnorm * cnorm / ghinvg)
    if rlambd >= relax:  # between the relaxed and the full Newton step
        s.stppar = 1 - (rlambd - relax) / (1 - relax)
        s.gtstep = -rlambd * ghinvg
        s.preduc = rlambd * (1 - 0.5 * rlambd) * ghinvg
        return -rlambd * newton
    if cnorm >= s.radius:  # scaled Cauchy step
        s.stppar = 1 + cnorm / s.radius
        s.gtstep = -s.radius * gnorm
        s.preduc = s.radius * (gnorm - 0.5 * s.radius * (s.gthg / gnorm) ** 2)
        return (-s.radius / gnorm) * dig
    ctrnwt = cfact * relax * ghinvg / gnorm
    t1 = ctrnwt - gnorm * cfact**2
    t2 = s.radius * (s.radius / gnorm) - gnorm * cfact**2
    t = relax * nwtnrm
    femnsq = (t / gnorm) * t - ctrnwt - t1
    t = t2 / (t1 + np.sqrt(t1**2 + femnsq * t2))
    t1, t2 = (t - 1) * cfact, -t * relax
    s.stppar = 2 - t
    s.gtstep = t1 * gnorm**2 + t2 * ghinvg
    s.preduc = -t1 * gnorm * ((t2 + 1) * gnorm) - t2 * (1 + 0.5 * t2) * ghinvg - 0.5 * (s.gthg * t1) ** 2
    return t1 * dig + t2 * newton


def _bfgs_update(L: np.ndarray, step: np.ndarray, y: np.ndarray) -> np.ndarray:
    """DW7ZBF + DL7UPD: the Cholesky factor of the BFGS-updated Hessian (Goldfarb's recurrence 3; the factor
    may get negative diagonal entries, as in the Fortran)."""
    n = len(step)
    w = L.T @ step
    shs, ys = w @ w, y @ step
    if ys >= 0.1 * shs:
        cy, cs = 1 / (np.sqrt(ys) * np.sqrt(shs)), 1 / shs
    else:  # damp y so the determinant falls by at most a factor 10
        theta = 0.9 * shs / (shs - ys)
        cy, cs = theta / (shs * np.sqrt(0.1)), (1 + (theta - 1) / np.sqrt(0.1)) / shs
    z = cy * _forward(L, y) - cs * w
    lam, beta, gamma = np.zeros(n), np.zeros(n), np.zeros(n)
    nu, eta, acc = 1.0, 0.0, 0.0
    for j in range(n - 2, -1, -1):
        acc += w[j + 1] ** 2
        lam[j] = acc
    for j in range(n - 1):
        a = nu * z[j] - eta * w[j]
        theta = 1 + a * w[j]
        sj = a * lam[j]
        lj = np.sqrt(theta**2 + a * sj)
        if theta > 0:
            lj = -lj
        lam[j] = lj
        b = theta * w[j] + sj
        gamma[j], beta[j] = b * nu / lj, (a - b * eta) / lj
        nu = -nu / lj
        eta = -(eta + a**2 / (theta - lj)) / lj
    lam[n - 1] = 1 + (nu * z[n - 1] - eta * w[n - 1]) * w[n - 1]
    out = L.copy()
    for k in range(n):
        j = n - 1 - k
        lj, ljj = lam[j], L[j, j]
        out[j, j] = lj * ljj
        wj, zj = w[j], z[j]
        w[j], z[j] = ljj * wj, ljj * zj
        if k == 0:
            continue
        for i in range(j + 1, n):
            lij = L[i, j]
            out[i, j] = lj * lij + beta[j] * w[i] + gamma[j] * z[i]
            w[i] += lij * wj
            z[i] += lij * zj
    return out


def _forward(L: np.ndarray, y: np.ndarray) -> np.ndarray:
    """DL7IVM: solve L x = y (L lower triangular)."""
    x = np.empty_like(y)
    for i in range(len(y)):
        x[i] = (y[i] - L[i, :i] @ x[:i]) / L[i, i]
    return x


def _backward(L: np.ndarray, y: np.ndarray) -> np.ndarray:
    """DL7ITV: solve L^T x = y."""
    x = y.astype(float).copy()
    for i in range(len(y) - 1, -1, -1):
        x[i] /= L[i, i]
        x[:i] -= x[i] * L[i, :i]
    return x


def _reldx(x: np.ndarray, x0: np.ndarray) -> float:
    """DRLDST: max |x - x0| / max (|x| + |x0|)."""
    scale = np.max(np.abs(x) + np.abs(x0))
    return float(np.max(np.abs(x - x0)) / scale) if scale > 0 else 0.0


def nlminb(fn: Callable[[np.ndarray], float], gr: Callable[[np.ndarray], np.ndarray], start: np.ndarray,
           iter_max: int = 150, eval_max: int = 200, rel_tol: float = 1e-10, x_tol: float = 1.5e-8) -> NlminbResult:  # fmt: skip
    """Minimise ``fn`` from ``start`` as R's ``nlminb(start, fn, gr, control = list(iter.max, eval.max, rel.tol,
    x.tol))`` does (no bounds, scale 1); a NaN objective counts as +Inf, as in R."""

    nan_evaluations = 0

    def f_at(x: np.ndarray) -> float:
        nonlocal nan_evaluations
        value = float(fn(x))
        nan_evaluations += bool(np.isnan(value))
        return np.inf if np.isnan(value) else value

    def g_at(x: np.ndarray) -> np.ndarray:
        value = np.asarray(gr(x), float)
        if not np.all(np.isfinite(value)):
            raise FloatingPointError(f"NA/NaN gradient evaluation at {x}")
        return value

    s = _State(rfctol=rel_tol, sctol=rel_tol, xctol=x_tol)
    x = np.array(start, float)
    n = len(x)
    L = np.eye(n)  # Hessian approximation diag(d)^2 with d = 1
    s.f = s.f0 = f_at(x)
    if not np.isfinite(s.f):
        return NlminbResult(x, s.f, 63, 0, (1, 0), nan_evaluations)
    g = g_at(x)
    s.dgnorm = float(np.linalg.norm(g))
    s.radius = s.lmax0
    x0, g0, step, saved_step, newton, temp, dig = (np.zeros(n) for _ in range(7))
    code, cnvcod, label = 0, 0, 80

    while True:
        if label == 80:  # next iteration
            if s.niter >= iter_max:
                code, label = 10, 350
                continue
            if s.niter > 0:
                s.radius = s.radfac * s.dstnrm
            s.niter += 1
            s.f0, s.irc, kagqt = s.f, 4, -1
            x0, g0 = x.copy(), g.copy()
            label = 130
        elif label == 130:  # function evaluation limit
            if s.nfcall < eval_max:
                label = 150
                continue
            code = 9
            if s.f >= s.f0:
                label = 350
                continue
            cnvcod, label = 9, 290
        elif label == 150:  # candidate step
            if kagqt < 0:
                half = _forward(L, g)
                s.nreduc = 0.5 * float(half @ half)
                newton = _backward(L, half)
                s.dst0 = float(np.linalg.norm(newton))
                dig = g.copy()
                s.gthg = float(np.linalg.norm(L.T @ dig))
                kagqt = 0
            step = _dogleg(s, dig, newton)
            if s.irc == 6:
                if s.restor != 2:
                    rstrst, label = 3, 200
                else:
                    rstrst, label = 2, 200
                continue
            s.toobig = 0
            if s.dstnrm <= 0:
                rstrst, label = 3, 200
                continue
            if s.irc == 5 and s.radfac > 1 and s.preduc <= 1.2 * s.fdif:
                rstrst, label = (3, 200) if s.restor != 2 else (0, 200)
                continue
            x = x0 + step
            s.nfcall += 1
            s.f = f_at(x)
            rstrst, label = 3, 200
        elif label == 200:  # assess the step
            s.reldx = _reldx(x, x0)
            _assess(s)
            if s.restor == 1:
                x = x0.copy()
            elif s.restor == 2:
                saved_step = step.copy()
            elif s.restor == 3:
                step = saved_step.copy()
                x = x0 + step
                s.reldx = _reldx(x, x0)
                s.restor = rstrst
            k = s.irc
            if k in (1, 5):  # recompute the step with the changed radius
                s.radius = s.radfac * s.dstnrm
                label = 130
            elif k == 6:  # step of length lmaxs for the singular convergence test
                s.radius, label = s.lmaxs, 150
            elif 7 <= k <= 12:  # convergence or false convergence
                cnvcod = k - 4
                if s.f >= s.f0 or s.xirc == 14:
                    label = 340
                else:
                    s.xirc, label = 14, 280
            elif k == 13:
                code, label = 64, 350
            else:
                label = 280
        elif label == 280:  # accept the step
            if s.irc == 3:
                temp = L @ (L.T @ step)
            label = 290
        elif label == 290:  # gradient at the new x
            s.ngcall += 1
            g = g_at(x)
            s.dgnorm = float(np.linalg.norm(g))
            if cnvcod != 0:
                label = 340
                continue
            y = g - g0
            if s.irc == 3:  # radius factor by gradient tests
                temp = temp - y
                if np.linalg.norm(temp) <= s.dgnorm * s.tuner4 or g @ step < s.gtstep * s.tuner5:
                    s.radfac = s.incfac
            L = _bfgs_update(L, step, y)
            label = 80
        elif label == 340:
            code, label = cnvcod, 350
        elif label == 350:
            return NlminbResult(x, s.f, code, s.niter, (s.nfcall, s.ngcall), nan_evaluations)
