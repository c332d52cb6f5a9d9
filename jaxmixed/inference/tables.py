"""Inference in Stata's metric: fixed-effects table, variance components with delta-method
standard errors, Wald and likelihood-ratio tests.

Variance components are estimated on the scale η = (ln sd, atanh corr, ln σ). Their covariance
is the inverse of the negative Hessian of the (restricted) log likelihood in η, with β profiled
out (for ML the inverse of the profiled Hessian equals the η-block of the full inverse). Reported
quantities g(η) (sd, var, corr, cov) get se = |∇g|ᵀ Cov(η) |∇g|^{1/2}; CIs are built on the ln/atanh
scale and transformed back, except covariances, whose CIs are symmetric on their own scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
import pandas as pd

from jaxmixed.errors import ModelError
from jaxmixed.inference import distributions as sps
from jaxmixed.engine.numerics import LOG_2PI

def check_level(level) -> float:
    """A confidence level in percent (10 to 99.99), or a ModelError."""
    if not (10.0 <= float(level) <= 99.99):
        raise ModelError(f"level must be between 10 and 99.99, not {level}")
    return float(level)


@dataclass(frozen=True)
class VarianceComponents:
    table: pd.DataFrame  # group, name, estimate, se, ci_lower, ci_upper (+ kind, term)
    eta: np.ndarray
    cov_eta: np.ndarray | None  # None where undefined (boundary fit, Hessian not negative definite)
    hessian_ok: bool
    singular: bool


def variance_components(engine, data, design, params, sigma, reml, variance, level, lams=None,
                        hessian_program=None, standard_errors=True) -> VarianceComponents:
    """The random-effects table in Stata's order and metric, for any engine: η from
    ``engine.eta``, Cov(η) from the inverse of −``engine.hessian_eta`` (or ``hessian_program``,
    a compiled form of it, e.g. the one kept on disk by ``programs.cached``), the residual rows
    from ``engine.residual_rows``. No Hessian (NaN standard errors) on a boundary fit or with
    ``standard_errors=False``."""
    eta = engine.eta(params, sigma, design.theta_scale, lams)
    singular = engine.singular(params, design.theta_scale)
    cov_eta, hessian_ok = None, False
    if standard_errors and not singular:
        hess = hessian_program or engine.hessian_eta
        H = np.asarray(hess(jax.device_put(eta), data, reml))
        cov_eta, hessian_ok = covariance_from_hessian(H)
    table = component_table(design.terms, eta, cov_eta, variance, level, engine.residual_rows(variance))
    return VarianceComponents(table=table, eta=eta, cov_eta=cov_eta, hessian_ok=hessian_ok, singular=singular)


def covariances_from_hessians(H, usable=None):
    """Cov(η) = (−H)⁻¹ for each Hessian of a batch H (k × m × m) where −H is finite and
    positive definite (and ``usable``), NaN elsewhere; and the mask of those where it is."""
    H = np.asarray(H, dtype=float)
    k = H.shape[0]
    cov = np.full_like(H, np.nan)
    ok = np.zeros(k, dtype=bool)
    finite = np.all(np.isfinite(H), axis=(1, 2)) & (np.ones(k, dtype=bool) if usable is None else usable)
    if finite.any():
        w = np.linalg.eigvalsh(-H[finite])
        good = w[:, 0] > 1e-10 * np.maximum(w[:, -1], 1.0)
        idx = np.flatnonzero(finite)[good]
        if idx.size:
            inv = np.linalg.inv(-H[idx])
            cov[idx] = 0.5 * (inv + np.swapaxes(inv, 1, 2))
        ok[idx] = True
    return cov, ok


def covariance_from_hessian(H):
    """(inverse of −H, True) where −H is finite and positive definite, else (None, False)."""
    cov, ok = covariances_from_hessians(np.asarray(H)[None])
    return (cov[0], True) if ok[0] else (None, False)


@dataclass(frozen=True)
class ComponentRow:
    """One row of the random-effects table: its group and name, how it is computed from η
    (kind sd, var, corr, cov, free or logit), the η entries it uses ((i,), or (sd_i, sd_j,
    corr) for a covariance) and its term (−1 for residual rows)."""

    group: str
    name: str
    kind: str
    idx: tuple
    term: int


def component_layout(terms, variance: bool, residual) -> list[ComponentRow]:
    """The rows of FitResult.random in Stata's order and metric.

    ``terms``: the design's TermBlocks (their η entries come first, in order); ``residual``:
    (name, kind) for the remaining η entries, kind "sd" (ln sd), "corr" (atanh), "free"
    (reported as is) or "logit" (reported as 1/(1+e^-η)). With ``variance`` sds are reported
    as variances and correlations of random effects as covariances."""
    rows = []
    pos = 0
    for k, tb in enumerate(terms):
        spec_term, s = tb.term, tb.structure
        names = list(spec_term.display)
        labels, kinds = s.eta_names(names), s.eta_kinds
        idx_sd = [pos + i for i, kd in enumerate(kinds) if kd == "sd"]
        for i, (lab, kd) in enumerate(zip(labels, kinds)):
            if kd == "sd":
                rows.append(ComponentRow(spec_term.label, ("var" + lab[2:]) if variance else lab,
                                         "var" if variance else "sd", (pos + i,), k))
            elif not variance:
                rows.append(ComponentRow(spec_term.label, lab, "corr", (pos + i,), k))
            elif len(idx_sd) == 1:  # exchangeable: cov = ρ sd²
                rows.append(ComponentRow(spec_term.label, "cov" + lab[4:], "cov", (idx_sd[0], idx_sd[0], pos + i), k))
            else:
                a, b = _pair_of(lab, names)
                rows.append(ComponentRow(spec_term.label, "cov" + lab[4:], "cov", (idx_sd[a], idx_sd[b], pos + i), k))
        pos += s.n_eta
    for name, kind in residual:
        if kind == "sd" and variance:
            name, kind = name.replace("sd(", "var(", 1), "var"
        rows.append(ComponentRow("", name, kind, (pos,), -1))
        pos += 1
    return rows


_FORWARD = {
    "sd": (np.exp, np.exp),
    "var": (lambda x: np.exp(2 * x), lambda x: 2 * np.exp(2 * x)),
    "corr": (np.tanh, lambda x: 1 - np.tanh(x) ** 2),
    "free": (lambda x: x, lambda x: np.ones_like(x)),
    "exp": (np.exp, np.exp),  # a scale reported as e^η, whatever ``variance`` says
    "exp_neg": (lambda x: np.exp(-x), lambda x: -np.exp(-x)),  # its reciprocal
    "logit": (lambda x: 0.5 * (1.0 + np.tanh(0.5 * x)),  # 1/(1+e^-x), without overflow
              lambda x: 0.25 * (1.0 - np.tanh(0.5 * x) ** 2)),
}


def component_values(eta, layout: list[ComponentRow], cov_eta=None, z: float = 1.96):
    """(estimate, se, ci_lower, ci_upper), each (k × rows), of the layout's rows from η
    (k × n_eta, or one vector) and Cov(η) (k × n_eta × n_eta, or one matrix; None or NaN
    where undefined): delta-method standard errors; CIs built on the ln/atanh/logit scale and
    transformed back, symmetric on their own scale for covariances. A bound or se beyond
    double precision (e^{η + z se} with a huge se: two groups, say) is NaN, not inf."""
    eta = np.atleast_2d(np.asarray(eta, dtype=float))
    k, m = eta.shape
    if cov_eta is None:
        cov = np.full((k, m, m), np.nan)
    else:
        cov = np.asarray(cov_eta, dtype=float).reshape(k, m, m)
    est = np.empty((k, len(layout)))
    se = np.full((k, len(layout)), np.nan)
    lo, hi = se.copy(), se.copy()
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for r, row in enumerate(layout):
            if row.kind != "cov":
                f, df = _FORWARD[row.kind]
                e = eta[:, row.idx[0]]
                v = cov[:, row.idx[0], row.idx[0]]
                se_e = np.where(np.isfinite(v), np.sqrt(v), np.nan)
                est[:, r] = f(e)
                se[:, r] = np.abs(df(e)) * se_e
                a, b = f(e - z * se_e), f(e + z * se_e)
                lo[:, r], hi[:, r] = np.minimum(a, b), np.maximum(a, b)  # (exp_neg decreases)
            else:  # cov from (ln sd_i, ln sd_j, atanh rho); i = j for exchangeable (∂cov/∂ln sd = 2 cov)
                i, j, c = row.idx
                rho = np.tanh(eta[:, c])
                sdij = np.exp(eta[:, i] + eta[:, j])
                est[:, r] = rho * sdij
                g = np.zeros((k, m))
                g[:, i] += est[:, r]
                g[:, j] += est[:, r]
                g[:, c] = sdij * (1 - rho**2)
                se[:, r] = np.sqrt(np.einsum("ki,kij,kj->k", g, cov, g))
                lo[:, r], hi[:, r] = est[:, r] - z * se[:, r], est[:, r] + z * se[:, r]
    se, lo, hi = (np.where(np.isfinite(x), x, np.nan) for x in (se, lo, hi))
    return est, se, lo, hi


def component_table(terms, eta, cov_eta, variance, level, residual) -> pd.DataFrame:
    """FitResult.random (with kind and term columns) for one fit: :func:`component_layout`
    and :func:`component_values`."""
    layout = component_layout(terms, variance, residual)
    est, se, lo, hi = component_values(eta, layout, cov_eta, sps.norm.ppf(0.5 + level / 200.0))
    return pd.DataFrame({"group": [r.group for r in layout], "name": [r.name for r in layout],
                         "estimate": est[0], "se": se[0], "ci_lower": lo[0], "ci_upper": hi[0],
                         "kind": [r.kind for r in layout], "term": [r.term for r in layout]})


def _pair_of(label: str, names):
    inner = label[label.index("(") + 1:-1]
    a, b = inner.split(",")
    return names.index(a), names.index(b)


def fixed_table(names, beta, cov_beta, level) -> pd.DataFrame:
    z = sps.norm.ppf(0.5 + level / 200.0)
    beta = np.asarray(beta)
    se = np.sqrt(np.diag(np.asarray(cov_beta)))
    zs = beta / se
    p = 2 * sps.norm.sf(np.abs(zs))
    return pd.DataFrame({"coef": beta, "se": se, "z": zs, "p": p,
                         "ci_lower": beta - z * se, "ci_upper": beta + z * se}, index=list(names))


def fixed_table_t(names, beta, cov_beta, df, level) -> pd.DataFrame:
    """The fixed-effects table with a df method: coef, se, t, df, p and CIs from t(df)."""
    beta = np.asarray(beta)
    df = np.asarray(df, dtype=float)
    se = np.sqrt(np.diag(np.asarray(cov_beta)))
    ts = beta / se
    p = 2 * sps.t.sf(np.abs(ts), df)
    q = sps.t.ppf(0.5 + level / 200.0, df)
    return pd.DataFrame({"coef": beta, "se": se, "t": ts, "df": df, "p": p,
                         "ci_lower": beta - q * se, "ci_upper": beta + q * se}, index=list(names))


def wald_statistic(L, beta, cov_beta, rhs=0.0) -> float:
    """(Lβ − rhs)ᵀ (L V Lᵀ)⁻¹ (Lβ − rhs): the Wald χ² of Lβ = rhs (L of full row rank)."""
    L = np.atleast_2d(np.asarray(L, dtype=float))
    diff = L @ np.asarray(beta, dtype=float) - rhs
    return float(diff @ np.linalg.solve(L @ np.asarray(cov_beta, dtype=float) @ L.T, diff))


def wald_test(names, beta, cov_beta):
    """χ² test that every fixed effect but ``_cons`` is zero: (chi2, df, p)."""
    idx = [i for i, n in enumerate(names) if n != "_cons"]
    if not idx:
        return (np.nan, 0, np.nan)
    chi2 = wald_statistic(np.eye(len(names))[idx], beta, cov_beta)
    return (chi2, len(idx), float(sps.chi2.sf(chi2, len(idx))))


def linear_loglik(stats, p: int, reml: bool) -> float:
    """(Restricted) log likelihood of the linear regression y = Xβ + ε, from WᵀW (``stats``:
    the engine's arrays, with ``ld_x`` = log|R₀|² when X is held in a basis X̃ = X R₀⁻¹).

    ML:   -n/2 [1 + log(2π RSS/n)]
    REML: -1/2 [(n-p) log(2π s²) + (n-p) + log|XᵀX|],  s² = RSS/(n-p)
    """
    WW = np.asarray(stats.WW)
    n = float(stats.n)
    XtX, Xty, yty = WW[:p, :p], WW[:p, p], WW[p, p]
    beta = np.linalg.solve(XtX, Xty) if p else np.zeros(0)
    rss = yty - Xty @ beta
    if not reml:
        return -0.5 * n * (1.0 + LOG_2PI + np.log(rss / n))
    nu = n - p
    # (the cross-products may hold X̃ = X R₀⁻¹: log|XᵀX| = log|X̃ᵀX̃| + log|R₀|²)
    ld = np.linalg.slogdet(XtX)[1] + float(getattr(stats, "ld_x", 0.0))
    return -0.5 * (nu * (LOG_2PI + np.log(rss / nu)) + nu + ld)


def lr_vs_linear(loglik, loglik0, k):
    """(stat, df, p, kind): χ̄²(01) for one variance parameter, conservative χ²(k) otherwise."""
    stat = max(0.0, 2.0 * (loglik - loglik0))
    if k == 1:
        p = 0.5 * sps.chi2.sf(stat, 1) if stat > 0 else 1.0
        return (stat, 1, float(p), "chibar2(01)")
    return (stat, k, float(sps.chi2.sf(stat, k)), "chi2")
