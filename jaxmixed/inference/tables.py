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
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxmixed.inference import distributions as sps
from jaxmixed.engine.numerics import LOG_2PI, hessian
from jaxmixed.engine.dense import _dof, deviance_at_sigma, deviance_parts
from jaxmixed.data.crossprod import Stats, Structure

#: θ entries closer than this to their lower bound: boundary (lme4's rule), applied to θ in the
#: optimiser's units, θ / Design.theta_scale (as if each random-effects column had unit scale)
SINGULAR_TOL = 1e-4


def term_lambdas(theta, struct: Structure):
    return [t.structure.lam(theta[t.theta[0]:t.theta[1]]) for t in struct.terms]


def eta_hat(theta, sigma, struct: Structure, lams=None) -> np.ndarray:
    """η at the estimate: each term's Stata parameters, then ln σ (``lams``: each term's Λ at
    θ when already computed, e.g. by the solve program, so that no eager JAX operation runs)."""
    parts = []
    for t, lam in zip(struct.terms, term_lambdas(theta, struct) if lams is None else lams):
        lam = np.asarray(lam)
        parts.append(t.structure.eta_from_sigma(sigma**2 * lam @ lam.T))
    parts.append(np.array([np.log(sigma)]))
    return np.concatenate(parts)


def theta_from_eta(eta, struct: Structure):
    """θ and ln σ for a Stata-metric parameter vector η."""
    log_sigma = eta[-1]
    sigma = jnp.exp(log_sigma)
    pos, parts = 0, []
    for t in struct.terms:
        k = t.structure.n_eta
        parts.append(t.structure.theta_from_eta(eta[pos:pos + k], sigma))
        pos += k
    return jnp.concatenate(parts), log_sigma


def loglik_eta(eta, stats: Stats, struct: Structure, reml: bool):
    """(Restricted) log likelihood as a function of η = (ln sd, atanh corr, …, ln σ)."""
    theta, log_sigma = theta_from_eta(eta, struct)
    return -0.5 * deviance_at_sigma(theta, log_sigma, stats, struct, reml)


@partial(jax.jit, static_argnames=("struct",))
def hessian_eta(eta, stats: Stats, struct: Structure, reml):
    """∇²_η of :func:`loglik_eta`, with k expensive columns for k θ entries, not k + 1.

    In x = (θ, s = ln σ) the deviance is D = P₀(θ) + ν(log 2π + 2s) + P₁(θ)e^{−2s}
    (:func:`objective.deviance_at_sigma`: P₀ = log|L|² (+ log|R_X|² for REML), P₁ = r²), so s
    enters only through scalars: one forward-over-reverse column per θ direction gives ∇²_θθ D,
    ∂²D/∂θ∂s (the s entry of that column) and ∇D; ∂²D/∂s² = 2(2ν − ∂D/∂s). The chain rule
    through the cheap map η → x then gives the Hessian in η: Jᵀ(∇²_x D)J + Σᵢ ∂D/∂xᵢ ∇²xᵢ(η).
    Equal to ``numerics.hessian(loglik_eta)`` to rounding (tests/test_engine.py)."""
    theta, s = theta_from_eta(eta, struct)
    nu = _dof(stats, struct, reml)

    def dev(th, s_):
        ld_L, ld_RX, pwrss = deviance_parts(th, stats, struct)
        return ld_L + jnp.where(reml, ld_RX, 0.0) + nu * (LOG_2PI + 2.0 * s_) + pwrss * jnp.exp(-2.0 * s_)

    grad_x = jax.grad(dev, argnums=(0, 1))

    def column(v):
        (g_th, g_s), (dg_th, dg_s) = jax.jvp(lambda th: grad_x(th, s), (theta,), (v,))
        return dg_th, dg_s, g_th, g_s

    k = theta.shape[0]
    H_tt, H_ts, g_th, g_s = jax.lax.map(column, jnp.eye(k, dtype=theta.dtype))
    H_tt = 0.5 * (H_tt + H_tt.T)
    H_ss = 2.0 * (2.0 * nu - g_s[0])
    H_x = jnp.block([[H_tt, H_ts[:, None]], [H_ts[None, :], H_ss[None, None]]])
    G = jnp.concatenate([g_th[0], g_s[:1]])

    def x_of(e):
        th, s_ = theta_from_eta(e, struct)
        return jnp.concatenate([th, s_[None]])

    J = jax.jacfwd(x_of)(eta)
    curvature = hessian(lambda e: G @ x_of(e))(eta)
    return -0.5 * (J.T @ H_x @ J + curvature)


def is_singular(theta, struct: Structure, scale=None) -> bool:
    """Some θ entry within SINGULAR_TOL of its bound, measured in the optimiser's units
    θ / ``scale`` (``Design.theta_scale``; None: θ as it is)."""
    th = np.asarray(theta) if scale is None else np.asarray(theta) / np.asarray(scale)
    return any(t.structure.boundary(th[t.theta[0]:t.theta[1]], SINGULAR_TOL) for t in struct.terms)


@dataclass(frozen=True)
class VarianceComponents:
    table: pd.DataFrame  # group, name, estimate, se, ci_lower, ci_upper (+ kind, term)
    eta: np.ndarray
    cov_eta: np.ndarray | None  # None where undefined (boundary fit, Hessian not negative definite)
    hessian_ok: bool


def variance_components(design, stats, struct, theta, sigma, reml, variance, level,
                        lams=None, hessian_program=None, standard_errors=True) -> VarianceComponents:
    """The random-effects table in Stata's order and metric (cross-product engine).

    ``lams``: each term's Λ at θ if already at hand (see ``eta_hat``); ``hessian_program``: a
    compiled form of :func:`hessian_eta` to use (``fitting`` passes the one kept on disk by
    ``programs.cached``); ``standard_errors=False``: no Hessian (NaN standard errors), for a fit
    whose table is replaced by another engine's (the start of a residual-structure fit)."""
    eta = eta_hat(theta, sigma, struct, lams)
    cov_eta, hessian_ok = None, False
    if standard_errors and not is_singular(theta, struct, design.theta_scale):
        H = np.asarray((hessian_program or hessian_eta)(jax.device_put(eta), stats, struct, reml))
        cov_eta, hessian_ok = covariance_from_hessian(H)
    residual = [("var(Residual)" if variance else "sd(Residual)", "sd")]
    table = component_table(design.terms, eta, cov_eta, variance, level, residual)
    return VarianceComponents(table=table, eta=eta, cov_eta=cov_eta, hessian_ok=hessian_ok)


def covariance_from_hessian(H):
    """(inverse of −H, True) where −H is finite and positive definite, else (None, False)."""
    if not np.all(np.isfinite(H)):
        return None, False
    w = np.linalg.eigvalsh(-H)
    if w[0] <= 1e-10 * max(w[-1], 1.0):
        return None, False
    cov = np.linalg.inv(-H)
    return 0.5 * (cov + cov.T), True


def component_table(terms, eta, cov_eta, variance, level, residual) -> pd.DataFrame:
    """Rows for each term's η entries, then the residual parameters.

    ``terms``: the design's TermBlocks (their η entries come first, in order); ``residual``:
    (name, kind) for the remaining η entries, kind "sd" (ln sd), "corr" (atanh), "free"
    (reported as is) or "logit" (reported as 1/(1+e^-η)). With ``variance`` sds are reported
    as variances and correlations of random effects as covariances.
    """
    z = sps.norm.ppf(0.5 + level / 200.0)
    rows = []

    def add(group, name, kind, idx, term):
        e = eta[idx[0]]
        if kind != "cov":
            est, lo, hi, dg = _transform(kind, e, cov_eta[idx[0], idx[0]] if cov_eta is not None else np.nan, z)
            rows.append((group, name, est, dg, lo, hi, kind, term))
        else:  # cov from (ln sd_i, ln sd_j, atanh rho) or (ln sd, atanh rho) for exchangeable
            sds = [np.exp(eta[i]) for i in idx[:-1]]
            rho = np.tanh(eta[idx[-1]])
            sdi, sdj = (sds[0], sds[0]) if len(sds) == 1 else sds
            est = rho * sdi * sdj
            grad = np.zeros(len(eta))
            for i in idx[:-1]:
                grad[i] += est
            if len(sds) == 1:  # exchangeable: cov = ρ sd², so ∂cov/∂ln sd = 2 cov
                grad[idx[0]] += est
            grad[idx[-1]] = sdi * sdj * (1 - rho**2)
            se = float(np.sqrt(grad @ cov_eta @ grad)) if cov_eta is not None else np.nan
            rows.append((group, name, est, se, est - z * se, est + z * se, kind, term))

    pos = 0
    for k, tb in enumerate(terms):
        spec_term, s = tb.term, tb.structure
        names = list(spec_term.display)
        labels, kinds = s.eta_names(names), s.eta_kinds
        idx_sd = [pos + i for i, kd in enumerate(kinds) if kd == "sd"]
        for i, (lab, kd) in enumerate(zip(labels, kinds)):
            if kd == "sd":
                add(spec_term.label, ("var" + lab[2:]) if variance else lab, "var" if variance else "sd", [pos + i], k)
            elif variance:
                # which sds: unstructured pair (i, j) or the common sd of an exchangeable term
                if len(idx_sd) == 1:
                    add(spec_term.label, "cov" + lab[4:], "cov", idx_sd + [pos + i], k)
                else:
                    a, b = _pair_of(lab, names)
                    add(spec_term.label, "cov" + lab[4:], "cov", [idx_sd[a], idx_sd[b], pos + i], k)
            else:
                add(spec_term.label, lab, "corr", [pos + i], k)
        pos += s.n_eta
    for name, kind in residual:
        if kind == "sd" and variance:
            name, kind = name.replace("sd(", "var(", 1), "var"
        add("", name, kind, [pos], -1)
        pos += 1
    return pd.DataFrame(rows, columns=["group", "name", "estimate", "se", "ci_lower", "ci_upper", "kind", "term"])


def _pair_of(label: str, names):
    inner = label[label.index("(") + 1:-1]
    a, b = inner.split(",")
    return names.index(a), names.index(b)


def _transform(kind, e, var_e, z):
    """Estimate, CI bounds and delta-method se of sd = e^η, var = e^{2η}, corr = tanh η,
    logit = 1/(1+e^-η), free = η. A bound or se that overflows double precision is NaN (no
    RuntimeWarning)."""
    se_e = np.sqrt(var_e) if np.isfinite(var_e) else np.nan
    if kind == "sd":
        f, df = np.exp, np.exp
    elif kind == "var":
        f, df = (lambda x: np.exp(2 * x)), (lambda x: 2 * np.exp(2 * x))
    elif kind == "logit":
        f = (lambda x: 0.5 * (1.0 + np.tanh(0.5 * x)))  # 1/(1+e^-x), without overflow
        df = (lambda x: f(x) * (1 - f(x)))
    elif kind == "free":
        f, df = (lambda x: x), (lambda x: 1.0)
    else:
        f, df = np.tanh, (lambda x: 1 - np.tanh(x) ** 2)
    with np.errstate(over="ignore", invalid="ignore"):
        est = float(f(e))
        se = float(abs(df(e)) * se_e)
        lo, hi = float(f(e - z * se_e)), float(f(e + z * se_e))
    # a bound or se beyond double precision (e^{η + z se} with a huge se: two groups, say) is
    # reported as not available rather than as inf
    se, lo, hi = (v if np.isfinite(v) else np.nan for v in (se, lo, hi))
    return est, lo, hi, se


def fixed_table(names, beta, cov_beta, level) -> pd.DataFrame:
    z = sps.norm.ppf(0.5 + level / 200.0)
    beta = np.asarray(beta)
    se = np.sqrt(np.diag(np.asarray(cov_beta)))
    zs = beta / se
    p = 2 * sps.norm.sf(np.abs(zs))
    return pd.DataFrame({"coef": beta, "se": se, "z": zs, "p": p,
                         "ci_lower": beta - z * se, "ci_upper": beta + z * se}, index=list(names))


def wald_test(names, beta, cov_beta):
    """χ² test that every fixed effect but ``_cons`` is zero: (chi2, df, p)."""
    idx = [i for i, n in enumerate(names) if n != "_cons"]
    if not idx:
        return (np.nan, 0, np.nan)
    b = np.asarray(beta)[idx]
    V = np.asarray(cov_beta)[np.ix_(idx, idx)]
    chi2 = float(b @ np.linalg.solve(V, b))
    return (chi2, len(idx), float(sps.chi2.sf(chi2, len(idx))))


def linear_loglik(stats: Stats, p: int, reml: bool) -> float:
    """(Restricted) log likelihood of the linear regression y = Xβ + ε, from WᵀW.

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
    return -0.5 * (nu * (LOG_2PI + np.log(rss / nu)) + nu + np.linalg.slogdet(XtX)[1])


def lr_vs_linear(loglik, loglik0, k):
    """(stat, df, p, kind): χ̄²(01) for one variance parameter, conservative χ²(k) otherwise."""
    stat = max(0.0, 2.0 * (loglik - loglik0))
    if k == 1:
        p = 0.5 * sps.chi2.sf(stat, 1) if stat > 0 else 1.0
        return (stat, 1, float(p), "chibar2(01)")
    return (stat, k, float(sps.chi2.sf(stat, k)), "chi2")
