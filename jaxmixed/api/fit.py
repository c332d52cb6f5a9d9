"""The fit driver: parse → design → stats → objective → optimise → inference → FitResult.

Each stage is usable alone; ``fit_spec`` only chains them. Nothing here prints.
"""

from __future__ import annotations

from dataclasses import replace

import jax
import numpy as np
import pandas as pd

from jaxmixed.data.crossprod import cross_products
from jaxmixed.data.design import Design, build_design, expand_factor_slopes
from jaxmixed.data.pattern import build_pattern
from jaxmixed.engine import pls
from jaxmixed.errors import DataError, ModelError
from jaxmixed.fit.estimate import best_fit, optimize, prefetch_optimize
from jaxmixed.fit.search import moment_start
from jaxmixed.inference import distributions, tables
from jaxmixed.api.options import check_level, fit_notes, method_is_reml, warn_notes  # noqa: F401 (public here too)
from jaxmixed.model.spec import ModelSpec
from jaxmixed.results.fitresult import FitResult
from jaxmixed.runtime import programs
from jaxmixed.runtime.devices import host_array as _host


@programs.cached(static_argnames=("shape",))
def _solution(theta, data, shape, reml):
    """The PLS solve at θ, and each term's Λ (η is computed from them on the host)."""
    return pls.solve(theta, data, shape, reml), tuple(pls.term_lambdas(theta, shape))


@programs.cached(static_argnames=("shape",))
def _hessian_eta(eta, data, shape, reml):
    return pls.hessian_eta(eta, data, shape, reml)


#: the per-panel engine's iteration limit (residual structures)
PANEL_MAX_ITER = 300


def _prefetch(design: Design, data, engine, reml: bool, hessian: bool, dfmethod=None) -> None:
    """Have the programs that follow the optimiser loaded from disk, or traced and compiled when
    they are not there yet, in the background while it runs (``programs.Program.prefetch``
    with ``trace``; the η-Hessian only with ``hessian``, the df method's derivative program with
    ``dfmethod``), then the module that the tables need."""
    f64 = np.dtype("float64")
    _solution.prefetch(jax.ShapeDtypeStruct((design.n_theta,), f64), data, engine.shape, reml, trace=True)
    if hessian:
        n_eta = engine.shape.n_eta
        if engine.shape.quasi_newton:  # no Hessian from the optimiser: the η-Hessian's own program
            _hessian_eta.prefetch(jax.ShapeDtypeStruct((n_eta,), f64), data, engine.shape, reml, trace=True)
        else:  # from projected Newton's Hessian by the chain rule (PLSEngine.hessian_eta_from)
            pls.eta_hessian_from_x.prefetch(jax.ShapeDtypeStruct((n_eta,), f64), jax.ShapeDtypeStruct((n_eta,), f64),
                                            jax.ShapeDtypeStruct((n_eta, n_eta), f64),
                                            engine.shape.structures, trace=True)
        if dfmethod == "satterthwaite":
            pls.satterthwaite_parts.prefetch(jax.ShapeDtypeStruct((design.n_theta + 1,), f64), data, engine.shape,
                                             reml, trace=True)
        elif dfmethod == "kroger":
            pls.kenward_roger_parts.prefetch(jax.ShapeDtypeStruct((design.n_theta,), f64),
                                             jax.ShapeDtypeStruct((), f64), data, engine.shape, trace=True)
    programs.in_background(distributions.preload)  # scipy.special, for the tables (≈ 0.03 s)


def _terms(shape):
    return [(t.structure, t.theta) for t in shape.terms]


WEIGHTS_COLUMN = "_jm_weights"


def _with_weights(spec: ModelSpec, data: pd.DataFrame, weights):
    """The spec and data with the prior weights in a column the missing-value filter reads."""
    if isinstance(weights, str):
        if weights not in data.columns:
            raise DataError(f"weights {weights!r} is not a column of the data")
        w = pd.to_numeric(data[weights], errors="coerce").to_numpy(dtype=float)
    else:
        w = np.asarray(weights, dtype=float).reshape(-1)
        if w.shape[0] != len(data):
            raise DataError(f"weights has {w.shape[0]} values but the data have {len(data)} rows")
    fin = np.isfinite(w)
    if np.any(w[fin] <= 0) or np.any(np.isinf(w)):
        raise DataError(f"weights must be positive and finite; {int(np.sum(w[fin] <= 0) + np.sum(np.isinf(w)))} "
                        "are not")
    data = data.copy(deep=False)
    data[WEIGHTS_COLUMN] = w
    aux = tuple(spec.options.get("aux_variables", ())) + (WEIGHTS_COLUMN,)
    return replace(spec, options={**spec.options, "aux_variables": aux, "weighted": True}), data


def fit_spec(spec: ModelSpec, data, method: str = "reml", *, variance: bool = False,
             level: float = 95.0, start=None, display: dict | None = None,
             residuals=None, device=None, engine: str = "auto", weights=None, dfmethod=None,
             devices=None, progress: bool = False) -> FitResult:
    """Fit a model description to data.

    ``data``: a pandas DataFrame (the fast path for data in memory), or a source streamed in
    two passes without holding its rows (:mod:`jaxmixed.data.streaming`): a path, glob or list
    of Parquet/CSV/Arrow files, a pyarrow Dataset or Table, a polars DataFrame, a Dask
    DataFrame (the passes run on its cluster). ``progress``: a progress bar (tqdm) for the
    passes over a streamed source.

    ``devices``: a list of JAX devices (``jax.devices()``) over which the rows are sharded to
    form the cross-products, reduced across them with ``psum`` (:mod:`jaxmixed.data.sharded`).

    ``dfmethod``: small-sample inference for the fixed effects, "satterthwaite" (lmerTest's,
    REML or ML), "kroger" (Kenward-Roger as pbkrtest, REML only), or Stata's "residual",
    "repeated", "anova": the fixed-effects table then has t, df and p and CIs from t(df), and
    ``r.test``/``r.anova`` give F tests (:mod:`jaxmixed.inference.smallsample`).

    ``weights``: lme4's prior (precision) weights, a column name or an array with one positive
    value per row: row i has residual variance σ²/wᵢ, and the log likelihood includes
    ½ Σ log wᵢ, as lme4's ``weights=`` (rows with a missing weight are dropped).

    ``engine``: "auto" (chosen from the design), "dense" or "sparse": the layout of the
    penalised-least-squares engine (:mod:`jaxmixed.engine.pls`).

    ``device``: where the likelihood programs run, a ``jax.Device`` or a string such as
    ``"cpu"``, ``"gpu"`` or ``"cuda:1"`` (the sufficient statistics are placed there with
    ``jax.device_put``); default JAX's default device. An unknown or unavailable device is a
    ModelError.

    ``residuals``: a :mod:`jaxmixed.model.residuals` structure (``jm.ar(1, time="week")``, ...);
    Stata's ``residuals()`` option arrives in ``spec.options``. Anything but independent
    homoskedastic errors is fitted by the marginal per-panel engine
    (:mod:`jaxmixed.engine.gls_panels`), started from the independent-errors fit.
    """
    from jaxmixed import runtime

    with runtime.fit_blas_threads():  # one OpenBLAS thread while the programs run (runtime docstring)
        return _fit_spec(spec, data, method, variance=variance, level=level, start=start, display=display,
                         residuals=residuals, device=device, engine=engine, weights=weights, dfmethod=dfmethod,
                         devices=devices, progress=progress)


def _statistics(spec: ModelSpec, data, weights, residuals, dfmethod, devices, progress):
    """(spec, design, pattern, cross-products, ½ Σ log w) of the data in memory or streamed."""
    from jaxmixed.data.sources import is_source

    acc = None
    if devices is not None:
        from jaxmixed.data.sharded import ShardedAccumulator

        acc = ShardedAccumulator(devices)
    if is_source(data):
        from jaxmixed.data import streaming
        from jaxmixed.data.sources import DaskSource, ProcessLocalSource, open_source

        streaming.check_streamable(spec, residuals, dfmethod)
        source = open_source(data)
        if acc is not None and isinstance(source, ProcessLocalSource):
            raise ModelError("devices= shards one process's rows over its devices; in a jax.distributed run with "
                             "process_local sources each process forms its own cross-products: drop devices=")
        if acc is not None and isinstance(source, DaskSource):
            raise ModelError("devices= shards rows over this process's JAX devices; with a Dask DataFrame the "
                             "partitions' cross-products are formed on the Dask workers: drop devices=")
        if weights is not None:  # (a column name: design_from_source says so otherwise)
            spec = replace(spec, options={**spec.options, "weighted": True})
        design, pattern, cp, half_log_w = streaming.design_from_source(spec, source, weights=weights,
                                                                        accumulate_fn=acc, progress=progress)
        return spec, design, pattern, cp, half_log_w
    if weights is not None:
        spec, data = _with_weights(spec, data, weights)
    spec = expand_factor_slopes(spec, data)
    design = build_design(spec, data)
    w = None if weights is None else data[WEIGHTS_COLUMN].to_numpy(dtype=float)[design.rows]
    if w is not None and not (residuals is None or residuals.is_default):
        raise ModelError("weights= cannot be combined with a residual structure (residuals=)")
    half_log_w = 0.0 if w is None else 0.5 * float(np.sum(np.log(w)))
    pattern = build_pattern(design)
    return spec, design, pattern, cross_products(design, pattern, weights=w, accumulate_fn=acc), half_log_w


def _fit_spec(spec: ModelSpec, data, method: str, *, variance: bool, level: float, start,
              display: dict | None, residuals, device, engine, weights=None, dfmethod=None, devices=None,
              progress: bool = False) -> FitResult:
    from jaxmixed.inference import smallsample

    reml = method_is_reml(method)
    dfmethod = smallsample.check_method(dfmethod if dfmethod is not None else spec.options.get("dfmethod"), reml)
    from jaxmixed.runtime.devices import put, resolve_device

    dev = resolve_device(device)
    if residuals is not None:
        spec = replace(spec, options={**spec.options, "residuals": residuals})
    residuals = spec.options.get("residuals")
    level = check_level(level)
    spec, design, pattern, cp, half_log_w = _statistics(spec, data, weights, residuals, dfmethod, devices, progress)
    if reml and design.nobs <= design.p:
        raise ModelError(f"REML needs more observations ({design.nobs}) than fixed effects ({design.p})")
    shape = pls.shape_of(design, pattern, engine)
    eng = pls.PLSEngine(shape)
    arrays = put(pls.arrange(cp, shape, pattern, basis=design.fixed_basis[1:]), dev)
    # a residual structure's fit (the marginal engine) replaces this one's variance components
    independent = residuals is None or residuals.is_default
    _prefetch(design, arrays, eng, reml, hessian=independent, dfmethod=dfmethod)
    if not independent:
        # the per-panel engine's programs (its optimiser first) load or compile on the
        # background thread while the independent-errors start below is fitted
        from jaxmixed.engine.gls_panels import marginal_engine

        fitted_engine, data_e = marginal_engine(design, data, residuals)
        prefetch_optimize(fitted_engine.n_params, data_e, fitted_engine, reml, max_iter=PANEL_MAX_ITER)
        fitted_engine.prefetch(data_e, reml)
    theta0 = design.theta0 if start is None else np.asarray(start, dtype=float)
    if start is None and shape.quasi_newton:  # large models: every evaluation counts
        theta0 = moment_start(design, cp)
    if theta0.shape != (design.n_theta,):
        raise ModelError(f"start must have {design.n_theta} entries (θ), not {theta0.shape}")
    opt, tried = best_fit(eng, arrays, reml, theta0, design.theta_lower, design.theta_scale, _terms(shape),
                          design.theta_scale)
    theta = np.asarray(opt.x)
    sol, lams = _solution(_host(theta), arrays, shape, reml)  # uncommitted, as _prefetch's
    sigma = float(sol.sigma)
    if independent:
        params, data_e, fitted_engine = theta, arrays, eng
        hessian_program = eng.hessian_eta_from(theta, opt.grad, opt.hessian, sol,
                                               fallback=lambda e, d, r: _hessian_eta(e, d, shape, r))
        vc = tables.variance_components(eng, arrays, design, theta, sigma, reml, variance, level,
                                        lams=[np.asarray(lam) for lam in lams], hessian_program=hessian_program)
        converged = bool(opt.converged) and (vc.singular or vc.hessian_ok)
        what = "optimiser did not meet its tolerance" if not bool(opt.converged) else \
            "Hessian of the log likelihood is not negative definite"
        nonconv = f"convergence not achieved ({what}; starts tried: θ₀ × {', '.join(map(str, tried))})"
    else:
        unit = fitted_engine.unit(design.theta_scale, sigma)
        opt = optimize(_host(fitted_engine.start(theta, sigma)), _host(fitted_engine.lower()), data_e,
                       fitted_engine, reml, _host(unit), max_iter=PANEL_MAX_ITER)
        params = np.asarray(opt.x)
        sol = fitted_engine.solve(params, data_e, reml)
        sigma = float(sol.sigma)
        vc = tables.variance_components(fitted_engine, data_e, design, params, sigma, reml, variance, level,
                                        hessian_program=fitted_engine.hessian_eta_from(opt.grad, opt.hessian))
        converged = bool(opt.converged) and (vc.singular or vc.hessian_ok)
        nonconv = "convergence not achieved (per-panel engine)"
    singular = vc.singular
    loglik = -0.5 * float(opt.fun) + half_log_w
    fixed = tables.fixed_table(design.xnames, sol.beta, sol.cov_beta, level)
    small = f_test = None
    if dfmethod is not None:
        small = smallsample.small_sample(dfmethod, (fitted_engine, data_e, params, sigma, reml, design, sol.cov_beta))
        fixed = tables.fixed_table_t(design.xnames, sol.beta, small.vcov, small.df, level)
        others = [j for j, nm in enumerate(design.xnames) if nm != "_cons"]
        if others:
            f_test = small.test(np.asarray(sol.beta), np.eye(design.p)[others], np.zeros(len(others)))
    lr = tables.lr_vs_linear(loglik, tables.linear_loglik(arrays, design.p, reml) + half_log_w,
                             fitted_engine.n_variance_params)
    history = np.asarray(opt.history)[: int(opt.n_iter) + 1] - 2.0 * half_log_w
    notes = fit_notes(design, singular, None if converged else nonconv)
    random = vc.table[["group", "name", "estimate", "se", "ci_lower", "ci_upper"]].copy()
    if not (np.isfinite(loglik) and np.isfinite(sigma) and np.all(np.isfinite(np.asarray(sol.beta)))):
        raise ModelError(f"the fit broke down numerically (log likelihood {loglik:g}, residual sd {sigma:g}); "
                         "check the data for extreme values or a response that the model fits exactly")
    warn_notes(notes)
    return FitResult(
        loglik=loglik, method="reml" if reml else "ml", nobs=design.nobs, converged=converged,
        singular=singular, fixed=fixed, random=random, wald=tables.wald_test(design.xnames, sol.beta, sol.cov_beta),
        lr_vs_linear=lr, groups=design.group_summary, theta=fitted_engine.theta(params, sigma),
        beta=np.asarray(sol.beta), sigma=sigma, iterations=tuple(-0.5 * history), n_dropped=design.n_dropped,
        notes=tuple(notes), level=float(level), variance=bool(variance), spec=spec, design=design,
        engine=fitted_engine, data=data_e, params=params, solution=sol, cov_eta=vc.cov_eta,
        display=dict(display or {}), dfmethod=dfmethod, small=small, f_test=f_test,
    )


def fit(formula: str, data, method: str | None = None, *, variance: bool = False,
        level: float = 95.0, start=None, residuals=None, device=None, engine: str = "auto",
        family=None, link=None, nagq: int = 1, weights=None, offset=None, dfmethod=None,
        devices=None, progress: bool = False) -> FitResult:
    """Fit an lme4/glmmTMB-style formula, e.g. ``"y ~ x + (1 + x | g)"``, by REML (the default
    for linear models, as lmer) or ML (``method="ml"``; GLMMs always).

    ``device``: a ``jax.Device`` or a string ("cpu", "gpu", "cuda:1", …) to run on; default
    JAX's default device (see ``fit_spec``).

    ``residuals=jm.ar(1, time="week")`` (or exchangeable, ma, toeplitz, exponential, unstructured,
    banded, independent(by=...)) models correlated or heteroskedastic errors within panels.

    ``family`` ("binomial"/"bernoulli", "poisson", "negbinomial", "gamma", "gaussian") and
    ``link`` fit a generalized linear mixed model by maximum likelihood, Laplace (``nagq=1``) or
    adaptive Gauss-Hermite quadrature with ``nagq`` points per random effect, or lme4's
    ``nAGQ = 0`` (``nagq=0``: θ optimised with the fixed effects inside PIRLS)
    (:mod:`jaxmixed.api.glmm`): ``cbind(successes, failures) ~ ...``, ``offset(expr)`` terms,
    ``weights=`` (lme4's prior weights: binomial trials for a proportion response, precision
    weights for the Gaussian family) and ``offset=`` (a column name or an array).

    ``dfmethod``: "satterthwaite", "kroger", "residual", "repeated" or "anova" for t and F
    tests with small-sample degrees of freedom (see ``fit_spec``).

    ``data``: a pandas DataFrame, or a streamed source for linear models (Parquet/CSV/Arrow
    path, glob or list of paths, pyarrow Dataset or Table, polars or Dask DataFrame; see
    ``fit_spec``); ``devices``: JAX devices to shard the rows over; ``progress``: a progress bar
    for the passes over a streamed source.
    """
    from jaxmixed.syntax.formula import parse_formula

    if family is not None or link is not None:
        from jaxmixed.api import glmm
        from jaxmixed.model.family import family_of, link_of

        fam = family_of("gaussian" if family is None else family)
        if not (fam.name == "gaussian" and link_of(fam, link) == "identity"):
            if residuals is not None:
                raise ModelError("residuals= is for linear mixed models; a GLMM's residuals follow its family")
            if dfmethod is not None:
                raise ModelError("dfmethod= is for linear mixed models; a GLMM's tests are z and χ² tests")
            _linear_only(data, devices, "a generalized linear mixed model")
            if method is not None and str(method).lower() not in ("ml", "mle"):
                raise ModelError(f"a generalized linear mixed model is fitted by maximum likelihood (method='ml'), "
                                 f"not {method!r}: REML is defined for linear models only")
            return glmm.fit_formula(formula, data, fam, link, nagq=nagq, weights=weights, offset=offset,
                                    variance=variance, level=level, start=start, device=device, engine=engine)
    if nagq != 1:
        raise ModelError("nagq= is for generalized linear mixed models (give family=); a linear mixed model's "
                         "likelihood is exact")
    if offset is not None:
        raise ModelError("offset= is for generalized linear mixed models (give family=); for a linear model "
                         "subtract the offset from the response")
    return fit_spec(parse_formula(formula), data, "reml" if method is None else method, variance=variance,
                    level=level, start=start, residuals=residuals, device=device, engine=engine, weights=weights,
                    dfmethod=dfmethod, devices=devices, progress=progress)


def _linear_only(data, devices, what: str) -> None:
    """A ModelError for what needs the rows in memory (GLMMs) on a streamed source or devices=."""
    from jaxmixed.data.sources import is_source

    if is_source(data):
        raise ModelError(f"{what} needs its rows in memory (PIRLS reweights them at every step): read the source "
                         "with pandas (pd.read_parquet, ddf.compute()) or fit a linear mixed model to it")
    if devices is not None:
        raise ModelError(f"devices= shards the cross-products of a linear mixed model; {what} runs on one device "
                         "(device=)")


def _stata(command: str, data: pd.DataFrame, default_method: str, overrides: dict) -> FitResult:
    from jaxmixed.syntax.stata import ME_COMMANDS, parse_stata

    spec = parse_stata(command)
    opts = dict(spec.options)
    # the talk's "family() and link() options", or a me* command given to jm.mixed/jm.xtmixed
    fixed_family, fixed_link = ME_COMMANDS.get(opts.get("command"), (None, None))
    if opts.get("family") or opts.get("link") or fixed_family:
        from jaxmixed.api import glmm
        from jaxmixed.model.family import family_of, link_of

        fam = family_of(opts.get("family") or fixed_family or "gaussian")
        if not (fam.name == "gaussian" and link_of(fam, opts.get("link") or fixed_link) == "identity"):
            if overrides.pop("method", None) not in (None, "ml", "mle") or opts.get("method") == "reml":
                raise ModelError("a generalized linear mixed model is fitted by maximum likelihood, not REML")
            if opts.get("dfmethod") or overrides.get("dfmethod"):
                raise ModelError("dfmethod() is for linear mixed models; a GLMM's tests are z and χ² tests")
            overrides.pop("engine", None)
            _linear_only(data, overrides.pop("devices", None), "a generalized linear mixed model")
            overrides.pop("progress", None)
            return glmm.fit_stata(command, data, **overrides)
    method = overrides.pop("method", None) or opts.get("method") or default_method
    from jaxmixed.inference.smallsample import check_method

    dfmethod = check_method(overrides.pop("dfmethod", None) or opts.get("dfmethod"))
    if dfmethod == "satterthwaite" and not method_is_reml(method):
        raise ModelError("dfmethod(satterthwaite) needs REML in Stata's mixed (add the reml option); "
                         "jm.fit(..., method='ml', dfmethod='satterthwaite') gives lmerTest's ML version")
    variance = overrides.pop("variance", None)
    if variance is None:
        variance = opts.get("variance", False)
    level = overrides.pop("level", None) or opts.get("level", 95.0)
    start = overrides.pop("start", None)
    device = overrides.pop("device", None)
    engine = overrides.pop("engine", "auto")
    devices = overrides.pop("devices", None)
    progress = bool(overrides.pop("progress", False))
    if overrides:
        raise ModelError(f"unknown argument(s): {', '.join(sorted(overrides))}")
    display = {k: opts[k] for k in ("log", "group", "fetable", "retable", "header", "lrtest") if k in opts}
    return fit_spec(spec, data, method, variance=variance, level=level, start=start, display=display,
                    device=device, engine=engine, dfmethod=dfmethod, devices=devices, progress=progress)


def xtmixed(command: str, data: pd.DataFrame, **overrides) -> FitResult:
    """Fit a model written in Stata's ``xtmixed`` syntax (REML by default, as ``xtmixed`` did).

    Keyword overrides: method, variance, level, start, device, engine, dfmethod, devices, progress
    (see ``fit_spec``)."""
    return _stata(command, data, "reml", overrides)


def mixed(command: str, data: pd.DataFrame, **overrides) -> FitResult:
    """Fit a model written in Stata's ``mixed`` syntax (ML by default, as ``mixed`` does).

    Keyword overrides: method, variance, level, start, device, engine, dfmethod, devices, progress
    (see ``fit_spec``)."""
    return _stata(command, data, "ml", overrides)
