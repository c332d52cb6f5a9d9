"""``jm.fit_many``: one mixed model, many responses that share its design, one batched program.

In mass-univariate work (voxels, genes, items, simulated data sets) the same model is fitted to
many responses that share X and Z. The cross-products depend on y only through the last column
of W = [X y]: Z₁ᵀy, Z₂ᵀy, Xᵀy and yᵀy. :func:`jaxmixed.fit.batched.fit_responses` forms those
for a block of responses at once and runs jm.fit's optimiser under ``jax.vmap`` over them, with
jm.fit's restart search; every response is fitted as ``jm.fit`` would fit it alone (estimates
agree to its optimiser's tolerance, ≤ 1e-6).

Missing values: the design must be the same for every response, so the rows used are those
complete in every variable the model reads *and in every response*; the others are dropped and
counted (``ManyResult.n_dropped``, and a note). To use each response's own complete rows, call
``jm.fit`` per response instead.

Device: ``device=`` (a ``jax.Device`` or a string such as ``"cpu"``, ``"gpu"``, ``"cuda:1"``)
places the statistics there with ``jax.device_put``, so the programs run there; by default JAX's
default device is used.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from jaxmixed.api.options import check_level, method_is_reml
from jaxmixed.data.design import Design, build_design, expand_factor_slopes, model_variables, response_problems
from jaxmixed.errors import DataError, ModelError
from jaxmixed.fit.batched import fit_responses
from jaxmixed.results.many import ManyResult, summarise
from jaxmixed.runtime.devices import resolve_device

__all__ = ["ManyResult", "fit_many"]


# --------------------------------------------------------------------------------------------
# the public entry point


def _response_matrix(spec, data: pd.DataFrame, responses):
    """(Y as an n × k float array with NaN for missing, names) from ``responses``."""
    if responses is None:
        responses = [spec.response]
    if isinstance(responses, str):
        responses = [responses]
    if isinstance(responses, pd.DataFrame):
        names = [str(c) for c in responses.columns]
        Y = responses.to_numpy(dtype=float)
    elif isinstance(responses, (list, tuple, pd.Index)) and all(isinstance(r, str) for r in responses):
        names = list(responses)
        if not names:
            raise DataError("responses is empty")
        missing = [r for r in names if r not in data.columns]
        if missing:
            raise DataError(f"response column(s) {', '.join(map(repr, missing))} not in the data")
        if len(set(names)) != len(names):
            raise DataError("responses lists a column more than once")
        for r in names:
            if not pd.api.types.is_numeric_dtype(data[r]) or pd.api.types.is_bool_dtype(data[r]):
                raise DataError(f"response {r!r} is not numeric (dtype {data[r].dtype})")
        Y = data[names].to_numpy(dtype=float)
    else:
        try:
            Y = np.asarray(responses, dtype=float)
        except (TypeError, ValueError):
            raise DataError("responses must be a list of column names or a numeric (n × k) array") from None
        if Y.ndim == 1:
            Y = Y[:, None]
        if Y.ndim != 2:
            raise DataError(f"responses must be a 2-d (n × k) array, not {Y.ndim}-d")
        names = [f"y{j}" for j in range(Y.shape[1])]
    if Y.shape[0] != len(data):
        raise DataError(f"responses have {Y.shape[0]} rows but the data have {len(data)}")
    if Y.shape[1] == 0:
        raise DataError("responses is empty")
    if np.isinf(Y).any():
        bad = int(np.isinf(Y).any(axis=0).sum())
        raise DataError(f"{bad} response(s) have infinite values")
    return Y, names


def _check_responses(Y: np.ndarray, design: Design, names) -> None:
    """Responses the likelihood cannot handle (jm.fit's checks, ``response_problems``, for all
    responses at once): constant, fitted exactly by the fixed effects, or of extreme magnitude."""
    bad = response_problems(Y, design.fixed_basis[0])

    def fail(mask, what):
        found = [names[j] for j in np.flatnonzero(mask)]
        if found:
            more = f" and {len(found) - 5} more" if len(found) > 5 else ""
            raise DataError(f"response(s) {', '.join(map(repr, found[:5]))}{more} {what}")

    fail(bad["large"], "have values too large for double-precision cross-products; rescale them")
    fail(bad["constant"], "are constant: there is no variation to model")
    fail(bad["small"], "are on too small a scale for double precision; rescale them")
    fail(bad["exact"], "are fitted exactly by the fixed effects: the residual variance would be zero")


def fit_many(formula: str, data: pd.DataFrame, responses=None, method: str = "reml", *,
             chunk_size: int | None = None, progress: bool = False, device=None, level: float = 95.0,
             variance: bool = False, start=None, warm_start="auto", engine: str = "auto", family=None,
             link=None, nagq: int = 1, weights=None, offset=None, workers: int | None = None) -> ManyResult:
    """Fit one mixed model to many responses that share its design, in one batched program.

    ``family`` (with ``link``, ``nagq``, ``weights``, ``offset`` as for ``jm.fit``): a GLMM fitted
    to every response column by one vmapped program (:func:`jaxmixed.api.glmm.fit_many`;
    maximum likelihood; standard errors are not computed there).

    formula     lme4-style formula (``"y ~ x + (1 + x || g)"``) or a Stata ``mixed`` command
                (``"y x || g: x"``); its response names a placeholder when ``responses`` is given
                (it need not be a column).
    responses   column names of ``data``, a DataFrame, or an (n × k) array with n = len(data),
                rows in the order of ``data`` (array columns are named y0, y1, …); default the
                formula's response.
    method      "reml" or "ml".
    chunk_size  responses per compiled batch (default on CPU 32, on accelerators as many as
                keep a chunk's working memory near 256 MB, at most 4096). Each distinct chunk
                size compiles once (and a batch smaller than the chunk is padded to a power of
                two).
    progress    print a text progress bar on stderr.
    device      where to run: a ``jax.Device`` or a string ("cpu", "gpu", "cuda:1", …); default
                JAX's default device. The statistics are placed there with ``jax.device_put``.
    level, variance, start, engine   as for ``jm.fit``.
    warm_start  "auto" (default): later chunks start from the median θ̂ of the first chunk's
                interior fits, with jm.fit's own starts as the fallback (see
                ``fit_responses``); False: jm.fit's starts only; or a θ vector.
    workers     chunks fitted at once, each on its own thread (default: on the CPU one per core
                this process may use, at most 8; on accelerators 1). Used only where the batch
                program calls no LAPACK (every factorised block small enough to be unrolled);
                the estimates do not depend on it.

    Rows used: those complete in every model variable and in every response (the design must be
    the same for all responses); ``n_dropped`` counts the others.

    Returns a ManyResult with tidy DataFrames ``summary``, ``fixed`` and ``random`` (the last in
    FitResult.random's names and metric) and ``wide()`` for one row per response.
    """
    from jaxmixed.syntax.formula import parse_formula
    from jaxmixed.syntax.stata import parse_stata

    if family is not None:
        from jaxmixed.api import glmm

        if responses is None:
            raise ModelError("fit_many with family= needs responses= (the columns to fit)")
        return glmm.fit_many(formula, data, responses, family, link, nagq=nagq, weights=weights, offset=offset,
                             level=level, variance=variance, chunk_size=chunk_size or 32, progress=progress)
    reml = method_is_reml(method)
    level = check_level(level)
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame, not {type(data).__name__}")
    resolve_device(device)  # fail early on a bad device
    if not isinstance(formula, str):
        raise ModelError(f"formula must be a string, not {type(formula).__name__}")
    spec = parse_formula(formula) if "~" in formula else parse_stata(formula)
    res = spec.options.get("residuals")
    if res is not None and not getattr(res, "is_default", False):
        raise ModelError("fit_many supports independent, homoskedastic residuals only; "
                         "fit models with a residuals() structure with jm.fit")
    Y, names = _response_matrix(spec, data, responses)
    complete_y = ~np.isnan(Y).any(axis=1)
    # The formula's response is a placeholder: a complete column, so that only covariates,
    # groups and the responses decide which rows are used.
    if spec.options.get("fixed_formula") and tuple(spec.options.get("response_variables", ())) != (spec.response,):
        raise ModelError(f"fit_many needs the response as a plain column name, not {spec.response!r} "
                         "(the responses given replace it); transform the responses before passing them")
    cols = [v for v in model_variables(spec, data.columns) if v != spec.response and v in data.columns]
    frame = data[cols].reset_index(drop=True)
    frame[spec.response] = np.random.default_rng(0).standard_normal(len(frame))
    frame = frame.loc[complete_y].reset_index(drop=True)
    if len(frame) == 0:
        raise DataError("no observations left: every row has a missing value in some response")
    spec = expand_factor_slopes(spec, frame)
    design = build_design(spec, frame)
    rows = np.flatnonzero(complete_y)[design.rows]
    n_dropped = len(data) - len(rows)
    if reml and design.nobs <= design.p:
        raise ModelError(f"REML needs more observations ({design.nobs}) than fixed effects ({design.p})")
    Yu = Y if np.array_equal(rows, np.arange(len(Y))) else Y[rows]  # read only: no copy when no row drops
    _check_responses(Yu, design, names)
    notes = []
    if n_dropped:
        notes.append(f"{n_dropped} observation(s) dropped: missing in a model variable or in at least one response")
    for name in design.omitted:
        notes.append(f"{name} omitted because of collinearity")
    raw = fit_responses(design, lambda i, j: Yu[:, i:j], len(names), reml, chunk_size=chunk_size, engine=engine,
                        progress=progress, device=device, start=start, warm_start=warm_start, workers=workers)
    return summarise(design, raw, names, reml, level, variance, n_dropped, tuple(notes))
