"""From a ModelSpec and a DataFrame to arrays: y, X, and one block per grouping factor.

Rows with a missing value in any variable the model reads are dropped and counted (Stata's rule).
Random-effects terms that share a grouping factor are merged into one *factor block* whose Λ is
block-diagonal over its terms (Stata's repeated equations at one level, lme4's ``(x||g)``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import covariance
from .errors import DataError, ModelError
from .terms import CONS, ModelSpec, RandomTerm


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


@dataclass(frozen=True)
class Design:
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

    @property
    def nobs(self) -> int:
        return self.y.shape[0]

    @property
    def p(self) -> int:
        return self.X.shape[1]

    @property
    def theta_lower(self) -> np.ndarray:
        return np.concatenate([t.structure.lower for t in self.terms])

    @property
    def theta0(self) -> np.ndarray:
        return np.concatenate([t.structure.theta0 for t in self.terms])


def _check_columns(spec: ModelSpec, data: pd.DataFrame):
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame, not {type(data).__name__}")
    for v in spec.variables:
        if v not in data.columns:
            close = difflib.get_close_matches(v, [str(c) for c in data.columns], n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise DataError(f"variable {v!r} is not a column of the data{hint}")


def _is_numeric(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)


def _numeric(s: pd.Series, what: str) -> np.ndarray:
    if pd.api.types.is_bool_dtype(s):
        return s.to_numpy(dtype=float)
    if not pd.api.types.is_numeric_dtype(s):
        raise DataError(f"{what} {s.name!r} is not numeric (dtype {s.dtype})")
    x = s.to_numpy(dtype=float)
    if not np.all(np.isfinite(x)):
        bad = int(np.sum(~np.isfinite(x)))
        raise DataError(f"{what} {s.name!r} has {bad} infinite value(s)")
    return x


def _fixed_columns(spec: ModelSpec, df: pd.DataFrame, known: dict | None = None):
    """Columns of X with their names: each term is the product of its factors' columns.

    ``known`` maps a categorical variable to the levels seen when the model was fitted, so that
    new data get the same dummy columns; the levels used are returned for that purpose.
    """
    stata = spec.syntax == "stata"
    used_levels: dict = {}
    cols: list[np.ndarray] = []
    names: list[str] = []
    for term in spec.fixed:
        parts: list[list[tuple[str, np.ndarray]]] = []
        for f in term.factors:
            s = df[f.var]
            categorical = f.categorical if f.categorical is not None else not _is_numeric(s)
            if not categorical:
                parts.append([(f"c.{f.var}" if stata and len(term.factors) > 1 else f.var,
                               _numeric(s, "variable"))])
                continue
            if known is not None and f.var in known:
                levels = known[f.var]
            else:
                levels = pd.unique(s)
                try:
                    levels = np.sort(levels)
                except TypeError:
                    levels = np.array(sorted(levels, key=str), dtype=object)
            used_levels[f.var] = levels
            base = levels[0]
            if f.base == "last":
                base = levels[-1]
            elif f.base not in (None, "first"):
                match = [lv for lv in levels if lv == f.base or str(lv) == str(f.base)]
                if not match:
                    raise DataError(f"base level {f.base!r} of {f.var!r} does not occur in the data")
                base = match[0]
            dummies = []
            for lv in levels:
                if lv == base:
                    continue
                name = f"{lv}.{f.var}" if stata else f"{f.var}[T.{lv}]"
                dummies.append((name, (s == lv).to_numpy(dtype=float)))
            parts.append(dummies)
        combos: list[tuple[str, np.ndarray]] = [("", np.ones(len(df)))]
        for part in parts:
            combos = [((a + ("#" if stata else ":") + b) if a else b, x * z)
                      for a, x in combos for b, z in part]
        for name, x in combos:
            if name not in names:
                names.append(name)
                cols.append(x)
    if spec.intercept:
        names.append(CONS)
        cols.append(np.ones(len(df)))
    X = np.column_stack(cols) if cols else np.zeros((len(df), 0))
    return X, names, used_levels


def fixed_matrix(spec: ModelSpec, design: "Design", df: pd.DataFrame) -> np.ndarray:
    """X for new data, with the fitted model's columns (same dummies, collinear ones omitted)."""
    X, names, _ = _fixed_columns(spec, df, design.fixed_levels)
    return X[:, [names.index(n) for n in design.xnames]]


def _drop_collinear(X: np.ndarray, names: list[str]):
    """Omit columns that are (numerically) linear combinations of earlier ones, as Stata does.

    The constant is checked first so that a covariate, not ``_cons``, is the one omitted.
    """
    order = list(range(X.shape[1]))
    if names and names[-1] == CONS:
        order = [len(names) - 1] + order[:-1]
    keep: list[int] = []
    scale = np.sqrt(np.sum(X**2, axis=0))
    scale[scale == 0] = 1.0
    Xs = X / scale
    for j in order:
        cand = keep + [j]
        if np.linalg.matrix_rank(Xs[:, cand], tol=1e-9 * np.sqrt(X.shape[0])) == len(cand):
            keep.append(j)
    keep_sorted = sorted(keep)
    omitted = tuple(names[j] for j in range(len(names)) if j not in keep)
    return X[:, keep_sorted], [names[j] for j in keep_sorted], omitted


def _group_codes(df: pd.DataFrame, group: tuple[str, ...]):
    if not group:
        return np.zeros(len(df), dtype=np.int64), pd.Index(["_all"])
    keys = df[list(group)]
    codes, uniques = pd.MultiIndex.from_frame(keys).factorize(sort=True)
    if len(group) == 1:
        uniques = pd.Index([u[0] for u in uniques], name=group[0])
    return codes.astype(np.int64), uniques


def _summary(spec: ModelSpec, df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for lev in spec.levels:
        codes, uniques = _group_codes(df, lev.group)
        counts = np.bincount(codes, minlength=len(uniques))
        rows.append((lev.label, len(uniques), int(counts.min()), float(counts.mean()), int(counts.max())))
    out = pd.DataFrame(rows, columns=["level", "n_groups", "min", "mean", "max"]).set_index("level")
    return out


def build_design(spec: ModelSpec, data: pd.DataFrame) -> Design:
    """Turn a model description and a data frame into the arrays the engine needs."""
    _check_columns(spec, data)
    if not spec.random:
        raise ModelError("the model has no random-effects term; add one such as (1|g) or || g:")
    used = data[spec.variables]
    complete = used.notna().all(axis=1).to_numpy()
    n_dropped = int((~complete).sum())
    for v in spec.variables:
        if data[v].isna().all():
            raise DataError(f"variable {v!r} is missing in every row")
    if not complete.any():
        raise DataError("no observations left after dropping rows with missing values")
    rows = np.flatnonzero(complete)
    df = used.iloc[rows].reset_index(drop=True)

    y = _numeric(df[spec.response], "response")
    X, xnames, fixed_levels = _fixed_columns(spec, df)
    X, xnames, omitted = _drop_collinear(X, xnames)

    # One factor block per distinct grouping; terms sharing it are concatenated in spec order.
    groups: list[tuple[str, ...]] = []
    for t in spec.random:
        if t.group not in groups:
            groups.append(t.group)
    blocks: dict[tuple[str, ...], dict] = {}
    for g in groups:
        codes, levels = _group_codes(df, g)
        if len(levels) < 2:
            what = "_all (one group)" if not g else ":".join(g)
            raise DataError(
                f"grouping {what!r} has {len(levels)} level(s): a variance needs at least two groups")
        blocks[g] = dict(codes=codes, levels=levels, cols=[], names=[])
    placed = []
    for t in spec.random:
        b = blocks[t.group]
        start = len(b["names"])
        for c in t.columns:
            b["cols"].append(np.ones(len(df)) if c == CONS else _numeric(df[c], "random-effects covariate"))
            b["names"].append(c)
        placed.append((t, start, len(b["names"])))

    # Engine order: the factor with most levels first (its block of ZᵀZ stays block-diagonal).
    order = sorted(range(len(groups)), key=lambda k: (-len(blocks[groups[k]]["levels"]), k))
    factors = []
    for k in order:
        b = blocks[groups[k]]
        factors.append(FactorBlock(group=groups[k], codes=b["codes"], n_levels=len(b["levels"]),
                                   Z=np.column_stack(b["cols"]), colnames=tuple(b["names"]),
                                   levels=b["levels"]))
    index = {groups[k]: i for i, k in enumerate(order)}
    terms = []
    pos = 0
    for t, start, stop in placed:
        s = covariance.make(t.cov, t.q)
        terms.append(TermBlock(term=t, structure=s, factor=index[t.group], cols=(start, stop),
                               theta=(pos, pos + s.n_theta)))
        pos += s.n_theta
    if spec.syntax and len(y) <= X.shape[1]:
        raise DataError(f"{len(y)} observations for {X.shape[1]} fixed effects: too few observations")
    return Design(y=y, X=X, xnames=tuple(xnames), factors=tuple(factors), terms=tuple(terms),
                  n_theta=pos, group_summary=_summary(spec, df), n_dropped=n_dropped,
                  omitted=omitted, response=spec.response, rows=rows,
                  fixed_levels=fixed_levels)
