"""From a ModelSpec and a DataFrame to arrays: y, X, and one block per grouping factor.

Rows with a missing value in any variable the model reads are dropped and counted (Stata's rule);
collinear fixed-effect columns are omitted with a JaxmixedWarning. Anything the engine cannot use
(±inf, non-scalar cells, complex numbers, a constant or exactly fitted response, magnitudes beyond
double precision, too few observations for the fixed or the random effects, collinear
random-effects columns) raises a DataError that names the variable.
Random-effects terms that share a grouping factor are merged into one *factor block* whose Λ is
block-diagonal over its terms (Stata's repeated equations at one level, lme4's ``(x||g)``).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, replace
from typing import Any
from functools import cached_property

import numpy as np
import pandas as pd

from jaxmixed.model import covariance
from jaxmixed.errors import DataError, ModelError, warn
from jaxmixed.model.spec import CONS, ModelSpec, RandomTerm


@dataclass(frozen=True)
class TermBlock:
    """Where one random-effects term sits: its factor, its columns inside it, its θ entries."""

    term: RandomTerm
    structure: object  # a covariance.* instance
    factor: int  # index into Design.factors
    cols: tuple[int, int]  # column slice inside the factor block
    theta: tuple[int, int]  # slice of the full θ vector


@dataclass(frozen=True)
class FactorBlock:
    """A grouping factor with all the random-effects columns that vary over its levels.

    codes[i] is the level of row i (0..L-1); Z[i] its q random-effects covariates;
    levels the level values (tuples for interaction groups) in code order.
    """

    group: tuple[str, ...]
    codes: np.ndarray
    n_levels: int
    Z: np.ndarray
    colnames: tuple[str, ...]
    levels: pd.Index

    @property
    def q(self) -> int:
        return self.Z.shape[1]

    @property
    def counts(self) -> np.ndarray:
        """Observations per level (code order)."""
        return np.bincount(self.codes, minlength=self.n_levels)


@dataclass(frozen=True)
class FactorSchema:
    """A grouping factor without its rows: its variables, levels (in code order) and
    random-effects columns."""

    group: tuple[str, ...]
    n_levels: int
    colnames: tuple[str, ...]
    levels: pd.Index

    @property
    def q(self) -> int:
        return len(self.colnames)


@dataclass(frozen=True)
class Schema:
    """What a design is, without its rows: the fixed-effects columns (names, categorical
    levels, omitted collinear columns), the grouping factors and terms, and the row counts.
    Everything that new data (``predict``), the engine's static shape and a streamed second
    pass over the rows need; its size grows with the model, not with the data."""

    response: str
    xnames: tuple[str, ...]
    fixed_levels: dict
    omitted: tuple[str, ...]
    factors: tuple[FactorSchema, ...]  # engine order
    terms: tuple[TermBlock, ...]
    n_theta: int
    nobs: int
    n_dropped: int
    group_summary: pd.DataFrame
    fixed_encoder: tuple = None
    column_encoders: dict = None

    @property
    def p(self) -> int:
        return len(self.xnames)


class DesignBase:
    """What every design offers whether or not it holds its rows (:class:`Design`, and a
    streamed source's :class:`jaxmixed.data.streaming.StreamedDesign`): the schema, θ's bounds
    and default start. Subclasses give ``theta_scale``, ``nobs`` and the fields of a Schema."""

    @cached_property
    def schema(self) -> Schema:
        """The design without its rows (:class:`Schema`)."""
        return Schema(response=self.response, xnames=self.xnames, fixed_levels=self.fixed_levels,
                      omitted=self.omitted,
                      factors=tuple(FactorSchema(f.group, f.n_levels, f.colnames, f.levels) for f in self.factors),
                      terms=self.terms, n_theta=self.n_theta, nobs=self.nobs, n_dropped=self.n_dropped,
                      group_summary=self.group_summary, fixed_encoder=self.fixed_encoder,
                      column_encoders=self.column_encoders)

    @property
    def p(self) -> int:
        return len(self.xnames)

    @property
    def theta_lower(self) -> np.ndarray:
        return np.concatenate([t.structure.lower for t in self.terms])

    @property
    def xtx(self) -> np.ndarray:
        """XᵀX of the fixed-effects columns, = R₀ᵀR₀ (``fixed_basis``)."""
        R0 = np.linalg.inv(self.fixed_basis[1]) if self.p else np.zeros((0, 0))
        return R0.T @ R0

    @property
    def theta0(self) -> np.ndarray:
        """The default start: Λ_s = I in the optimiser's units (``theta_scale``)."""
        return np.concatenate([t.structure.theta0 for t in self.terms]) * self.theta_scale


@dataclass(frozen=True)
class Design(DesignBase):
    """A schema and the rows it was built from (y, X, each factor's codes and Z)."""

    y: np.ndarray
    X: np.ndarray
    xnames: tuple[str, ...]
    factors: tuple[FactorBlock, ...]  # ordered for the engine: most levels first
    terms: tuple[TermBlock, ...]  # in the spec's order
    n_theta: int
    group_summary: pd.DataFrame
    n_dropped: int
    omitted: tuple[str, ...]  # fixed-effect columns dropped as collinear
    response: str
    rows: np.ndarray  # positions (in the input frame) of the rows used
    fixed_levels: dict  # levels of each categorical fixed-effect variable (for new data)
    fixed_basis: tuple = None  # (X̃, R₀⁻¹, log|R₀|²): see fixed_effects_basis
    fixed_encoder: tuple = None  # formulaic's model specs (response, fixed part) of a formulaic fixed part
    column_encoders: dict = None  # formulaic's model spec of each random slope written as an expression
    fixed_terms: Any = None  # FixedTerms of the fixed part (native columns; None for formulaic ones)

    @property
    def nobs(self) -> int:
        return self.y.shape[0]

    @cached_property
    def theta_scale(self) -> np.ndarray:
        """The optimiser's unit w of each θ entry: θ = w ⊙ θ_s, where θ_s is the θ of the model
        whose random-effects columns are divided by their root mean square rounded to a power of
        2 (``covariance.column_scale``; one common scale for identity and exchangeable terms).
        The optimiser and the boundary test work on θ_s, which is O(1) whatever the scale of the
        covariates; everything reported stays in the data's units."""
        return _theta_scale(self.terms, lambda t: np.mean(self.factors[t.factor].Z[:, t.cols[0]:t.cols[1]] ** 2,
                                                          axis=0))


def _theta_scale(terms, mean_squares) -> np.ndarray:
    """Design.theta_scale from each term's random-effects columns' mean squares."""
    return np.concatenate([np.asarray(t.structure.theta_scale(mean_squares(t)), dtype=float) for t in terms])


def outer_factor(design: Design) -> int:
    """Index of the outermost grouping factor (fewest grouping variables, then fewest levels):
    the panels of the marginal engine and of ``wcorrelation``."""
    return min(range(len(design.factors)), key=lambda k: (len(design.factors[k].group), design.factors[k].n_levels))


def _check_columns(spec: ModelSpec, data: pd.DataFrame):
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame, not {type(data).__name__}")
    for v in spec.variables:
        if v not in data.columns:
            close = difflib.get_close_matches(v, [str(c) for c in data.columns], n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise DataError(f"variable {v!r} is not a column of the data{hint}")
    dup = [v for v in spec.variables if int((data.columns == v).sum()) > 1]
    if dup:
        raise DataError(f"column {dup[0]!r} appears {int((data.columns == dup[0]).sum())} times in the data; "
                        "column names must be unique")
    if len(data) == 0:
        raise DataError("the data have no rows")


def _is_numeric(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)


def _numeric(s: pd.Series, what: str) -> np.ndarray:
    if pd.api.types.is_bool_dtype(s):
        return s.to_numpy(dtype=float)
    if not pd.api.types.is_numeric_dtype(s):
        raise DataError(f"{what} {s.name!r} is not numeric (dtype {s.dtype})")
    if pd.api.types.is_complex_dtype(s):
        raise DataError(f"{what} {s.name!r} has complex values; use its real part or modulus as a column")
    x = s.to_numpy(dtype=float)
    if not np.all(np.isfinite(x)):
        bad = int(np.sum(~np.isfinite(x)))
        raise DataError(f"{what} {s.name!r} has {bad} infinite value(s)")
    return x


#: the largest magnitude a numeric column may hold: its squares and cross-products must stay
#: finite (and accurate) in double precision
MAX_ABS = 1e150
#: the smallest root mean square of a non-constant response the engine resolves
MIN_RESPONSE_RMS = 1e-60


def _role(spec: ModelSpec, v: str) -> str:
    if v == spec.response:
        return "response"
    if any(v in t.group for t in spec.random):
        return "grouping variable"
    if any(v in t.columns for t in spec.random):
        return "random-effects covariate"
    return "variable"


def _term(t: RandomTerm) -> str:
    return f"({', '.join(t.display)} | {t.label or '_all'})"


def _short(names, k: int = 6) -> str:
    names = list(names)
    return ", ".join(names) if len(names) <= k else ", ".join(names[:k]) + f", … ({len(names)} in all)"


def model_variables(spec: ModelSpec, columns) -> list[str]:
    """Every column the model reads: ``spec.variables`` and, for a fixed part written with
    formulaic expressions, the identifiers inside stateful transforms (``poly(x, 2)``) that
    are columns of the data."""
    cands = tuple(spec.options.get("fixed_candidates", ())) + tuple(spec.options.get("random_candidates", ()))
    extra = [c for c in dict.fromkeys(cands) if c in columns and c not in spec.variables]
    aux = [c for c in spec.options.get("aux_variables", ()) if c not in spec.variables and c not in extra]
    return list(spec.variables) + extra + aux


def _is_factor_column(s: pd.Series) -> bool:
    return not (pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s))


def _literal(level) -> str:
    """A level as a Python literal inside a formula expression."""
    if isinstance(level, (str, np.str_)):
        return repr(str(level))
    if isinstance(level, np.generic):
        return repr(level.item())
    return repr(level)


def expand_factor_slopes(spec: ModelSpec, data: pd.DataFrame) -> ModelSpec:
    """lme4's random slopes of a factor (formula syntax): in ``(1 + f | g)`` a categorical
    column f becomes one random column per level but the first (all levels without an
    intercept, as ``(0 + f | g)``), each the 0/1 indicator ``I((f == level) * 1.0)`` shown as
    ``f<level>`` (lme4's ``fB``); levels in the fixed effects' order, among the rows the model
    can use. ``(0 + f | g)`` is unstructured over f's levels (as lme4); in ``(1 + f || g)`` the
    indicators are independent like every other column there (lme4 keeps a factor's
    indicators correlated under ``||``). Other specs come back unchanged."""
    if spec.syntax != "formula":
        return spec
    exprs = list(spec.options.get("random_expressions", ()))
    todo = {c for t in spec.random for c in t.columns
            if c != CONS and c not in exprs and c in data.columns and _is_factor_column(data[c])}
    if not todo:
        return spec
    used = [v for v in model_variables(spec, data.columns) if v in data.columns]
    complete = data[used].notna().all(axis=1).to_numpy()
    cands = list(spec.options.get("random_candidates", ()))
    terms = []
    for t in spec.random:
        cols, shown = [], []
        for c, name in zip(t.columns, t.display):
            if c not in todo:
                cols.append(c)
                shown.append(name)
                continue
            s = data[c][complete]
            levels = levels_of(pd.unique(s), s.dtype)
            ref = c if c.isidentifier() else f"`{c}`"
            for lv in (levels[1:] if CONS in t.columns else levels):
                e = f"I(({ref} == {_literal(lv)}) * 1.0)"
                cols.append(e)
                shown.append(f"{c}{lv}")
                exprs.append(e)
            cands.append(c)
        # a one-column term (cov "identity") of a factor: unstructured over its indicators, as lme4
        cov = "unstructured" if (len(t.columns) == 1 and len(cols) > 1) else t.cov
        terms.append(replace(t, columns=tuple(cols), display=tuple(shown), cov=cov))
    return replace(spec, random=tuple(terms), options={**spec.options, "random_expressions": tuple(exprs),
                                                       "random_candidates": tuple(dict.fromkeys(cands))})


def random_column(spec: ModelSpec, df: pd.DataFrame, c: str, encoders: dict | None = None) -> np.ndarray:
    """The values of random-effects column ``c`` in the rows of ``df``: 1 for the intercept, the
    column itself, or an expression (``log(x)``) evaluated by formulaic. ``encoders``: a dict of
    the expressions' fitted model specs; filled in when fitting, read for new data (so that
    ``scale(x)`` keeps the training centring)."""
    if c == CONS:
        return np.ones(len(df))
    if c not in spec.options.get("random_expressions", ()):
        s = df[c]
        if _is_factor_column(s):
            raise DataError(f"random-effects covariate {c!r} is not numeric (dtype {s.dtype}); random slopes "
                            f"take numeric columns: for a factor's, add its 0/1 indicator columns "
                            f"(e.g. (df[{c!r}] == level) * 1.0) and name those in the term")
        return _numeric(s, "random-effects covariate")
    import formulaic

    try:
        with np.errstate(all="ignore"):
            if encoders is not None and c in encoders:
                mm = encoders[c].get_model_matrix(df, na_action="ignore")
            else:
                mm = formulaic.model_matrix(f"0 + {c}", df, na_action="ignore")
                if encoders is not None:
                    encoders[c] = mm.model_spec
    except Exception as exc:  # noqa: BLE001 - formulaic's errors, named as the data's
        raise DataError(f"random-effects covariate {c!r} cannot be evaluated on the data: "
                        f"{str(exc).splitlines()[0]}") from None
    values = np.asarray(mm, dtype=float).reshape(len(df), -1)
    if values.shape[1] != 1:
        raise DataError(f"random-effects covariate {c!r} makes {values.shape[1]} columns; a random slope needs one "
                        "(write each column as its own term)")
    if not np.all(np.isfinite(values)):
        raise DataError(f"random-effects covariate {c!r} has {int(np.sum(~np.isfinite(values)))} non-finite "
                        "value(s) (from its expression)")
    return values[:, 0]


def _formulaic_columns(spec: ModelSpec, df: pd.DataFrame, encoders=None):
    """(y or None, X, names, encoders) of a fixed part given as a formulaic formula: formulaic
    builds the columns (``encoders``: the fitted model specs of the response and the fixed part,
    so new data get the training levels and the training centring); the intercept is named
    ``_cons`` and put last, as the rest of jaxmixed names it."""
    import formulaic

    try:
        with np.errstate(all="ignore"):  # (non-finite results are reported below, by column)
            if encoders is None:
                mm = formulaic.model_matrix(spec.options["fixed_formula"], df, na_action="ignore")
                lhs, rhs = mm.lhs, mm.rhs
                encoders = (lhs.model_spec, rhs.model_spec)
            else:
                lhs = None
                rhs = encoders[1].get_model_matrix(df, na_action="ignore")
    except Exception as exc:  # noqa: BLE001 - formulaic's errors, named as the data's
        raise DataError(f"the formula's fixed part cannot be evaluated on the data: {str(exc).splitlines()[0]}") \
            from None
    names = [CONS if c == "Intercept" else str(c) for c in rhs.columns]
    X = np.asarray(rhs, dtype=float).reshape(len(df), -1)
    order = [i for i, n in enumerate(names) if n != CONS] + [i for i, n in enumerate(names) if n == CONS]
    X, names = X[:, order], [names[i] for i in order]
    y = None
    if lhs is not None:
        y = np.asarray(lhs, dtype=float).reshape(len(df), -1)[:, 0]
        bad = int(np.sum(~np.isfinite(y)))
        if bad:
            raise DataError(f"response {spec.response!r} has {bad} non-finite value(s) (from its expression)")
    for j in np.flatnonzero(~np.all(np.isfinite(X), axis=0)):
        raise DataError(f"fixed-effect column {names[j]!r} has {int(np.sum(~np.isfinite(X[:, j])))} non-finite "
                        "value(s) (from its expression)")
    return y, X, names, encoders


def response_values(spec: ModelSpec, design, df: pd.DataFrame) -> np.ndarray:
    """The response of new rows (its expression, for a formulaic response)."""
    enc = getattr(design, "fixed_encoder", None)
    if enc is not None:
        try:
            y = np.asarray(enc[0].get_model_matrix(df, na_action="ignore"), dtype=float).reshape(len(df), -1)[:, 0]
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"the response cannot be evaluated on the new data: {str(exc).splitlines()[0]}") from None
        return y
    return _numeric(df[spec.response], "response")


def _check_values(spec: ModelSpec, df: pd.DataFrame, variables=None) -> None:
    """Cells the model cannot use (in the rows it keeps): non-scalar objects, ±inf anywhere."""
    for v in (spec.variables if variables is None else variables):
        s = df[v]
        what = _role(spec, v)
        if s.dtype == object:
            try:
                pd.unique(s.to_numpy())  # a C-speed pass that fails on unhashable cells
            except TypeError:
                bad = next(x for x in s if not pd.api.types.is_hashable(x))
                raise DataError(f"{what} {v!r} holds values that are not scalars "
                                f"(a {type(bad).__name__}); each cell must be a number or a label") from None
        if _is_numeric(s) and not pd.api.types.is_complex_dtype(s):
            x = s.to_numpy(dtype=float)
            bad = int(np.sum(np.isinf(x)))
            if bad:
                raise DataError(f"{what} {v!r} has {bad} infinite value(s)")


def _check_magnitude(A: np.ndarray, names, what: str) -> None:
    if not A.size:
        return
    big = np.array([np.max(np.abs(A[:, j])) for j in range(A.shape[1])])  # (contiguous in a column-major A)
    for j in np.flatnonzero(~(big <= MAX_ABS)):  # also catches overflow to inf in products
        raise _too_large(what, names[j], big[j])


def _too_large(what: str, name: str, big: float) -> DataError:
    return DataError(f"{what} {name!r} has values as large as {big:.3g}, beyond what "
                     f"double-precision cross-products can hold (|x| ≤ {MAX_ABS:.0e}); rescale it")


def fixed_effects_basis(X: np.ndarray, R=None):
    """(X̃, R₀⁻¹, log|R₀|²): a well-conditioned basis X̃ = X R₀⁻¹ of the fixed-effects columns,
    X = X̃R₀ with R₀ upper triangular (positive diagonal). The cross-products are formed with
    X̃, so that the engine's Cholesky factors see a well-conditioned fixed-effects block however
    nearly collinear (or far from 0, beside the constant) the columns of X are: forming XᵀX
    itself squares cond(X) into rounding noise of the deviance. The engine turns β̃ back into
    β = R₀⁻¹β̃ and adds log|R₀|² to the REML deviance, so nothing reported changes.

    R₀ is the R of a Householder QR of X (its Q is not formed: X̃ = X R₀⁻¹ is orthonormal to
    rounding), ≈ 0.1 s for a million rows and five columns. ``R``: that R when the caller has
    it (:func:`_drop_collinear`'s factor)."""
    n, p = X.shape
    if p == 0:
        return X, np.zeros((0, 0)), 0.0
    if R is None:
        R = np.linalg.qr(X, mode="r")
    R = R * np.where(np.diag(R) < 0, -1.0, 1.0)[:, None]
    R_inv = np.linalg.solve(R, np.eye(p))
    return X @ R_inv, R_inv, float(2.0 * np.sum(np.log(np.diag(R))))


def response_problems(Y: np.ndarray, X: np.ndarray, block: int = 2048) -> dict:
    """Per column of Y (n × k), what the likelihood cannot handle: ``large`` (beyond
    MAX_ABS), ``constant``, ``small`` (root mean square below MIN_RESPONSE_RMS), ``exact``
    (fitted exactly by the fixed effects; X their well-conditioned basis X̃,
    :func:`fixed_effects_basis`). The one set of response checks (jm.fit, fit_many). Columns
    are checked ``block`` at a time (fit_many's 100,000 responses: no n × k temporaries)."""
    Y = np.asarray(Y, dtype=float).reshape(len(Y), -1)
    n, k = Y.shape
    out = {key: np.zeros(k, dtype=bool) for key in ("large", "constant", "small", "exact")}
    fits = 0 < X.shape[1] < X.shape[0]  # (X: the well-conditioned basis X̃ of fixed_effects_basis)
    XtX = X.T @ X if fits else None
    for a in range(0, k, block):
        b = min(a + block, k)
        Yb = Y[:, a:b]
        hi, lo = np.max(Yb, axis=0), np.min(Yb, axis=0)
        with np.errstate(over="ignore", invalid="ignore"):  # (columns beyond MAX_ABS are flagged as large)
            big = np.maximum(hi, -lo)
            large = ~(big <= MAX_ABS)
            constant = (hi - lo) == 0
            small = ~constant & (np.sqrt(np.einsum("ij,ij->j", Yb, Yb) / n) < MIN_RESPONSE_RMS)
            exact = np.zeros(b - a, dtype=bool)
            if fits:
                B = np.linalg.solve(XtX, X.T @ Yb)
                R = Yb - X @ B
                resid = np.sqrt(np.einsum("ij,ij->j", R, R) / n)
                exact = resid <= 1e-10 * np.std(Yb, axis=0) + 1e-13 * big
        out["large"][a:b], out["constant"][a:b], out["small"][a:b] = large, constant, small
        out["exact"][a:b] = exact & ~constant & ~large
    return out


def _check_response(y: np.ndarray, X: np.ndarray, xnames, response: str) -> None:
    """A response the likelihood cannot handle: constant, fitted exactly, or of extreme magnitude."""
    bad = {k: bool(v[0]) for k, v in response_problems(y[:, None], X).items()}
    raise_response_problem(bad, response, len(y), y[0], lambda: float(np.sqrt(np.mean(y ** 2))),
                           float(np.max(np.abs(y))), xnames)


def raise_response_problem(bad: dict, response: str, n: int, value: float, rms, big: float, xnames) -> None:
    """The DataError for the first of ``bad``'s problems (see :func:`response_problems`) of a
    response with ``n`` observations, first value ``value``, root mean square ``rms()`` and
    largest magnitude ``big``."""
    if bad["large"]:
        raise _too_large("response", response, big)
    if bad["constant"]:
        raise DataError(f"response {response!r} is constant ({value:g} in all {n} observations): "
                        "there is no variation to model")
    if bad["small"]:
        raise DataError(f"response {response!r} is on the scale {rms():.3g} (root mean square), too small "
                        "for double precision; rescale it")
    if bad["exact"]:
        raise DataError(f"response {response!r} is fitted exactly by the fixed effects "
                        f"({_short(xnames)}): the residual variance would be zero")


def _is_categorical(f, df: pd.DataFrame) -> bool:
    """Whether a fixed-effects factor is coded by levels: ``i.x``/``C(x)``, or a non-numeric
    column when the syntax leaves it open (as R does for factors)."""
    return f.categorical if f.categorical is not None else not _is_numeric(df[f.var])


def _fixed_columns(spec: ModelSpec, df: pd.DataFrame, known: dict | None = None, all_levels: bool = False,
                   keys: list | None = None, as_list: bool = False):
    """Columns of X with their names: each term is the product of its factors' columns.

    ``known`` maps a categorical variable to the levels seen when the model was fitted, so that
    new data get the same dummy columns; the levels used are returned for that purpose.
    ``all_levels``: every level of every categorical variable gets a column (the
    overparameterised design behind SAS/lmerTest type III contrasts); ``keys``, a list, receives
    each column's (term index, ((variable, level), ...)) (-1 for ``_cons``). ``as_list``: the
    columns as a list of arrays (some may be views of ``df``'s columns) instead of X.
    """
    stata = spec.syntax == "stata"
    used_levels: dict = {}
    cols: list[np.ndarray] = []
    names: list[str] = []
    keys = [] if keys is None else keys

    def is_cat(f) -> bool:
        return _is_categorical(f, df)

    full = set() if stata else _full_dummies(spec, is_cat)
    for k, term in enumerate(spec.fixed):
        parts: list[list[tuple[str, np.ndarray]]] = []
        for f in term.factors:
            s = df[f.var]
            categorical = is_cat(f)
            if not categorical:
                parts.append([(f"c.{f.var}" if stata and len(term.factors) > 1 else f.var,
                               _numeric(s, "variable"), ())])
                continue
            if known is not None and f.var in known:
                levels = known[f.var]
            else:
                levels = _levels(s)
            used_levels[f.var] = levels
            if known is not None and ("base", f.var) in known:  # new data: the fit's base level
                base = known[("base", f.var)]
            else:
                base = base_level(f, levels, lambda lv, s=s: int((s == lv).sum()))
            used_levels[("base", f.var)] = base
            dummies = []
            every = (k, f.var) in full
            for lv in levels:
                if base is not None and lv == base and not every and not all_levels:
                    continue
                name = f"{lv}.{f.var}" if stata else (f"{f.var}[{lv}]" if every else f"{f.var}[T.{lv}]")
                dummies.append((name, (s == lv).to_numpy(dtype=float), ((f.var, lv),)))
            parts.append(dummies)
        combos: list[tuple[str, np.ndarray, tuple]] = [("", None, ())]  # (None: the empty product, 1)
        for part in parts:
            combos = [((a + ("#" if stata else ":") + b) if a else b, z if x is None else x * z, ka + kb)
                      for a, x, ka in combos for b, z, kb in part]
        for name, x, key in combos:
            if name not in names:
                names.append(name)
                cols.append(x)
                keys.append((k, key))
    if spec.intercept:
        names.append(CONS)
        cols.append(np.ones(len(df)))
        keys.append((-1, ()))
    if as_list:
        return cols, names, used_levels
    X = np.array(cols).T if cols else np.zeros((len(df), 0))  # column-major: each column contiguous
    return X, names, used_levels


def base_level(f, levels, count):
    """The base (omitted) level of categorical fixed-effects factor ``f`` among ``levels``:
    the first (default), the last, the most frequent (Stata's ``ib(freq)``, ``count(level)``
    giving each level's number of observations; the first of a tie), none (``ibn.``), or the
    level the syntax names."""
    if f.base == "last":
        return levels[-1]
    if f.base == "freq":
        return levels[int(np.argmax([count(lv) for lv in levels]))]
    if f.base == "none":
        return None
    if f.base not in (None, "first"):
        match = [lv for lv in levels if lv == f.base or str(lv) == str(f.base)]
        if not match:
            raise DataError(f"base level {f.base!r} of {f.var!r} does not occur in the data")
        return match[0]
    return levels[0]


def _levels(s: pd.Series) -> np.ndarray:
    """The levels of a categorical variable in coding order: a pandas Categorical's categories
    in their own order (those that occur; the first is the reference level, as in R and
    statsmodels), else the sorted distinct values."""
    return levels_of(pd.unique(s.dropna()) if isinstance(s.dtype, pd.CategoricalDtype) else pd.unique(s), s.dtype)


def levels_of(values, dtype) -> np.ndarray:
    """:func:`_levels` from the distinct values of a variable and its dtype."""
    if isinstance(dtype, pd.CategoricalDtype):
        present = set(values)
        return np.array([c for c in dtype.categories if c in present], dtype=object)
    levels = np.asarray(values)
    try:
        return np.sort(levels)
    except TypeError:
        return np.array(sorted(levels, key=str), dtype=object)


def _full_dummies(spec: ModelSpec, is_cat) -> set[tuple[int, str]]:
    """R's coding rule for lme4-style formulas: the (term index, variable) pairs whose
    categorical variable gets a column for every level instead of treatment contrasts.

    Terms are taken in R's order (by degree). A categorical variable in a term is coded by
    contrasts when the term without it is contained in an earlier term, the empty term being the
    intercept; otherwise every level gets a column (``y ~ x + x:f``, a slope per level of f).
    Without an intercept, the first categorical variable of the first term that has one gets
    every level (``y ~ 0 + f``: one mean per level, as in R).
    """
    sets = [frozenset(f.var for f in t.factors) for t in spec.fixed]
    order = sorted(range(len(sets)), key=lambda k: (len(sets[k]), k))
    full: set[tuple[int, str]] = set()
    if not spec.intercept:
        for k in order:
            cats = [f.var for f in spec.fixed[k].factors if is_cat(f)]
            if cats:
                full.add((k, cats[0]))
                break
    for pos, k in enumerate(order):
        for f in spec.fixed[k].factors:
            rest = sets[k] - {f.var}
            if rest and is_cat(f) and not any(rest <= sets[j] for j in order[:pos]):
                full.add((k, f.var))
    return full


@dataclass(frozen=True)
class FixedTerms:
    """The fixed part's terms: label, columns of X, variables and numeric variables of each (in
    the spec's order; ``_cons`` is not a term), and the overparameterised design's contrast
    basis for type III tests: ``rd_basis`` (r × p), each column of the overparameterised design
    (every level of every factor) expressed in X's columns, with ``rd_keys`` and ``x_keys``
    identifying the columns; ``rd_basis`` is None when that design would have more than 5·10⁷
    entries."""

    labels: tuple
    columns: tuple  # per term: tuple of column indices into xnames
    variables: tuple  # per term: frozenset of variable names
    numerics: tuple  # per term: frozenset of its numeric variables
    rd_basis: np.ndarray
    rd_keys: tuple
    x_keys: tuple


def _fixed_terms(spec: ModelSpec, df: pd.DataFrame, X, xnames, x_keys, sums=None) -> FixedTerms:
    """``sums`` (a streamed source: ``df`` has the columns' types but no rows): (XᵀX, Xᵀ rdX,
    rd_keys) of the kept columns X and the overparameterised design rdX, or None when these were
    not formed (then no type III basis)."""
    stata = spec.syntax == "stata"
    labels, columns, variables, numerics = [], [], [], []
    for k, term in enumerate(spec.fixed):
        cols = tuple(j for j, key in enumerate(x_keys) if key[0] == k)
        if not cols:
            continue
        labels.append(("#" if stata else ":").join(f.var for f in term.factors))
        columns.append(cols)
        variables.append(frozenset(f.var for f in term.factors))
        numerics.append(frozenset(f.var for f in term.factors if not _is_categorical(f, df)))
    rd_keys: list = []
    if sums is not None or len(df) == 0:
        if sums is None:
            return FixedTerms(tuple(labels), tuple(columns), tuple(variables), tuple(numerics), None, (), tuple(x_keys))
        XtX, XtRd, rd_keys = sums
        B = np.linalg.solve(XtX, XtRd) if XtX.shape[0] else np.zeros((0, XtRd.shape[1]))
        return FixedTerms(tuple(labels), tuple(columns), tuple(variables), tuple(numerics), B.T, tuple(rd_keys),
                          tuple(x_keys))
    width = 1 + sum(int(np.prod([len(pd.unique(df[f.var])) for f in term.factors if _is_categorical(f, df)]))
                    for term in spec.fixed)
    if len(df) * width > 5e7:  # the overparameterised design would not fit comfortably: no type III basis
        return FixedTerms(tuple(labels), tuple(columns), tuple(variables), tuple(numerics), None, (), tuple(x_keys))
    rdX, _, _ = _fixed_columns(spec, df, all_levels=True, keys=rd_keys)
    # rdX = X B: B = X⁺ rdX (from the cross-products; X has full column rank)
    B = np.linalg.solve(X.T @ X, X.T @ rdX) if X.shape[1] else np.zeros((0, rdX.shape[1]))
    return FixedTerms(tuple(labels), tuple(columns), tuple(variables), tuple(numerics), B.T, tuple(rd_keys),
                      tuple(x_keys))


def fixed_matrix(spec: ModelSpec, design, df: pd.DataFrame) -> np.ndarray:
    """X for new data, with the fitted model's columns (same dummies, collinear ones omitted);
    ``design`` a Design or its Schema."""
    if getattr(design, "fixed_encoder", None) is not None:
        _, X, names, _ = _formulaic_columns(spec, df, design.fixed_encoder)
    else:
        X, names, _ = _fixed_columns(spec, df, design.fixed_levels)
    return X[:, [names.index(n) for n in design.xnames]]


def _drop_collinear(X: np.ndarray, names: list[str], factor: list | None = None):
    """Omit columns that are (numerically) linear combinations of earlier ones, as Stata does.

    The constant is checked first so that a covariate, not ``_cons``, is the one omitted. A set
    of columns is independent when the singular values of its columns scaled to unit norm
    exceed 1e-9 √n. They are those of the same columns of R D⁻¹, R the Householder factor of X
    and D its column norms (= the norms of R's columns), so one QR of the n rows serves every
    candidate set; ``factor``, a list, receives the R of the kept columns (for
    :func:`fixed_effects_basis`)."""
    n, p = X.shape
    tol = 1e-9 * np.sqrt(n)
    if n > p > 0:
        R = np.linalg.qr(X, mode="r")
        scale = np.sqrt(np.sum(R ** 2, axis=0))
    else:
        R = X
        scale = np.sqrt(np.sum(X ** 2, axis=0))
    scale[scale == 0] = 1.0
    Rs = R / scale
    keep = _independent(names, lambda cand: np.linalg.matrix_rank(Rs[:, cand], tol=tol))
    if factor is not None and n > p > 0:
        factor.append(R if len(keep) == p else np.linalg.qr(R[:, keep], mode="r"))
    kept = X if len(keep) == p else X[:, keep]
    return kept, [names[j] for j in keep], tuple(names[j] for j in range(len(names)) if j not in keep)


def _independent(names, rank) -> list[int]:
    """The columns kept by the greedy rule of :func:`_drop_collinear` (the constant first, then
    in order, each kept when it raises the rank), sorted; ``rank(columns)`` the rank of a set."""
    order = list(range(len(names)))
    if names and names[-1] == CONS:
        order = [len(names) - 1] + order[:-1]
    keep: list[int] = []
    for j in order:
        if rank(keep + [j]) == len(keep) + 1:
            keep.append(j)
    return sorted(keep)


#: collinearity from cross-products: a column is dependent when its part orthogonal to the
#: others is below this fraction of its norm (lme4's rank tolerance; a Gram matrix resolves no
#: finer than √ε ≈ 1.5e-8)
GRAM_RANK_TOL = 1e-7


def drop_collinear_gram(G: np.ndarray, names, n: int):
    """:func:`_drop_collinear` from the cross-products G = XᵀX alone (a streamed source): the
    same greedy rule, a set's rank from the eigenvalues of its scaled Gram matrix, with the
    tolerance max(1e-9 √n, GRAM_RANK_TOL) on the singular values. Returns (kept indices, kept
    names, omitted names)."""
    names = list(names)
    scale = np.sqrt(np.maximum(np.diag(G), 0.0))
    scale[scale == 0] = 1.0
    Gs = G / np.outer(scale, scale)
    tol = max(1e-9 * np.sqrt(n), GRAM_RANK_TOL) ** 2

    def rank(cand):
        ev = np.linalg.eigvalsh(Gs[np.ix_(cand, cand)])
        return int(np.sum(ev > tol))

    keep = _independent(names, rank)
    return keep, [names[j] for j in keep], tuple(names[j] for j in range(len(names)) if j not in keep)


def _group_codes(df: pd.DataFrame, group: tuple[str, ...]):
    if not group:
        return np.zeros(len(df), dtype=np.int64), pd.Index(["_all"])
    if len(group) == 1 and not isinstance(df[group[0]].dtype, pd.CategoricalDtype):
        # one plain column: factorize it directly (5× faster than through a MultiIndex)
        codes, uniques = pd.factorize(df[group[0]], sort=True)
        return codes.astype(np.int64), pd.Index(list(uniques), name=group[0])
    if len(group) > 1 and not any(isinstance(df[g].dtype, pd.CategoricalDtype) for g in group):
        fast = _combined_codes(df, group)
        if fast is not None:
            return fast
    keys = df[list(group)]
    codes, uniques = pd.MultiIndex.from_frame(keys).factorize(sort=True)
    if len(group) == 1:
        uniques = pd.Index([u[0] for u in uniques], name=group[0])
    return codes.astype(np.int64), uniques


def _combined_codes(df: pd.DataFrame, group: tuple[str, ...]):
    """What ``pd.MultiIndex.from_frame(df[group]).factorize(sort=True)`` gives (codes of the
    combinations present, in lexicographic order of the sorted levels of each column), from each
    column's own sorted factorisation (4× faster); None where a column has missing values or
    levels that do not sort (the MultiIndex path then decides)."""
    try:
        parts = [pd.factorize(df[g], sort=True) for g in group]
    except TypeError:
        return None
    combined = np.zeros(len(df), dtype=np.int64)
    for codes, uniques in parts:
        if len(codes) and codes.min() < 0:
            return None
        combined = combined * len(uniques) + codes
    present, codes = np.unique(combined, return_inverse=True)
    arrays = []
    for codes_j, uniques in reversed(parts):
        arrays.append(np.asarray(uniques)[present % len(uniques)])
        present = present // len(uniques)
    return codes.astype(np.int64).ravel(), pd.MultiIndex.from_arrays(arrays[::-1])  # unnamed, as there


def _summary(spec: ModelSpec, df: pd.DataFrame, weights=None, known=None) -> pd.DataFrame:
    """Groups per level and observations per group (min, mean, max); ``weights``: the number of
    observations each row of ``df`` stands for (a streamed source's distinct combinations);
    ``known``: {grouping: (codes, levels)} already computed for ``df``."""
    rows = []
    for lev in spec.levels:
        codes, uniques = (known or {}).get(lev.group) or _group_codes(df, lev.group)
        counts = np.bincount(codes, weights=weights, minlength=len(uniques))
        rows.append((lev.label, len(uniques), int(counts.min()), float(counts.mean()), int(counts.max())))
    out = pd.DataFrame(rows, columns=["level", "n_groups", "min", "mean", "max"]).set_index("level")
    return out


def check_fixed_count(n: int, n_dropped: int, xnames, fixed_levels, omitted) -> None:
    """More observations than fixed effects, or a DataError that says why not."""
    if n > len(xnames):
        return
    after = f" (after dropping {n_dropped} with missing values)" if n_dropped else ""
    many = [f"{v} has {len(lv)} levels" for v, lv in fixed_levels.items() if isinstance(v, str) and len(lv) > 2]
    if omitted:
        many.append(f"{_short(omitted)} omitted because of collinearity")
    raise DataError(f"too few observations: {n}{after} for {len(xnames)} fixed effects "
                    f"({_short(xnames)})" + (f"; {'; '.join(many)}" if many else "")
                    + "; the model needs more observations than fixed effects")


def groupings(spec: ModelSpec) -> list[tuple[str, ...]]:
    """The distinct groupings of the random-effects terms, in the spec's order (one factor block
    each)."""
    groups: list[tuple[str, ...]] = []
    for t in spec.random:
        if t.group not in groups:
            groups.append(t.group)
    return groups


def check_grouping(g: tuple, n_levels: int) -> None:
    if n_levels < 2:
        if not g:
            raise DataError("level '_all' is a single group: a variance needs at least two groups "
                            "(write _all: R.varname for random effects over the levels of a variable)")
        raise DataError(f"grouping {':'.join(g)!r} has {n_levels} level(s): a variance needs at least two groups")


def check_term_size(t: RandomTerm, n_groups: int, nobs: int) -> None:
    n_re = n_groups * t.q
    if n_re >= nobs:
        raise DataError(
            f"{nobs} observations for {n_re} random effects in the term {_term(t)} "
            f"({n_groups} groups × {t.q}): "
            "its variance cannot be told apart from the residual variance; the model needs more "
            "observations than random effects in each term")


def check_term_columns(t: RandomTerm, kept, dependent) -> None:
    if dependent:
        raise DataError(
            f"the random-effects columns of the term {_term(t)} are collinear: {', '.join(dependent)} "
            f"{'is' if len(dependent) == 1 else 'are'} zero, constant or a linear combination of "
            f"{', '.join(kept) if kept else 'nothing'} in every row; remove "
            f"{'it' if len(dependent) == 1 else 'them'} from the term")


def engine_order(n_levels: list) -> list[int]:
    """The factors' engine order from their numbers of levels: most levels first (its block of
    ZᵀZ stays block-diagonal), ties in the spec's order."""
    return sorted(range(len(n_levels)), key=lambda k: (-n_levels[k], k))


def place_terms(index: dict, starts: list) -> tuple[tuple, int]:
    """(TermBlocks, n_theta): each term's covariance structure, factor (``index``: grouping →
    engine position) and columns (``starts``: (term, first, stop) in the factor block)."""
    terms, pos = [], 0
    for t, start, stop in starts:
        s = covariance.make(t.cov, t.q)
        terms.append(TermBlock(term=t, structure=s, factor=index[t.group], cols=(start, stop),
                               theta=(pos, pos + s.n_theta)))
        pos += s.n_theta
    return tuple(terms), pos


def check_present(spec: ModelSpec, present: dict, n_complete: int) -> None:
    """A DataError for a variable missing in every row (``present``: its non-missing count) or
    for no complete row (``n_complete``); the in-memory and streamed designs' rule."""
    for v, count in present.items():
        if count == 0:
            raise DataError(f"{_role(spec, v)} {v!r} is missing in every row")
    if n_complete == 0:
        raise DataError("no observations left after dropping rows with missing values")


def build_design(spec: ModelSpec, data: pd.DataFrame) -> Design:
    """Turn a model description and a data frame into the arrays the engine needs."""
    _check_columns(spec, data)
    if not spec.random:
        raise ModelError("the model has no random-effects term; add one such as (1|g) or || g:")
    variables = model_variables(spec, data.columns)
    used = data[variables]
    complete = used.notna().all(axis=1).to_numpy()
    n_dropped = int((~complete).sum())
    check_present(spec, {v: int(data[v].notna().sum()) for v in variables}, int(complete.sum()))
    rows = np.flatnonzero(complete)
    df = used.reset_index(drop=True) if n_dropped == 0 else used.iloc[rows].reset_index(drop=True)
    _check_values(spec, df, variables)

    encoders = None
    col_keys: list = []
    if spec.options.get("fixed_formula"):
        y, X, xnames, encoders = _formulaic_columns(spec, df)
        fixed_levels = {}
    else:
        y = _numeric(df[spec.response], "response")
        X, xnames, fixed_levels = _fixed_columns(spec, df, keys=col_keys)
    _check_magnitude(X, xnames, "fixed-effect column")
    all_names = list(xnames)
    factor: list = []
    X, xnames, omitted = _drop_collinear(X, xnames, factor)
    terms_info = None
    if col_keys:  # the terms of the fixed part (for F tests per term), native columns only
        key_of = dict(zip(all_names, col_keys))
        terms_info = _fixed_terms(spec, df, X, xnames, [key_of[n] for n in xnames])
    if spec.syntax:
        check_fixed_count(len(y), n_dropped, xnames, fixed_levels, omitted)
    if omitted:
        warn(f"{', '.join(omitted)} omitted because of collinearity")
    basis = fixed_effects_basis(X, factor[0] if factor else None)
    glmm = bool(spec.options.get("glmm"))  # a GLMM's response is checked by its family
    if not glmm:
        _check_response(y, basis[0], xnames, spec.response)

    # One factor block per distinct grouping; terms sharing it are concatenated in spec order.
    groups = groupings(spec)
    blocks: dict[tuple[str, ...], dict] = {}
    for g in groups:
        codes, levels = _group_codes(df, g)
        check_grouping(g, len(levels))
        blocks[g] = dict(codes=codes, levels=levels, cols=[], names=[])
    placed = []
    column_encoders: dict = {}
    for t in spec.random:
        b = blocks[t.group]
        start = len(b["names"])
        for c in t.columns:
            b["cols"].append(random_column(spec, df, c, column_encoders))
            b["names"].append(c)
        placed.append((t, start, len(b["names"])))

    for t, start, stop in placed:
        if not glmm:  # (a GLMM may have one effect per row: overdispersion)
            check_term_size(t, len(blocks[t.group]["levels"]), len(y))
        Zt = np.column_stack(blocks[t.group]["cols"][start:stop])
        _, kept, dependent = _drop_collinear(Zt, list(t.columns))
        check_term_columns(t, kept, dependent)
        for c, z in zip(t.columns, blocks[t.group]["cols"][start:stop]):
            if c != CONS:  # (any other scale is fine: the optimiser works in Design.theta_scale units)
                _check_magnitude(z[:, None], [c], "random-effects covariate")

    # Engine order: the factor with most levels first (its block of ZᵀZ stays block-diagonal).
    order = engine_order([len(blocks[g]["levels"]) for g in groups])
    factors = []
    for k in order:
        b = blocks[groups[k]]
        factors.append(FactorBlock(group=groups[k], codes=b["codes"], n_levels=len(b["levels"]),
                                   Z=np.column_stack(b["cols"]), colnames=tuple(b["names"]),
                                   levels=b["levels"]))
    index = {groups[k]: i for i, k in enumerate(order)}
    terms, pos = place_terms(index, placed)
    return Design(y=y, X=X, xnames=tuple(xnames), factors=tuple(factors), terms=terms,
                  n_theta=pos, group_summary=_summary(spec, df, known={g: (b["codes"], b["levels"])
                                                                       for g, b in blocks.items()}),
                  n_dropped=n_dropped,
                  omitted=omitted, response=spec.response, rows=rows,
                  fixed_levels=fixed_levels, fixed_basis=basis, fixed_encoder=encoders,
                  column_encoders=column_encoders, fixed_terms=terms_info)


def evaluate_expression(df: pd.DataFrame, expr: str, what: str) -> np.ndarray:
    """The values of a column or an arithmetic expression of columns (``size - incidence``,
    ``log(exposure)``) in every row of ``df`` (NaN where an input is missing)."""
    expr = expr.strip()
    if expr in df.columns:
        s = df[expr]
        if not (pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s)):
            raise DataError(f"{what} {expr!r} must be numeric, not {s.dtype}")
        return s.to_numpy(dtype=float, na_value=np.nan)
    text = re.sub(r"\bnp\.|\bnumpy\.", "", expr)
    try:
        with np.errstate(all="ignore"):
            out = df.eval(text, engine="python")
    except Exception as exc:  # noqa: BLE001 - pandas' errors, named as the model's
        raise DataError(f"{what} {expr!r} cannot be evaluated on the data: {str(exc).splitlines()[0]}") from None
    out = np.asarray(out, dtype=float).reshape(-1)
    if out.shape[0] != len(df):
        out = np.broadcast_to(out, (len(df),)).copy()
    return out
