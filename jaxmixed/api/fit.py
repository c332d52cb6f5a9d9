"""The fit driver: parse → design → stats → objective → optimise → inference → FitResult.

Each stage is usable alone; ``fit_spec`` only chains them. Nothing here prints.
"""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxmixed.inference import distributions
from jaxmixed.inference import tables as inference
from jaxmixed.runtime import programs
from jaxmixed.data.design import Design, build_design
from jaxmixed.runtime.devices import host_array as _host
from jaxmixed.errors import ModelError, warn
from jaxmixed.engine.dense import deviance, solve
from jaxmixed.fit.optimizers import OptResult, minimize_bounded, minimize_quasi_newton
from jaxmixed.results.fitresult import FitResult
from jaxmixed.data.crossprod import Stats, Structure, cross_products, moment_start, structure_of
from jaxmixed.model.spec import ModelSpec

TRACE_COUNT = {"optimize": 0}  # incremented each time the optimiser is traced (tests read it)


def scaled_deviance(theta_s, stats: Stats, struct: Structure, reml, scale):
    """The profiled deviance at θ = scale ⊙ θ_s: the objective in the optimiser's units
    (``Design.theta_scale``), where θ_s is O(1) whatever the scale of the covariates."""
    return deviance(theta_s * scale, stats, struct, reml)


@programs.cached(static_argnames=("struct", "max_iter"))
def optimize_theta(theta0, lower, stats: Stats, struct: Structure, reml,
                   max_iter: int = 200, scale=None) -> OptResult:
    """Minimise the profiled deviance over θ ≥ lower (one compiled program per model shape).

    The optimiser works on θ_s = θ / ``scale`` (``Design.theta_scale``, an array so that data on
    other scales reuse the program; None: 1), so its tolerances mean the same for covariates on
    any scale; θ₀, the bounds and the returned x and gradient are in θ's own units.
    Projected Newton with the exact Hessian; where Hessians are costly (the blocked engine with
    large dense panels, ``struct.quasi_newton``) projected BFGS on exact gradients instead."""
    TRACE_COUNT["optimize"] += 1
    scale = jnp.ones_like(theta0) if scale is None else jnp.asarray(scale, dtype=theta0.dtype)
    args = (stats, struct, reml, scale)
    minimize = minimize_quasi_newton if struct.quasi_newton else minimize_bounded
    opt = minimize(scaled_deviance, theta0 / scale, lower / scale, args, max_iter=max_iter)
    return opt._replace(x=opt.x * scale, grad=opt.grad / scale)


def _method(method: str) -> bool:
    m = str(method).lower()
    if m in ("reml",):
        return True
    if m in ("ml", "mle"):
        return False
    raise ModelError(f"method must be 'reml' or 'ml', not {method!r}")


def _better(opt: OptResult, best: OptResult | None) -> bool:
    """A lower deviance wins; at a tie (the same optimum) a run that met the tolerance wins."""
    if best is None or not np.isfinite(float(best.fun)):
        return True
    fun, best_fun = float(opt.fun), float(best.fun)
    if not np.isfinite(fun):
        return False
    tie = abs(fun - best_fun) <= 1e-9 * (1.0 + abs(fun))
    return fun < best_fun - 1e-9 or (tie and bool(opt.converged) and not bool(best.converged))


def _mirrored(theta: np.ndarray, struct: Structure, scale=None):
    """θ with the entries below each zero diagonal entry of an unstructured Λ negated, or None.

    A column of Λ whose diagonal entry is 0 may take either sign (same Σ), but the bound θ_jj ≥ 0
    lets the optimiser see only one side: a boundary point where the gradient pushes θ_jj
    outward can be a trap whose mirror image has a descent direction into the interior.
    "Zero" is tested in the optimiser's units, θ / ``scale`` (``Design.theta_scale``).
    """
    from jaxmixed.model.covariance import Unstructured, _tril_indices

    th = np.array(theta, dtype=float)
    rel = th if scale is None else th / np.asarray(scale, dtype=float)
    changed = False
    for t in struct.terms:
        if not isinstance(t.structure, Unstructured):
            continue
        rows, cols = _tril_indices(t.structure.q)
        block = th[t.theta[0]:t.theta[1]]  # a view: edits land in th
        unit = rel[t.theta[0]:t.theta[1]]
        for j in range(t.structure.q):
            below = (cols == j) & (rows > j)
            if unit[(cols == j) & (rows == j)][0] < inference.SINGULAR_TOL and np.any(block[below] != 0):
                block[below] = -block[below]
                changed = True
    return th if changed else None


def _best_fit(design: Design, stats: Stats, struct: Structure, reml: bool, start=None):
    """Optimise from the default start; if that fails to converge, or stops on the boundary
    (which can be a local optimum), try scaled starts, then the mirror images of a boundary
    optimum (see ``_mirrored``). The optimiser works in ``design.theta_scale`` units; ``start``
    and the result are θ in the data's units."""
    lower = _host(design.theta_lower)
    unit = _host(design.theta_scale)
    theta0 = design.theta0 if start is None else np.asarray(start, dtype=float)
    if start is None and struct.quasi_newton:  # large models: every evaluation counts
        theta0 = moment_start(design, stats, struct)
    if theta0.shape != (design.n_theta,):
        raise ModelError(f"start must have {design.n_theta} entries (θ), not {theta0.shape}")
    tried = []
    best = None
    for scale in (1.0, 0.1, 10.0, 0.01):
        opt = optimize_theta(_host(theta0 * scale), lower, stats, struct, reml, scale=unit)
        tried.append(scale)
        if _better(opt, best):
            best = opt
        if bool(best.converged) and not inference.is_singular(np.asarray(best.x), struct, design.theta_scale):
            break
    for _ in range(3):
        mirror = _mirrored(np.asarray(best.x), struct, design.theta_scale)
        if mirror is None:
            break
        opt = optimize_theta(_host(mirror), lower, stats, struct, reml, scale=unit)
        if not _better(opt, best):
            break
        best = opt
    return best, tried


@programs.cached(static_argnames=("struct",))
def _solution(theta, stats: Stats, struct: Structure, reml):
    """``objective.solve`` at θ, and each term's Λ (η is computed from them on the host)."""
    return solve(theta, stats, struct, reml), tuple(inference.term_lambdas(theta, struct))


_hessian_eta = programs.cached(inference.hessian_eta, static_argnames=("struct",))


def _prefetch(design: Design, stats: Stats, struct: Structure, reml: bool, hessian: bool) -> None:
    """Have the programs that follow the optimiser loaded from disk in the background while it
    runs (``programs.Program.prefetch``; nothing when they are not on disk yet; the η-Hessian
    only with ``hessian``), then the module that the tables need."""
    f64 = np.dtype("float64")
    _solution.prefetch(jax.ShapeDtypeStruct((design.n_theta,), f64), stats, struct, reml)
    n_eta = sum(t.structure.n_eta for t in struct.terms) + 1
    if hessian:
        _hessian_eta.prefetch(jax.ShapeDtypeStruct((n_eta,), f64), stats, struct, reml)
    programs.in_background(distributions.preload)  # scipy.special, for the tables (≈ 0.03 s)


def fit_spec(spec: ModelSpec, data: pd.DataFrame, method: str = "reml", *, variance: bool = False,
             level: float = 95.0, start=None, display: dict | None = None,
             residuals=None, device=None) -> FitResult:
    """Fit a model description to data.

    ``device``: where the likelihood programs run, a ``jax.Device`` or a string such as
    ``"cpu"``, ``"gpu"`` or ``"cuda:1"`` (the sufficient statistics are placed there with
    ``jax.device_put``); default JAX's default device. An unknown or unavailable device is a
    ModelError.

    ``residuals``: a :mod:`jaxmixed.residuals` structure (``jm.ar(1, time="week")``, ...); Stata's
    ``residuals()`` option arrives in ``spec.options``. Anything but independent homoskedastic
    errors is fitted by the per-panel engine (:mod:`jaxmixed.panel`), started from the
    independent-errors fit.
    """
    from jaxmixed import runtime

    with runtime.fit_blas_threads():  # one OpenBLAS thread while the programs run (runtime docstring)
        return _fit_spec(spec, data, method, variance=variance, level=level, start=start, display=display,
                         residuals=residuals, device=device)


def _fit_spec(spec: ModelSpec, data: pd.DataFrame, method: str, *, variance: bool, level: float, start,
              display: dict | None, residuals, device) -> FitResult:
    reml = _method(method)
    from jaxmixed.runtime.devices import put, resolve_device

    dev = resolve_device(device)
    if residuals is not None:
        spec = replace(spec, options={**spec.options, "residuals": residuals})
    residuals = spec.options.get("residuals")
    if not (10.0 <= float(level) <= 99.99):
        raise ModelError(f"level must be between 10 and 99.99, not {level}")
    design = build_design(spec, data)
    if reml and design.nobs <= design.p:
        raise ModelError(f"REML needs more observations ({design.nobs}) than fixed effects ({design.p})")
    stats = put(cross_products(design), dev)
    struct = structure_of(design)
    # a residual structure's fit (the per-panel engine) replaces this one's variance components
    independent = residuals is None or residuals.is_default
    _prefetch(design, stats, struct, reml, hessian=independent)
    opt, tried = _best_fit(design, stats, struct, reml, start)
    theta = np.asarray(opt.x)
    sol, lams = _solution(_host(theta), stats, struct, reml)  # uncommitted, as _prefetch's
    sigma = float(sol.sigma)
    vc = inference.variance_components(design, stats, struct, theta, sigma, reml, variance, level,
                                        lams=[np.asarray(lam) for lam in lams], hessian_program=_hessian_eta,
                                        standard_errors=independent)
    singular = inference.is_singular(theta, struct, design.theta_scale)
    converged = bool(opt.converged) and (singular or vc.hessian_ok)
    loglik = -0.5 * float(opt.fun)
    fixed = inference.fixed_table(design.xnames, sol.beta, sol.cov_beta, level)
    k = int(sum(t.structure.n_eta for t in struct.terms))
    lr = inference.lr_vs_linear(loglik, inference.linear_loglik(stats, design.p, reml), k)
    history = np.asarray(opt.history)[: int(opt.n_iter) + 1]
    notes = []
    if design.n_dropped:
        notes.append(f"{design.n_dropped} observation(s) dropped because of missing values")
    for name in design.omitted:
        notes.append(f"{name} omitted because of collinearity")
    if singular:
        notes.append("boundary (singular) fit: a variance is zero or a correlation is ±1; "
                     "standard errors of the variance components are not reported")
    if not converged:
        what = "optimiser did not meet its tolerance" if not bool(opt.converged) else \
            "Hessian of the log likelihood is not negative definite"
        notes.append(f"convergence not achieved ({what}; starts tried: θ₀ × {', '.join(map(str, tried))})")
    table = vc.table
    panel = None
    if not independent:
        from jaxmixed.engine.marginal import fit_panel

        pf = fit_panel(spec, data, design, residuals, reml, variance, level, theta, sigma, display)
        loglik, converged, singular, table = pf["loglik"], pf["converged"], pf["singular"], pf["table"]
        sol, history, panel = pf["sol"], pf["history"], pf["panel"]
        vc = replace(vc, cov_eta=pf["cov_eta"])
        sigma = float(sol.sigma)
        fixed = inference.fixed_table(design.xnames, sol.beta, sol.cov_beta, level)
        lr = inference.lr_vs_linear(loglik, inference.linear_loglik(stats, design.p, reml), pf["n_params"] - 1)
        notes = [n for n in notes if not n.startswith(("boundary", "convergence"))]
        if singular:
            notes.append("boundary (singular) fit: a variance is zero or a correlation is ±1; "
                         "standard errors of the variance components are not reported")
        if not converged:
            notes.append("convergence not achieved (per-panel engine)")
    random = table[["group", "name", "estimate", "se", "ci_lower", "ci_upper"]].copy()
    if not (np.isfinite(loglik) and np.isfinite(sigma) and np.all(np.isfinite(np.asarray(sol.beta)))):
        raise ModelError(f"the fit broke down numerically (log likelihood {loglik:g}, residual sd {sigma:g}); "
                         "check the data for extreme values or a response that the model fits exactly")
    for note in notes:  # boundary fits and non-convergence are also visible warnings
        if note.startswith(("boundary", "convergence")):
            warn(note)
    return FitResult(
        loglik=loglik, method="reml" if reml else "ml", nobs=design.nobs, converged=converged,
        singular=singular, fixed=fixed, random=random, wald=inference.wald_test(design.xnames, sol.beta, sol.cov_beta),
        lr_vs_linear=lr, groups=design.group_summary, theta=theta, beta=np.asarray(sol.beta), sigma=sigma,
        iterations=tuple(-0.5 * history), n_dropped=design.n_dropped, notes=tuple(notes), level=float(level),
        variance=bool(variance), spec=spec, design=design, stats=stats, structure=struct, solution=sol,
        cov_eta=vc.cov_eta, display=dict(display or {}), panel=panel,
    )


def fit(formula: str, data: pd.DataFrame, method: str = "reml", *, variance: bool = False,
        level: float = 95.0, start=None, residuals=None, device=None) -> FitResult:
    """Fit an lme4/glmmTMB-style formula, e.g. ``"y ~ x + (1 + x | g)"``, by REML or ML.

    ``device``: a ``jax.Device`` or a string ("cpu", "gpu", "cuda:1", …) to run on; default
    JAX's default device (see ``fit_spec``).

    ``residuals=jm.ar(1, time="week")`` (or exchangeable, ma, toeplitz, exponential, unstructured,
    banded, independent(by=...)) models correlated or heteroskedastic errors within panels.
    """
    from jaxmixed.syntax.formula import parse_formula

    return fit_spec(parse_formula(formula), data, method, variance=variance, level=level, start=start,
                    residuals=residuals, device=device)


def _stata(command: str, data: pd.DataFrame, default_method: str, overrides: dict) -> FitResult:
    from jaxmixed.syntax.stata import parse_stata

    spec = parse_stata(command)
    opts = dict(spec.options)
    method = overrides.pop("method", None) or opts.get("method") or default_method
    variance = overrides.pop("variance", None)
    if variance is None:
        variance = opts.get("variance", False)
    level = overrides.pop("level", None) or opts.get("level", 95.0)
    start = overrides.pop("start", None)
    device = overrides.pop("device", None)
    if overrides:
        raise ModelError(f"unknown argument(s): {', '.join(sorted(overrides))}")
    display = {k: opts[k] for k in ("log", "group", "fetable", "retable", "header", "lrtest") if k in opts}
    return fit_spec(spec, data, method, variance=variance, level=level, start=start, display=display,
                    device=device)


def xtmixed(command: str, data: pd.DataFrame, **overrides) -> FitResult:
    """Fit a model written in Stata's ``xtmixed`` syntax (REML by default, as ``xtmixed`` did).

    Keyword overrides: method, variance, level, start, device (see ``fit_spec``)."""
    return _stata(command, data, "reml", overrides)


def mixed(command: str, data: pd.DataFrame, **overrides) -> FitResult:
    """Fit a model written in Stata's ``mixed`` syntax (ML by default, as ``mixed`` does).

    Keyword overrides: method, variance, level, start, device (see ``fit_spec``)."""
    return _stata(command, data, "ml", overrides)
