"""Confidence intervals for every parameter: Wald, profile likelihood, parametric bootstrap.

Profile intervals follow lme4's ``confint(method = "profile")``: the signed root deviance
ζ(ψ) = sign(ψ − ψ̂) √(D(ψ) − D̂), D(ψ) the ML deviance minimised over every other parameter with
ψ fixed, and the interval {ψ : |ζ(ψ)| ≤ z_{1−α/2}}. As in lme4 the profile is that of the ML
fit (a REML fit is refitted by ML for its profile; the table's estimates stay the fit's).
Variance parameters are profiled on the reporting scale (ln sd, atanh corr, ln σ; reported as
sd, corr and σ), with a lower limit 0 for an sd when ζ stays below z as sd → 0 (a boundary
estimate included); fixed effects by moving β_j into the response (the cross-products
transformed, never the rows). ζ's roots are found exactly (Brent's method on the inner
optimum), where lme4 interpolates a spline through a grid. Residual-structure fits (the
per-panel engine) are profiled the same way on its ML deviance, with the residual parameters
(sd, correlations, MA coefficients, the exponential structure's r) among the variance
parameters; there each point is minimised from two starts (:class:`_PanelProfiler`).

Where the time goes (sleepstudy, 6 parameters, warm compilation cache, this project's 2-core
machine): ≈ 4.5 s, 108 inner minimisations with ≈ 4,300 objective+gradient evaluations of
≈ 0.75 ms each (scipy's quasi-Newton on jitted value-and-gradient functions). One compiled
Newton solve per inner problem brought the warm time to 2.3 s but cost ≈ 25 s of compilation per
model with an empty cache, so the cheap-to-compile form stays.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from jaxmixed.errors import ModelError
from jaxmixed.inference import distributions as sps


def _labels(r) -> list[str]:
    return [f"{g}: {n}" if g else n for g, n in zip(r.random["group"], r.random["name"])]


def _wald(r, level: float) -> pd.DataFrame:
    from jaxmixed.inference.tables import component_layout, component_values

    fx = r.fixed
    if "df" in fx.columns:
        q = np.asarray(sps.t.ppf(0.5 + level / 200.0, fx["df"].to_numpy(dtype=float)))
    else:
        q = float(sps.norm.ppf(0.5 + level / 200.0))
    out = pd.DataFrame({"estimate": fx["coef"], "lower": fx["coef"] - q * fx["se"], "upper": fx["coef"] + q * fx["se"]})
    layout = component_layout(r.design.terms, bool(r.variance), r.engine.residual_rows(bool(r.variance))) \
        if r.family is None else None
    if layout is not None and len(layout) == len(r.random):
        eta = r.engine.eta(r.params, r.sigma, r.design.theta_scale)
        est, _, lo, hi = component_values(eta, layout, r.cov_eta, float(sps.norm.ppf(0.5 + level / 200.0)))
        rnd = pd.DataFrame({"estimate": est[0], "lower": lo[0], "upper": hi[0]}, index=_labels(r))
    else:
        rnd = pd.DataFrame({"estimate": r.random["estimate"].to_numpy(), "lower": r.random["ci_lower"].to_numpy(),
                            "upper": r.random["ci_upper"].to_numpy()}, index=_labels(r))
    return pd.concat([out, rnd])


def confint(r, method: str = "wald", level: float | None = None, **kwargs) -> pd.DataFrame:
    """DataFrame indexed by parameter (fixed effects, then the random-effects rows): estimate,
    lower, upper."""
    from jaxmixed.inference.tables import check_level

    level = check_level(r.level if level is None else level)
    m = str(method).lower()
    if m == "wald":
        if kwargs:
            raise ModelError(f"unknown argument(s) for Wald intervals: {', '.join(sorted(kwargs))}")
        return _wald(r, level)
    if m == "bootstrap":
        b = r.bootstrap(level=level, **kwargs)
        t = b.table
        return pd.DataFrame({"estimate": t["estimate"], "lower": t["ci_lower"],
                             "upper": t["ci_upper"]}).rename_axis(None)
    if m == "profile":
        if kwargs:
            raise ModelError(f"unknown argument(s) for profile intervals: {', '.join(sorted(kwargs))}")
        return profile_intervals(r, level)
    raise ModelError(f"confint method must be 'wald', 'profile' or 'bootstrap', not {method!r}")


# ---------------------------------------------------------------------------------------------
# the profile


class _Profiler:
    """The ML deviance of a PLS fit and its partial minimisations (jitted once per fit)."""

    def __init__(self, r):
        import jax
        import jax.numpy as jnp

        from jaxmixed.engine import pls

        self.jnp, self.pls = jnp, pls
        self.r, self.eng, self.data = r, r.engine, r.data
        self.shape = r.engine.shape
        shape, data = self.shape, self.data

        def dev_eta(free, mask, fixed):
            eta = jnp.where(mask, fixed, free)
            return -2.0 * pls.loglik_eta(eta, data, shape, False)

        self._dev_eta = jax.jit(jax.value_and_grad(dev_eta))
        sub = replace(shape, p=shape.p - 1)
        self.sub_shape = sub

        def dev_theta(theta, arrays):
            return pls.deviance(theta, arrays, sub, False)

        self._dev_theta = jax.jit(jax.value_and_grad(dev_theta)) if shape.p > 0 else None
        self._dev_full = jax.jit(jax.value_and_grad(lambda th: pls.deviance(th, data, shape, False)))
        self.lower = np.asarray(r.design.theta_lower, dtype=float)

    # -- the ML optimum ------------------------------------------------------------------
    def ml_fit(self):
        res = self._minimize_theta(self._dev_full, np.asarray(self.r.params, dtype=float))
        theta = res.x
        sol = self.pls.solve(theta, self.data, self.shape, False)
        self.theta_ml, self.sigma_ml = theta, float(sol.sigma)
        self.beta_ml = np.asarray(sol.beta)
        self.D_hat = float(res.fun)
        with np.errstate(divide="ignore", invalid="ignore"):
            self.eta_ml = np.asarray(self.eng.eta(theta, self.sigma_ml, self.r.design.theta_scale), dtype=float)

    # -- variance parameters -----------------------------------------------------------------
    def dev_at_eta(self, i: int, value: float, start):
        return _minimise_holding(self._dev_eta, i, value, start)

    # -- fixed effects -----------------------------------------------------------------------
    def arrays_fixing(self, j: int, b: float):
        """PLSArrays of the model with β_j = b: x_j·b moved into the response, column j gone."""
        jnp = self.jnp
        d = self.data
        p = self.shape.p
        R0 = np.linalg.inv(np.asarray(d.R0_inv))
        T = np.zeros((p + 1, p))
        keep = [k for k in range(p) if k != j]
        T[:p, :p - 1] = R0[:, keep]
        T[:p, p - 1] = -b * R0[:, j]
        T[p, p - 1] = 1.0
        Tj = jnp.asarray(T)
        return d._replace(Z1W=jnp.einsum("lqr,rs->lqs", jnp.asarray(d.Z1W), Tj), Z2W=jnp.asarray(d.Z2W) @ Tj,
                          WW=Tj.T @ jnp.asarray(d.WW) @ Tj, R0_inv=jnp.eye(p - 1), ld_x=jnp.zeros(()))

    def dev_fixing(self, j: int, b: float, start):
        res = self._minimize_theta(self._dev_theta, start, self.arrays_fixing(j, b))
        return float(res.fun), res.x

    def _minimize_theta(self, f, start, *args):
        return _minimize_bounded(f, start, self.lower, *args)


class _PanelProfiler:
    """The ML deviance of a residual-structure fit (the per-panel engine) and its partial
    minimisations (jitted once per fit): in the reporting metric η = (each term's ln sd /
    atanh corr, the residual parameters as the report has them) with a variance parameter held,
    in the engine's own parameters x (θ ≥ its bounds) with a fixed effect held."""

    def __init__(self, r):
        import jax

        from jaxmixed.engine import gls_panels

        self.r, self.gp = r, gls_panels
        ps, data = r.engine.ps, r.data
        self.ps = ps

        def dev_eta(free, mask, fixed):
            eta = jax.numpy.where(mask, fixed, free)
            return gls_panels.data_deviance(gls_panels.eta_to_x(eta, ps), data, ps, False)

        self._dev_eta = jax.jit(jax.value_and_grad(dev_eta))
        self._dev_x = jax.jit(jax.value_and_grad(lambda x, d: gls_panels.data_deviance(x, d, ps, False)))
        sub = replace(ps, p=ps.p - 1)
        self._dev_sub = jax.jit(jax.value_and_grad(lambda x, d: gls_panels.data_deviance(x, d, sub, False))) \
            if ps.p > 0 else None
        self.lower = np.asarray(r.engine.lower(), dtype=float)

    def _minimize_x(self, f, start, data):
        return _minimize_bounded(f, start, self.lower, data)

    def ml_fit(self):
        """The ML optimum from the fit's estimate (a REML fit is refitted by ML)."""
        r = self.r
        res = self._minimize_x(self._dev_x, np.asarray(r.params, dtype=float), r.data)
        x = res.x
        self.x_ml, self.D_hat = x, float(res.fun)
        self.beta_ml = np.asarray(self.gp.gls_solution(x, r.data.buckets, self.ps)[0])
        sigma = r.engine.sigma(x)
        self.sd_scale = float(np.exp(np.max(np.asarray(self.gp.split_params(x, self.ps)[1]))))
        with np.errstate(divide="ignore", invalid="ignore"):
            self.eta_ml = np.asarray(r.engine.eta(x, sigma, r.design.theta_scale), dtype=float)

    def dev_at_eta(self, i: int, value: float, start):
        """The deviance minimised with η_i = value, the better of two starts (see
        :meth:`dev_fixing`): ``start`` and the ML estimate with every term's sd on its boundary
        started at a tenth of the residual sd (a boundary sd's ln is flat there: BFGS from
        there would never bring it back)."""
        inside = np.where(np.isfinite(self.eta_ml) & (self.eta_ml > np.log(1e-6 * self.sd_scale)), self.eta_ml,
                          np.log(0.1 * self.sd_scale))
        best = None
        for x0 in (np.asarray(start, dtype=float), inside):
            D, x = _minimise_holding(self._dev_eta, i, value, x0)
            if best is None or D < best[0]:
                best = (D, x)
        return best

    def data_fixing(self, j: int, b: float):
        """PanelData of the model with β_j = b: x_j·b moved into the response, column j gone."""
        import jax.numpy as jnp

        p = self.ps.p
        T = np.zeros((p + 1, p))
        keep = [k for k in range(p) if k != j]
        T[keep, np.arange(p - 1)] = 1.0
        T[j, p - 1] = -b
        T[p, p - 1] = 1.0
        Tj = jnp.asarray(T)
        d = self.r.data
        buckets = tuple(bk._replace(W=bk.W @ Tj) for bk in d.buckets)
        markov = None if d.markov is None else tuple(
            mb._replace(W=jnp.einsum("rmP,rs->smP", mb.W, Tj), Wp=jnp.einsum("rmP,rs->smP", mb.Wp, Tj))
            for mb in d.markov)
        return d._replace(buckets=buckets, markov=markov)

    def dev_fixing(self, j: int, b: float, start):
        """The deviance minimised with β_j = b, the better of two starts: ``start`` (the last
        point's minimiser) and the ML estimate, a θ entry on its bound moved inside. Residual correlations and variance components
        can trade off (an AR(1) residual and a random intercept), so that the profile has more
        than one local minimum, and a θ entry on its bound is a stationary point (the deviance
        is even in θ) where a start would stay."""
        data = self.data_fixing(j, b)
        inside = self.x_ml.copy()
        on_bound = np.isfinite(self.lower) & (inside <= self.lower + 1e-8)
        inside[on_bound] = self.lower[on_bound] + 0.1 * self.sd_scale
        best = None
        for x0 in (np.array(start, dtype=float), inside):
            res = self._minimize_x(self._dev_sub, x0, data)
            if best is None or res.fun < best.fun:
                best = res
        return float(best.fun), best.x


def _minimize_bounded(f, start, lower, *args):
    """scipy's L-BFGS-B over x ≥ ``lower`` (−inf: free), on a jitted value-and-gradient ``f``."""
    from scipy.optimize import minimize

    bounds = [(lo if np.isfinite(lo) else None, None) for lo in lower]
    return minimize(_host(f), start, args=args, jac=True, method="L-BFGS-B", bounds=bounds,
                    options=dict(maxiter=500, ftol=1e-15, gtol=1e-10))


def _minimise_holding(f, i: int, value: float, start):
    """(min D, the minimiser) of a jitted value-and-gradient ``f(free, mask, fixed)`` with
    coordinate i held at ``value`` (scipy's BFGS from ``start``, non-finite entries, a variance
    on its boundary, started at −8)."""
    from scipy.optimize import minimize

    mask = np.zeros(len(start), dtype=bool)
    mask[i] = True
    x0 = np.where(np.isfinite(start), start, -8.0)
    x0[i] = 0.0
    res = minimize(_host(f), x0, args=(mask, value), jac=True, method="BFGS", options=dict(maxiter=400, gtol=1e-9))
    x = res.x.copy()
    x[i] = value
    return float(res.fun), x


def _host(f):
    """A jitted value-and-gradient function as scipy calls it: (value, gradient) in numpy; a
    point outside the model's domain (NaN: a set of residual correlations that is not positive
    definite) is +inf with a zero gradient, which the line searches step back from."""
    def g(x, *args):
        v, dv = (np.asarray(a, dtype=float) for a in f(x, *args))
        if not np.isfinite(v):
            return np.inf, np.zeros_like(dv)
        return v, dv

    return g


def _zeta(D, D_hat, side):
    """ζ; a deviance that is not finite (outside the domain) counts as far beyond any limit."""
    return side * (np.sqrt(max(D - D_hat, 0.0)) if np.isfinite(D) else 1e3)


def _root(zeta_of, x_hat, step, side, z, limit=None, max_double: int = 40):
    """The x on ``side`` (+1/−1) of x_hat with ζ(x) = side·z: bracket outward (doubling the
    step), then Brent. ``limit``: a value beyond which the interval is open (returned when ζ
    never reaches z before it)."""
    from scipy.optimize import brentq

    a = x_hat
    h = step
    for _ in range(max_double):
        b = x_hat + side * h
        if limit is not None and side * (b - limit) >= 0:
            b = limit
        zb = zeta_of(b)
        if abs(zb) >= z:
            return brentq(lambda x: abs(zeta_of(x)) - z, min(a, b), max(a, b), xtol=1e-10 * max(1.0, abs(b)),
                          rtol=1e-12)
        if limit is not None and b == limit:
            return None
        a = b
        h *= 2.0
    return None


class _GLMMProfiler:
    """The deviance of a GLMM fit (its own Laplace or quadrature objective) with one coordinate
    of the reporting parameters ξ = (β, each term's η, s) held, minimised over the others."""

    def __init__(self, r):
        import jax
        import jax.numpy as jnp

        from jaxmixed.engine import laplace

        shape, B = r.engine.shape, jnp.asarray(r.engine.B)
        data = jax.jit(laplace.panel_view)(r.data)  # one grouping factor: groups × rows (laplace)
        u0 = jnp.asarray(r.solution.u)  # PIRLS starts at the fit's modes

        def dev(free, mask, fixed):
            xi = jnp.where(mask, fixed, free)
            return laplace.deviance(laplace.params_of_report(xi, shape, B), data, shape, u0)

        self._dev = jax.jit(jax.value_and_grad(dev))
        self.xi_hat = np.asarray(laplace.report_of_params(r.params, shape, r.engine.B), dtype=float)
        self.D_hat = -2.0 * float(r.loglik)

    def dev_at(self, i: int, value: float, start):
        return _minimise_holding(self._dev, i, value, start)


def _glmm_profile_intervals(r, level: float) -> pd.DataFrame:
    """lme4's ``confint(glmer fit)``: ζ of the fit's own objective (Laplace or quadrature) for
    each fixed effect (data units) and variance parameter (ln sd, atanh corr, the scale's ln)."""
    from jaxmixed.inference.tables import component_layout

    if r.nagq == 0:
        raise ModelError("profile intervals need the likelihood maximised over every parameter; an nagq=0 fit "
                         "holds β at its PIRLS value: refit with nagq=1, or use confint(method='wald')")
    z = float(sps.norm.ppf(0.5 + level / 200.0))
    prof = _GLMMProfiler(r)
    p = r.design.p
    xi_hat = prof.xi_hat
    cov = np.asarray(r.cov_params, dtype=float) if r.cov_params is not None else np.full((len(xi_hat),) * 2, np.nan)
    steps = np.sqrt(np.abs(np.diag(cov)))
    steps = np.where(np.isfinite(steps) & (steps > 0), np.minimum(steps, 2.0), 0.5)
    residual = tuple((("sd(" + name[4:]) if name.startswith("var(") else name, kind)
                     for name, kind in r.display["residual_rows"])
    targets = [(j, name, "free") for j, name in enumerate(r.fixed.index)]
    for row in component_layout(r.design.terms, False, residual):
        targets.append((p + row.idx[0], f"{row.group}: {row.name}" if row.group else row.name, row.kind))
    rows = [_eta_row(kind, i, xi_hat, xi_hat, steps, prof.dev_at, prof.D_hat, z, 1.0) for i, _, kind in targets]
    return pd.DataFrame(rows, index=[name for _, name, _ in targets], columns=["estimate", "lower", "upper"])


def profile_intervals(r, level: float) -> pd.DataFrame:
    from jaxmixed.engine.gls_panels import MarginalEngine
    from jaxmixed.engine.pls import PLSEngine
    from jaxmixed.inference.tables import component_layout

    if r.family is not None:
        return _glmm_profile_intervals(r, level)
    if isinstance(r.engine, PLSEngine):
        prof = _Profiler(r)
    elif isinstance(r.engine, MarginalEngine):
        prof = _PanelProfiler(r)
    else:
        raise ModelError(f"profile intervals are not available for the {r.engine.name} engine; use "
                         "confint(method='wald') or 'bootstrap'")
    z = float(sps.norm.ppf(0.5 + level / 200.0))
    prof.ml_fit()
    start = prof.theta_ml if isinstance(prof, _Profiler) else prof.x_ml
    se = r.fixed["se"].to_numpy(dtype=float)
    rows = _fixed_rows(r.fixed["coef"].to_numpy(dtype=float), prof.beta_ml, se, prof.dev_fixing, start,
                       prof.D_hat, z)
    index = list(r.fixed.index)
    # variance parameters, in the reporting metric η
    layout = component_layout(r.design.terms, False, r.engine.residual_rows(False))
    eta_hat = prof.eta_ml
    try:
        H = -np.asarray(r.engine.hessian_eta(np.where(np.isfinite(eta_hat), eta_hat, -20.0), r.data, False))
        steps = np.sqrt(np.clip(np.diag(np.linalg.inv(H)), 1e-8, None))
    except Exception:  # noqa: BLE001 - a singular Hessian (boundary fits): a default step
        steps = np.full(len(eta_hat), 0.5)
    steps = np.where(np.isfinite(steps) & (steps > 0), np.minimum(steps, 2.0), 0.5)
    est_eta = np.asarray(r.engine.eta(r.params, r.sigma, r.design.theta_scale), dtype=float)
    scale = max(prof.sigma_ml if isinstance(prof, _Profiler) else prof.sd_scale, 1e-8)
    # (the per-panel engine's η is finite on the boundary: an sd below 1e-6 of the residual's)
    for row in layout:
        rows.append(_eta_row(row.kind, row.idx[0], eta_hat, est_eta, steps, prof.dev_at_eta, prof.D_hat, z, scale,
                             floor=np.log(1e-6 * scale)))
        index.append(f"{row.group}: {row.name}" if row.group else row.name)
    return pd.DataFrame(rows, index=index, columns=["estimate", "lower", "upper"])


def _fixed_rows(coef, beta_ml, se, dev_fixing, start, D_hat: float, z: float) -> list[tuple]:
    """(estimate, lower, upper) of each fixed effect: the roots of ζ(b), the deviance minimised
    over the variance parameters (from ``start``) with β_j = b."""
    rows = []
    for j in range(len(coef)):
        cache = {"start": np.array(start, dtype=float)}

        def zeta_b(b, j=j, cache=cache):
            D, x = dev_fixing(j, b, cache["start"])
            cache["start"] = x
            return _zeta(D, D_hat, np.sign(b - beta_ml[j]))

        bounds = []
        for side in (-1, 1):
            cache["start"] = np.array(start, dtype=float)
            x = _root(zeta_b, beta_ml[j], se[j], side, z)
            bounds.append(np.nan if x is None else x)
        rows.append((float(coef[j]), bounds[0], bounds[1]))
    return rows


#: how a reporting parameter maps to the table (sd, corr, residual MA coefficients, the
#: exponential structure's logit r), the η beyond which an interval is open and the bound then
_ETA_KINDS = {
    "sd": (np.exp, (-30.0, None), (0.0, np.nan)),
    "corr": (np.tanh, (-12.0, 12.0), (-1.0, 1.0)),
    "logit": (lambda v: 0.5 * (1.0 + np.tanh(0.5 * v)), (-12.0, 12.0), (0.0, 1.0)),
    "free": (lambda v: v, (None, None), (np.nan, np.nan)),
    "exp": (np.exp, (None, None), (np.nan, np.nan)),  # a GLMM family's scale
    "exp_neg": (lambda v: np.exp(-v), (None, None), (np.nan, np.nan)),  # its inverse (decreasing in η)
}


def _eta_row(kind: str, i: int, eta_hat, est_eta, steps, dev_at_eta, D_hat: float, z: float, scale: float,
             floor: float = -np.inf):
    """(estimate, lower, upper) of the parameter η_i, profiled from ``eta_hat`` (lower limit 0
    for an sd whose ζ stays below z as sd → 0, an estimate on the boundary included: η_i not
    finite, or an sd's below ``floor``; ``scale`` sets where such a profile starts)."""
    fwd, (lim_lo, lim_hi), (open_lo, open_hi) = _ETA_KINDS[kind]
    cache = {"start": eta_hat.copy()}
    centre = eta_hat[i]
    boundary = not np.isfinite(centre) or (kind == "sd" and centre < floor)
    est = float(fwd(est_eta[i])) if np.isfinite(est_eta[i]) else 0.0

    def zeta_e(v):
        D, x = dev_at_eta(i, v, cache["start"])
        cache["start"] = x
        return _zeta(D, D_hat, 1.0 if boundary else np.sign(v - centre))

    if boundary:  # sd estimated 0: the interval starts at 0
        hi = _root(zeta_e, np.log(1e-4 * scale), 1.0, 1, z)
        return est, 0.0, (np.nan if hi is None else float(fwd(hi)))
    lo = _root(zeta_e, centre, steps[i], -1, z, limit=None if lim_lo is None else
               (centre + lim_lo if kind == "sd" else lim_lo))
    cache["start"] = eta_hat.copy()
    hi = _root(zeta_e, centre, steps[i], 1, z, limit=lim_hi)
    lo_val, hi_val = open_lo if lo is None else float(fwd(lo)), open_hi if hi is None else float(fwd(hi))
    return (est, hi_val, lo_val) if kind == "exp_neg" else (est, lo_val, hi_val)  # (a decreasing map)
