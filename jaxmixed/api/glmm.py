"""The GLMM driver: family and link, response and offset, design, GLM start, Laplace or
adaptive-quadrature fit, inference, FitResult. Nothing here prints.

Front ends: ``jm.fit(formula, data, family=..., link=..., nagq=..., weights=..., offset=...)``
(lme4's ``glmer`` syntax: ``cbind(successes, failures)``, a 0/1 or two-level factor response, or
proportions with ``weights=`` the trials; ``offset(expr)`` terms) and Stata's ``meglm``,
``melogit``, ``meprobit``, ``mecloglog``, ``mepoisson``, ``menbreg`` (and ``family()``/``link()``
on ``xtmixed``/``mixed``), with Stata's defaults (``intmethod(mvaghermite) intpoints(7)``,
variances reported).
"""

from __future__ import annotations

from dataclasses import replace

import jax
import numpy as np
import pandas as pd

from jaxmixed.api.options import check_level, fit_notes, warn_notes
from jaxmixed.data.design import build_design, expand_factor_slopes
from jaxmixed.data.design import evaluate_expression as _evaluate
from jaxmixed.data.pattern import build_pattern
from jaxmixed.engine import laplace, pls, pls_sparse
from jaxmixed.errors import DataError, FormulaError, ModelError
from jaxmixed.fit import glmm as glmm_fit
from jaxmixed.inference import distributions, tables
from jaxmixed.inference.glmm import fit_covariance, hessian_mask
from jaxmixed.model.family import family_of, link_of
from jaxmixed.model.spec import ModelSpec
from jaxmixed.results.fitresult import FitResult
from jaxmixed.syntax.formula import RESPONSE_COLUMN
from jaxmixed.syntax.stata import ME_COMMANDS

TRIALS, WEIGHTS, OFFSET = "_jm_trials", "_jm_weights", "_jm_offset"



def _binary(s: pd.Series, name: str) -> np.ndarray:
    """A two-level factor (strings, categories, booleans) as 0/1: its first level is the failure,
    as in R's glm."""
    if pd.api.types.is_bool_dtype(s):
        return s.to_numpy(dtype=float, na_value=np.nan)
    if isinstance(s.dtype, pd.CategoricalDtype):
        levels = list(s.cat.categories[s.cat.categories.isin(s.dropna().unique())])
    else:
        levels = sorted(pd.unique(s.dropna()), key=str)
    if len(levels) != 2:
        raise DataError(f"response {name!r} is not numeric and has {len(levels)} level(s); a binary response "
                        f"needs two (the first, {levels[0]!r}, is the failure)" if levels else
                        f"response {name!r} has no non-missing values")
    out = np.where(s.isna(), np.nan, (s == levels[1]).to_numpy(dtype=float))
    return out


def _response(df, response, family):
    """(y, trials, response name) from the response text or cbind pair."""
    fam = family
    if isinstance(response, tuple):
        if fam.name != "binomial":
            raise ModelError(f"cbind(successes, failures) is a binomial response; the {fam.name} family needs counts "
                             "or values in one column")
        succ = _evaluate(df, response[0], "successes")
        fail = _evaluate(df, response[1], "failures")
        bad = (fail < 0) & np.isfinite(fail)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"cbind({response[0]}, {response[1]}): the failures are negative in row {i} "
                            f"({fail[i]:g}): successes exceed the trials in {int(bad.sum())} row(s)")
        return succ, succ + fail, f"cbind({response[0]}, {response[1]})"
    text = response.strip().strip("`")
    if text in df.columns and not pd.api.types.is_numeric_dtype(df[text]):
        if fam.name != "binomial":
            raise DataError(f"response {text!r} is not numeric ({df[text].dtype}); the {fam.name} family needs "
                            "numbers")
        return _binary(df[text], text), np.ones(len(df)), text
    return _evaluate(df, text, "response"), np.ones(len(df)), text


def fit_glmm_spec(spec: ModelSpec, data: pd.DataFrame, family, link=None, *, response=None, offsets=(),
                  nagq: int = 1, weights=None, offset=None, trials=None, exposure=None, variance: bool = False,
                  level: float = 95.0, start=None, display: dict | None = None, device=None,
                  eform: bool = False, title: str | None = None, adaptive: bool = True,
                  laplace_if_crossed: bool = False, engine: str = "auto") -> FitResult:
    """Fit a GLMM from a model description (the response ``spec.response`` unless ``response``:
    the response text or a (successes, failures) pair); see the module docstring.
    ``laplace_if_crossed``: crossed grouping factors take the Laplace approximation instead of
    ``nagq`` points (Stata's default for crossed models) rather than a ModelError. ``engine``:
    the layout of ZᵀWZ's factorisation in each PIRLS step, as for linear models ("auto": the
    blocked sparse one for large crossed or many-panel designs, :mod:`jaxmixed.engine.pls`)."""
    from jaxmixed import runtime

    fam = family_of(family)
    link = link_of(fam, link)
    nagq = int(nagq)
    if nagq < 0:
        raise ModelError(f"nagq must be a whole number ≥ 0, not {nagq}")
    if nagq == 0 and not adaptive:
        raise ModelError("nagq=0 (β inside PIRLS) has no quadrature points to place")
    level = check_level(level)
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame, not {type(data).__name__}")
    with runtime.fit_blas_threads():
        return _fit(spec, data, fam, link, response if response is not None else spec.response, offsets, nagq,
                    weights, offset, trials, exposure, variance, level, start, display, device, eform, title,
                    adaptive, laplace_if_crossed, engine)


def _column_or_array(df, value, what):
    if isinstance(value, str):
        if value not in df.columns:
            raise DataError(f"{what} {value!r} is not a column of the data")
        return _evaluate(df, value, what)
    arr = np.asarray(value, dtype=float).reshape(-1)
    if arr.shape[0] != len(df):
        raise DataError(f"{what} has {arr.shape[0]} values but the data have {len(df)} rows")
    return arr


def _fit(spec, data, fam, link, response, offsets, nagq, weights, offset, trials, exposure, variance, level,
         start, display, device, eform, title, adaptive=True, laplace_if_crossed=False, engine="auto"):
    from jaxmixed.runtime.devices import host_array, put, resolve_device

    dev = resolve_device(device)
    df = data.copy(deep=False)
    y, m, resp_name = _response(df, response, fam)
    pw = np.ones(len(df)) if weights is None else _column_or_array(df, weights, "weights")
    if weights is not None and np.any(pw[np.isfinite(pw)] <= 0):
        raise DataError(f"weights must be positive; {int(np.sum(pw[np.isfinite(pw)] <= 0))} are not")
    if trials is not None:
        if fam.name != "binomial":
            raise ModelError("the number of trials (binomial()) belongs to the binomial family")
        m = np.full(len(df), float(trials)) if np.ndim(trials) == 0 and not isinstance(trials, str) else \
            _column_or_array(df, trials, "binomial trials")
    elif fam.name == "binomial" and weights is not None and not isinstance(response, tuple):
        # lme4: a proportion response with weights= the trials
        m, y, pw = pw, y * pw, np.ones(len(df))
    off = np.zeros(len(df))
    offset_exprs = list(offsets)  # how new data get their offset (None: an array was given)
    for expr in offsets:
        off = off + _evaluate(df, expr, "offset")
    if offset is not None:
        off = off + _column_or_array(df, offset, "offset")
        offset_exprs = offset_exprs + [offset] if isinstance(offset, str) else None
    if exposure is not None:
        e = _column_or_array(df, exposure, "exposure")
        if np.any(e[np.isfinite(e)] <= 0):
            raise DataError(f"exposure {exposure!r} must be positive")
        off = off + np.log(e)
        if offset_exprs is not None:
            offset_exprs = offset_exprs + [f"log({exposure})"] if isinstance(exposure, str) else None
    df[RESPONSE_COLUMN], df[TRIALS], df[WEIGHTS], df[OFFSET] = y, m, pw, off
    spec = replace(spec, response=RESPONSE_COLUMN,
                   options={**spec.options, "aux_variables": (TRIALS, WEIGHTS, OFFSET), "glmm": True})
    if spec.options.get("fixed_formula"):
        ff = spec.options["fixed_formula"]
        spec = replace(spec, options={**spec.options, "response_variables": (RESPONSE_COLUMN,),
                                      "fixed_formula": RESPONSE_COLUMN + " ~" + ff.split("~", 1)[1]})
    spec = expand_factor_slopes(spec, df)
    design = build_design(spec, df)
    rows = design.rows
    y, m, pw, off = (df[c].to_numpy(dtype=float)[rows] for c in (RESPONSE_COLUMN, TRIALS, WEIGHTS, OFFSET))
    fam.check_response(y, m, resp_name)
    if not np.all(np.isfinite(off)):
        raise DataError(f"the offset has {int(np.sum(~np.isfinite(off)))} non-finite value(s)")
    if not adaptive and nagq < 2:
        raise ModelError("intmethod(ghermite) needs intpoints() of 2 or more")
    if nagq > 1 and len(design.factors) > 1:
        nagq = _quadrature_levels(design, nagq, laplace_if_crossed)
    pattern = build_pattern(design)
    re_shape = replace(pls.shape_of(design, pattern, engine), p=0)
    shape = laplace.GLMMShape(re_shape, fam.name, link, design.p, nagq, bool(adaptive))
    n = design.nobs
    Xt, R0_inv = design.fixed_basis[0], design.fixed_basis[1]
    Xs = Xt * np.sqrt(n)
    B = R0_inv * np.sqrt(n)
    arrays = put(laplace.GLMMArrays(host_array(y), host_array(m), host_array(pw), host_array(off), host_array(Xs),
                                    tuple(host_array(f.codes, np.int32) for f in design.factors),
                                    tuple(host_array(f.Z) for f in design.factors),
                                    host_array(float(fam.constant(y, m, pw))), _panel(design, fam, nagq),
                                    _sparse_rows(design, pattern, re_shape)), dev)
    # load the optimiser's and the post-fit programs from disk in the background (when kept
    # there) while the GLM start runs: their executables' loading then overlaps with work
    f64 = np.dtype("float64")
    vec = jax.ShapeDtypeStruct((shape.n_params,), f64)
    # (not kept yet: the optimiser's program traced and compiled there, the post-fit program
    # here after the GLM start, the two XLA compiles running at once on two cores)
    glmm_fit.optimize.prefetch(vec, vec, vec, arrays, shape, trace=True)
    laplace_shape = replace(shape, nagq=1) if nagq == 0 else shape  # (nAGQ = 0: its standard errors)
    after_args = (vec, vec, arrays, laplace_shape, jax.ShapeDtypeStruct((design.p, design.p), f64), vec)
    laplace.after_fit.prefetch(*after_args)
    beta0, s0, ll_glm, glm_ok = laplace.glm_fit(Xs, y, m, pw, off, fam.name, link)
    laplace.after_fit.prefetch(*after_args, trace=True, here=True)
    distributions.preload()  # what the tables need, while the optimiser's program is loaded
    if start is None:
        x0 = np.concatenate([beta0, design.theta0, [s0] if shape.n_scale else []])
    else:
        x0 = np.asarray(start, dtype=float)
        if x0.shape != (shape.n_params,):
            raise ModelError(f"start must have {shape.n_params} entries (β̃, θ{', s' if shape.n_scale else ''}), "
                             f"not {x0.shape}")
    lower = np.concatenate([np.full(design.p, -np.inf), design.theta_lower, [-np.inf] * shape.n_scale])
    unit = np.concatenate([np.ones(design.p), design.theta_scale, [1.0] * shape.n_scale])
    opt = glmm_fit.optimize(host_array(x0), host_array(lower), host_array(unit), arrays, shape)
    x = np.asarray(opt.x)
    dev_hat = float(opt.fun)
    if not np.isfinite(dev_hat):
        raise ModelError("the GLMM fit broke down numerically (the conditional modes could not be found: PIRLS "
                         "failed); check for complete separation or extreme values")
    loglik = -0.5 * dev_hat
    engine = laplace.LaplaceEngine(shape, B)
    xi = laplace.report_of_params(x, shape, B)
    k_eta = engine.n_variance_params
    p = design.p
    mask, singular = hessian_mask(engine, x, design.theta_scale)
    xi_h = np.where(np.isfinite(xi), xi, 0.0)
    H, (u, b, V, pirls_ok) = laplace.after_fit(host_array(x), host_array(xi_h), arrays, laplace_shape,
                                                host_array(B), host_array(mask))
    # nAGQ = 0: lme4's Var(β), the joint PIRLS system's (the variance parameters' standard errors
    # from the Laplace Hessian above, at the nAGQ = 0 estimates)
    S = np.asarray(laplace.beta_information(host_array(x), arrays, shape)) if nagq == 0 else None
    cov, h_ok, s_ok = fit_covariance(np.asarray(H), mask, B, S)
    hess_ok = h_ok and s_ok
    beta = xi[:p]
    cov_beta = cov[:p, :p]
    cov_eta = None if (singular or not h_ok) else cov[p:, p:]
    residual = _scale_rows(fam, variance, stata=spec.syntax == "stata") if shape.n_scale else []
    table = tables.component_table(design.terms, xi[p:], cov_eta, variance, level, residual)
    random = table[["group", "name", "estimate", "se", "ci_lower", "ci_upper"]].copy()
    fixed = tables.fixed_table(design.xnames, beta, cov_beta, level)
    lr = tables.lr_vs_linear(loglik, ll_glm, k_eta)
    converged = bool(opt.converged) and bool(pirls_ok) and (singular or hess_ok)
    why = ("the conditional modes (PIRLS) did not converge" if not bool(pirls_ok) else
           "optimiser did not meet its tolerance" if not bool(opt.converged) else
           "Hessian of the log likelihood is not negative definite")
    sep = _separation(fam, design, beta, cov_beta)
    notes = fit_notes(design, singular, None if converged else f"convergence not achieved ({why})",
                      extra=[sep] if sep else [])
    warn_notes(notes, ("boundary", "convergence", "complete"))
    sigma = float(np.exp(x[-1])) if fam.name == "gaussian" else float("nan")
    sol = laplace.GLMMSolution(beta=beta, cov_beta=cov_beta, u=np.asarray(u), b=tuple(np.asarray(v) for v in b),
                               V=tuple(np.asarray(v) for v in V))
    history = np.asarray(opt.history)[: int(opt.n_iter) + 1]
    shown = {"response": resp_name, "title": title, "eform": bool(eform), "glm_loglik": ll_glm,
             "residual_rows": tuple(residual), "bounds": (lower, unit),
             "offset_exprs": None if offset_exprs is None else tuple(offset_exprs)}
    return FitResult(
        loglik=loglik, method="laplace" if nagq <= 1 else ("agq" if adaptive else "ghq"), nobs=design.nobs,
        converged=converged,
        singular=singular, fixed=fixed, random=random, wald=tables.wald_test(design.xnames, beta, cov_beta),
        lr_vs_linear=lr, groups=design.group_summary, theta=engine.theta(x), beta=beta, sigma=sigma,
        iterations=tuple(-0.5 * history), n_dropped=design.n_dropped, notes=tuple(notes), level=float(level),
        variance=bool(variance), spec=spec, design=design, engine=engine, data=arrays, params=x, solution=sol,
        cov_eta=cov_eta, display=dict(display or {}, **shown), family=fam.name, link=link, nagq=nagq,
        cov_params=cov)


def _panel(design, fam, nagq: int) -> tuple:
    """The panel index of :func:`laplace.panel_view` (one grouping factor, not the Gaussian
    family, not nAGQ = 0), as device arrays; () where the rows stay as they are."""
    from jaxmixed.runtime.devices import host_array

    if len(design.factors) != 1 or fam.name == "gaussian" or nagq == 0:
        return ()
    f = design.factors[0]
    index = laplace.panel_index(f.codes, f.n_levels)
    return () if not index else (host_array(index[0], np.int32), host_array(index[1], bool))


def _sparse_rows(design, pattern, re_shape) -> tuple:
    """(:class:`~jaxmixed.engine.pls_sparse.WeightedRows`,) for the blocked sparse layout, else ()."""
    if re_shape.layout is None:
        return ()
    return (pls_sparse.weighted_rows(re_shape, pattern, [f.codes for f in design.factors]),)


def _quadrature_levels(design, nagq: int, laplace_if_crossed: bool) -> int:
    """The points for a model with several grouping factors: nested ones (each factor, in the
    engine's order of most levels first, inside the next) are integrated level by level
    (``laplace.nested_agq_deviance``); crossed factors are refused, or take the Laplace
    approximation when that is the front end's default (Stata's for crossed models)."""
    fs = design.factors
    names = [":".join(f.group) for f in fs]
    for k, (inner, outer) in enumerate(zip(fs, fs[1:])):
        if _nested_in(inner, outer):
            continue
        if laplace_if_crossed:
            return 1
        what = "two nested ones" if len(fs) == 2 else "nested ones"
        raise ModelError(f"adaptive quadrature (nagq={nagq}) needs one grouping factor or {what}; "
                         f"{names[k]} and {names[k + 1]} are crossed (levels of {names[k]} occur in several levels "
                         f"of {names[k + 1]}), so the integral does not factor over groups: use nagq=1 (Laplace)")
    return nagq


def _nested_in(inner, outer) -> bool:
    """True when every level of the factor ``inner`` lies inside one level of ``outer``."""
    parent = np.zeros(inner.n_levels, dtype=np.int64)
    parent[inner.codes] = outer.codes
    return bool(np.array_equal(parent[inner.codes], outer.codes))


def _scale_rows(fam, variance: bool, stata: bool):
    """(name, kind) of the scale's row in the random-effects table."""
    if fam.name == "negbinomial":
        return [("alpha", "exp_neg")] if stata else [("dispersion", "exp")]
    if fam.name == "gamma":
        return [("dispersion", "exp_neg")]
    return [("var(Residual)" if variance else "sd(Residual)", "sd")]


def _separation(fam, design, beta, cov_beta):
    """A note when a coefficient runs off to infinity (complete or quasi-complete separation of
    a binary response by a covariate)."""
    if fam.name != "binomial":
        return None
    X = design.X
    sd = np.where(np.std(X, axis=0) > 0, np.std(X, axis=0), 1.0)
    eff = np.abs(beta) * sd
    se = np.sqrt(np.abs(np.diag(cov_beta)))
    bad = [n for n, e, s, b in zip(design.xnames, eff, se, beta) if e > 10 or (np.isfinite(s) and s > 10 * max(abs(b), 1) and abs(b) > 5)]
    if bad:
        return (f"complete or quasi-complete separation suspected: {', '.join(bad)} predict(s) the response "
                "(nearly) perfectly; its coefficient and standard error are not meaningful")
    return None


def fit_many(formula: str, data: pd.DataFrame, responses, family, link=None, *, nagq: int = 1, weights=None,
             offset=None, level: float = 95.0, variance: bool = False, chunk_size: int = 32,
             progress: bool = False):
    """``jm.fit_many(formula, data, responses, family=...)``: the GLMM of ``formula`` fitted to
    each response column (counts, 0/1 values or successes; the trials, weights and offset are
    the formula's), all in one vmapped program started from the first response's fit. Rows: those
    the first response's fit uses; every response must be complete there. Standard errors as
    ``jm.fit`` forms them (the exact Hessian per response, one vmapped program)."""
    from jaxmixed.results.many import ManyResult

    if isinstance(responses, str):
        responses = [responses]
    names = [str(c) for c in responses]
    if not names or not all(c in data.columns for c in names):
        missing = [c for c in names if c not in data.columns]
        raise DataError(f"response column(s) {', '.join(map(repr, missing)) or '(none)'} not in the data")
    spec, response, offsets = _formula_spec(formula)
    if isinstance(response, tuple):
        raise ModelError("fit_many with a GLMM takes 0/1, count or success columns as responses; for "
                         "cbind(successes, failures) give the successes and weights= the trials")
    first = fit_glmm_spec(spec, data, family, link, response=names[0], offsets=offsets, nagq=nagq, weights=weights,
                          offset=offset, variance=variance, level=level)
    rows = first.design.rows
    fam = family_of(family)
    Y = np.column_stack([_response(data.iloc[rows].reset_index(drop=True), c, fam)[0] for c in names])
    if np.isnan(Y).any():
        bad = [names[j] for j in np.flatnonzero(np.isnan(Y).any(axis=0))]
        raise DataError(f"response(s) {', '.join(map(repr, bad))} have missing values in rows the model uses")
    m = np.asarray(first.data.m)
    if fam.name == "binomial" and weights is not None:
        Y = Y * m[:, None]  # proportions with weights= the trials, as in the fit
    for j, c in enumerate(names):
        fam.check_response(Y[:, j], m, c)
    lower, unit = first.display["bounds"]
    raw = glmm_fit.fit_responses(Y, first.params, lower, unit, first.data, first.engine.shape, chunk_size, progress)
    from jaxmixed.inference import distributions as sps
    from jaxmixed.inference.glmm import covariances_responses
    from jaxmixed.inference.tables import component_layout, component_values

    k, p = len(names), first.design.p
    xi = np.stack([laplace.report_of_params(x, first.engine.shape, first.engine.B) for x in raw["x"]])
    beta = xi[:, :p]
    cov, hess_ok, singular = covariances_responses(raw["x"], Y, first.data, first.engine.shape, first.engine.B,
                                                   unit, chunk_size)
    loglik = -0.5 * raw["fun"]
    converged = raw["converged"] & (singular | hess_ok)
    summary = pd.DataFrame({"loglik": loglik, "converged": converged, "singular": singular,
                            "iterations": np.full(k, -1)}, index=pd.Index(names, name="response"))
    z = sps.norm.ppf(0.5 + float(level) / 200.0)
    se = np.sqrt(np.diagonal(cov[:, :p, :p], axis1=1, axis2=2))
    with np.errstate(invalid="ignore", divide="ignore"):
        zs = beta / se
    fixed = pd.DataFrame({"response": np.repeat(names, p), "term": np.tile(first.design.xnames, k),
                          "coef": beta.ravel(), "se": se.ravel(), "z": zs.ravel(),
                          "p": (2 * sps.norm.sf(np.abs(zs))).ravel(), "ci_lower": (beta - z * se).ravel(),
                          "ci_upper": (beta + z * se).ravel()})
    layout = component_layout(first.design.terms, first.variance, first.display["residual_rows"])
    cov_eta = np.where(singular[:, None, None], np.nan, cov[:, p:, p:])
    est, vse, lo, hi = component_values(xi[:, p:], layout, cov_eta, z)
    random = pd.DataFrame({"response": np.repeat(names, len(layout)), "group": [r.group for r in layout] * k,
                           "name": [r.name for r in layout] * k, "estimate": est.ravel(), "se": vse.ravel(),
                           "ci_lower": lo.ravel(), "ci_upper": hi.ravel()})
    notes = []
    if first.n_dropped:
        notes.append(f"{first.n_dropped} observation(s) dropped because of missing values")
    if (~converged).any():
        notes.append(f"{int((~converged).sum())} response(s) did not converge (see summary.converged)")
    th = raw["x"][:, p:p + first.engine.shape.re.n_theta]
    return ManyResult(responses=tuple(names), method=first.method, nobs=first.nobs, n_dropped=first.n_dropped,
                      level=float(level), variance=bool(variance), summary=summary, fixed=fixed, random=random,
                      theta=th, beta=beta, sigma=np.full(k, np.nan), loglik=loglik, notes=tuple(notes),
                      design=first.design)


def _formula_spec(formula: str):
    """(spec, response, offset expressions) of a glmer-style formula (:func:`glm_parts`)."""
    from jaxmixed.syntax.formula import glm_parts, parse_formula

    text, response, offsets = glm_parts(formula)
    try:
        spec = parse_formula(text)
    except FormulaError as err:  # positions in the user's formula, not the rewritten one
        raise FormulaError(str(err).splitlines()[0].replace(RESPONSE_COLUMN, "response"), formula, 0) from None
    return replace(spec, text=formula), response, offsets


def fit_formula(formula: str, data, family, link=None, *, nagq=1, weights=None, offset=None, variance=False,
                level=95.0, start=None, device=None, engine: str = "auto") -> FitResult:
    """``jm.fit(..., family=...)``: an lme4 ``glmer``-style formula."""
    spec, response, offsets = _formula_spec(formula)
    return fit_glmm_spec(spec, data, family, link, response=response, offsets=offsets, nagq=nagq, weights=weights,
                         offset=offset, variance=variance, level=level, start=start, device=device, engine=engine)


def fit_stata(command: str, data, default_family=None, default_link=None, **overrides) -> FitResult:
    """A Stata ``meglm``-family command (or ``xtmixed``/``mixed`` with ``family()``)."""
    from jaxmixed.syntax.stata import parse_stata

    spec = parse_stata(command)
    opts = spec.options
    cmd = opts.get("command")
    fam_default, link_default = ME_COMMANDS.get(cmd, (None, None))
    family = overrides.pop("family", None) or opts.get("family") or default_family or fam_default or "gaussian"
    link = overrides.pop("link", None) or opts.get("link") or default_link or link_default
    if cmd in ME_COMMANDS and cmd != "meglm" and (opts.get("family") or opts.get("link")):
        raise ModelError(f"{cmd} fixes the family and link; use meglm for family() and link()")
    if opts.get("dfmethod") or overrides.pop("dfmethod", None):
        raise ModelError("dfmethod() is for linear mixed models; a GLMM's tests are z and χ² tests")
    method = opts.get("intmethod", "mvaghermite")
    nagq = overrides.pop("nagq", None)
    # Stata's default for crossed models is the Laplace approximation; asked-for points are not
    default_points = nagq is None and "nagq" not in opts and "intmethod" not in opts
    if nagq is None:
        nagq = 1 if method == "laplace" else opts.get("nagq", 7)
    if method == "laplace" and opts.get("nagq", 1) != 1:
        raise ModelError("intpoints() does not go with intmethod(laplace)")
    variance = overrides.pop("variance", None)
    if variance is None:
        variance = opts.get("variance", True)  # me* commands report variances
    level = overrides.pop("level", None) or opts.get("level", 95.0)
    weights = overrides.pop("weights", None)
    start = overrides.pop("start", None)
    device = overrides.pop("device", None)
    if overrides:
        raise ModelError(f"unknown argument(s): {', '.join(sorted(overrides))}")
    fam = family_of(family)
    if fam.name == "gaussian" and (link in (None, "identity")):
        raise ModelError("family(gaussian) link(identity) is a linear mixed model: use jm.mixed")
    display = {k: opts[k] for k in ("log", "group", "fetable", "retable", "header", "lrtest") if k in opts}
    eform = bool(opts.get("eform", False))
    return fit_glmm_spec(spec, data, fam, link, nagq=nagq, weights=weights, offset=opts.get("offset"),
                         trials=opts.get("binomial_n"), exposure=opts.get("exposure"), variance=variance,
                         level=level, start=start, display=display, device=device, eform=eform, title=cmd,
                         adaptive=method != "ghermite", laplace_if_crossed=default_points)


def _command(name: str):
    fam, link = ME_COMMANDS[name]

    def run(command: str, data: pd.DataFrame, **overrides) -> FitResult:
        text = command.strip()
        if not text.split(None, 1)[0] == name:
            text = f"{name} {text}"
        return fit_stata(text, data, **overrides)

    what = "family() and link() as given (Gaussian identity by default is refused: use jm.mixed)" if fam is None \
        else f"family {fam}, link {link}"
    run.__name__ = name
    run.__qualname__ = name
    run.__doc__ = (f"Fit a model in Stata's ``{name}`` syntax ({what}); Stata's defaults: "
                   "intmethod(mvaghermite) intpoints(7) (Laplace where the model has several grouping levels "
                   "needs intmethod(laplace)), variances reported. Options: family(), link(), binomial(), "
                   "offset(), exposure(), intpoints(), intmethod(), or/irr/eform, level(), nolog, ... "
                   "Keyword overrides: nagq, variance, level, weights, start, device.")
    return run


meglm = _command("meglm")
melogit = _command("melogit")
meprobit = _command("meprobit")
mecloglog = _command("mecloglog")
mepoisson = _command("mepoisson")
menbreg = _command("menbreg")
