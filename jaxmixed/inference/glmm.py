"""Post-estimation of GLMMs that needs many fits: draws of parameters in the reporting metric,
simulation from a fitted GLMM, and the draws of its parametric bootstrap (one vmapped program,
:func:`jaxmixed.fit.glmm.fit_responses`).

Draw d of the bootstrap uses ``numpy.random.default_rng([seed, d])``: the results depend only on
``seed`` and ``n``. Each draw simulates new random effects b* ~ N(0, Σ̂) per level and responses
y* | b* from the family at the fitted β̂ (and scale), on the rows the fit used, with its trials,
prior weights and offset; the refit starts from the fit's estimate.
"""

from __future__ import annotations

from dataclasses import replace

import jax.numpy as jnp
import numpy as np

from jaxmixed.engine import laplace
from jaxmixed.fit import glmm as glmm_fit
from jaxmixed.fit.glmm import fit_responses
from jaxmixed.inference.tables import component_layout, component_values, covariance_from_hessian
from jaxmixed.model.family import family_of, inverse_link


def report_draws(result, X) -> tuple[np.ndarray, np.ndarray]:
    """(β (k × p), random-effects table estimates (k × rows)) of parameter vectors X (k × m) of a
    GLMM fit's model, in the fit's reporting metric."""
    eng = result.engine
    xi = np.stack([laplace.report_of_params(x, eng.shape, eng.B) for x in np.atleast_2d(X)])
    p = eng.shape.p
    layout = component_layout(result.design.terms, result.variance, result.display["residual_rows"])
    with np.errstate(over="ignore", invalid="ignore"):
        est, _, _, _ = component_values(xi[:, p:], layout)
    return xi[:, :p], est


def simulate(result, n: int, seed: int = 0) -> np.ndarray:
    """(nobs × n) responses drawn from a fitted GLMM (successes for the binomial)."""
    des, eng, data = result.design, result.engine, result.data
    fam = family_of(result.family)
    lams = [np.asarray(lam) for lam in laplace.pls.factor_lambdas(eng.theta(result.params), eng.shape.re)]
    xb = des.X @ result.beta + np.asarray(data.offset)
    m, pw = np.asarray(data.m), np.asarray(data.pw)
    s = float(result.params[-1]) if fam.has_scale else 0.0
    out = np.empty((des.nobs, n))
    for d in range(n):
        rng = np.random.default_rng([int(seed), d])
        eta = xb.copy()
        for fac, lam in zip(des.factors, lams):
            b = rng.standard_normal((fac.n_levels, lam.shape[0])) @ lam.T
            eta += np.sum(fac.Z * b[fac.codes], axis=1)
        mu = inverse_link(result.link, eta, np)
        if fam.name == "binomial":
            y = rng.binomial(np.round(m).astype(np.int64), np.clip(mu, 0.0, 1.0))
        elif fam.name == "poisson":
            y = rng.poisson(mu)
        elif fam.name == "negbinomial":
            a = np.exp(s)
            y = rng.poisson(rng.gamma(a, mu / a))
        elif fam.name == "gamma":
            nu = np.exp(s)
            y = rng.gamma(nu, mu / nu)
        else:
            y = mu + np.exp(s) / np.sqrt(pw) * rng.standard_normal(len(mu))
        out[:, d] = y
    return out


def bootstrap_draws(result, n: int, seed: int, chunk_size=None, progress: bool = False):
    """(P (n × parameters) in the table's metric, ok (the refit did not break down), converged,
    x (n × m) the refitted parameters) of the parametric bootstrap of a GLMM fit."""
    Y = simulate(result, n, seed)
    lower, unit = result.display["bounds"]
    raw = fit_responses(Y, result.params, lower, unit, result.data, result.engine.shape, chunk_size or 32,
                        progress, label="bootstrap")
    beta, est = report_draws(result, raw["x"])
    P = np.concatenate([beta, est], axis=1)
    ok = np.isfinite(raw["fun"]) & np.all(np.isfinite(beta), axis=1)
    return P, ok, raw["converged"], raw["x"]


def lrtest_draws(small, big, n: int, seed: int, chunk_size=None, progress: bool = False):
    """(−2ℓ of ``small``, −2ℓ of ``big``) refitted to each of n responses simulated from the
    smaller GLMM (the null; :func:`simulate`), each model in one vmapped program started from
    its own estimates: the parametric bootstrap's LR statistics are their differences."""
    Y = simulate(small, n, seed)
    out = []
    for r, label in ((small, "null model"), (big, "alternative")):
        lower, unit = r.display["bounds"]
        raw = fit_responses(Y, r.params, lower, unit, r.data, r.engine.shape, chunk_size or 32, progress,
                            label=f"bootstrap_lrtest ({label})")
        out.append(np.asarray(raw["fun"]))
    return out[0], out[1]


def hessian_mask(engine, x, theta_scale):
    """(mask, singular): the reporting parameters whose Hessian rows are formed (all, or all but
    the variance parameters when they are on their bound: a boundary fit's standard errors of β
    and s hold Λ) for the estimates x."""
    p = engine.shape.p
    singular = engine.singular(x, theta_scale)
    mask = np.ones(p + engine.n_variance_params + engine.shape.n_scale)  # (ξ's length)
    if singular:
        mask[p:p + engine.n_variance_params] = 0.0
    return mask, singular


def fit_covariance(H, mask, B, S=None):
    """(Cov of (β, each term's η, s), Hessian usable, S usable) as a GLMM fit reports it: the
    inverse of −H on the coordinates where ``mask`` is 1 (NaN elsewhere and where −H is not
    positive definite); with ``S`` (an nAGQ = 0 fit's joint PIRLS information on β̃) the β block
    is lme4's B S⁻¹ Bᵀ and its cross-covariances NaN."""
    p = np.asarray(B).shape[0]
    keep = np.flatnonzero(mask > 0)
    cov = np.full((len(mask), len(mask)), np.nan)
    c, h_ok = covariance_from_hessian(np.asarray(H)[np.ix_(keep, keep)])
    if c is not None:
        cov[np.ix_(keep, keep)] = c
    s_ok = True
    if S is not None:
        cov[:p, :] = cov[:, :p] = np.nan
        try:
            cov[:p, :p] = B @ np.linalg.solve(S, np.asarray(B).T)
        except np.linalg.LinAlgError:
            s_ok = False
    return cov, h_ok, s_ok


def covariances_responses(X, Y, data, shape, B, unit, chunk_size: int = 32):
    """Cov of (β, each term's η, s) per response (k × m × m; NaN where the Hessian is not
    negative definite) at the fits X (k × m) of the responses Y (n × k), as ``jm.fit`` forms
    them for one fit (:func:`hessian_mask`, :func:`fit_covariance`). Also the mask of lanes
    whose covariance is usable, and of the boundary fits."""
    engine = laplace.LaplaceEngine(shape, np.asarray(B))
    k = X.shape[0]
    p = shape.p
    XI = np.stack([laplace.report_of_params(x, shape, B) for x in X])
    masks, singular = zip(*(hessian_mask(engine, x, unit[p:p + shape.re.n_theta]) for x in X))
    masks, singular = np.stack(masks), np.array(singular)
    nagq0 = shape.nagq == 0
    lap = replace(shape, nagq=1) if nagq0 else shape
    chunk = max(1, min(int(chunk_size), k))
    Hs, Ss = [], []
    for a in range(0, k, chunk):
        sl = slice(a, a + chunk)
        xi, mk, yb = np.where(np.isfinite(XI[sl]), XI[sl], 0.0), masks[sl], Y[:, sl].T
        j = xi.shape[0]
        if j < chunk:  # pad with copies of the chunk's first lane: one compiled shape
            xi, mk, yb = (np.concatenate([v, np.repeat(v[:1], chunk - j, axis=0)]) for v in (xi, mk, yb))
        H, S = glmm_fit.hessians_responses(jnp.asarray(xi), jnp.asarray(mk), jnp.asarray(yb), data, lap,
                                           jnp.asarray(B), nagq0=nagq0)
        Hs.append(np.asarray(H)[:j])
        Ss.append(np.asarray(S)[:j])
    H, S = np.concatenate(Hs), np.concatenate(Ss)
    out = [fit_covariance(H[i], masks[i], B, S[i] if nagq0 else None) for i in range(k)]
    cov = np.stack([c for c, _, _ in out])
    ok = np.array([h and s for _, h, s in out])
    return cov, ok, singular
