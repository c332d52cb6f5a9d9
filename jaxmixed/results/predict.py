"""BLUPs, their conditional standard errors, and predictions (Stata's ``predict`` after ``mixed``).

The conditional covariances of the random effects given y (lme4's ``condVar``, Stata's
``reses``) come from the fit's engine (``engine.conditional_variances``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from jaxmixed.data.design import _group_codes, _numeric, fixed_matrix, model_variables, random_column, response_values
from jaxmixed.errors import DataError, JaxmixedWarning

KINDS = ("xb", "fitted", "reffects", "reses", "residuals", "rstandard")


def blup_key(factor_group, terms) -> str:
    """Name of a factor's BLUP table: the level label (``school``, ``state``); for factor
    notation at ``_all`` (``_all: R.id``) the variable (``id``)."""
    labels = [t.term.label for t in terms]
    label = labels[0]
    return ":".join(factor_group) if label == "_all" else label


def blups(result, se: bool = False) -> dict:
    """{level: DataFrame indexed by group level, one column per random effect}."""
    des = result.design
    b = result.solution.b
    V = result.engine.conditional_variances(result.params, result.sigma, result.data, des) if se else None
    out = {}
    for k, fac in enumerate(des.factors):
        terms = [t for t in des.terms if t.factor == k]
        names = [d for t in terms for d in t.term.display]
        key = blup_key(fac.group, terms)
        if se:
            vals = np.sqrt(np.diagonal(np.asarray(V[k]), axis1=1, axis2=2))
        else:
            vals = np.asarray(b[k])
        out[key] = pd.DataFrame(vals, index=fac.levels, columns=names)
    return out


def _row_effects(result, df: pd.DataFrame | None):
    """For each factor: codes of the rows (−1 for unseen levels) and their Z columns."""
    des = result.design
    rows = []
    n_unseen = 0
    for k, fac in enumerate(des.schema.factors):  # new data need only the schema
        if df is None:
            rows.append((des.factors[k].codes, des.factors[k].Z))
            continue
        codes_new, levels_new = _group_codes(df, fac.group)
        lookup = fac.levels.get_indexer(levels_new)
        codes = lookup[codes_new]
        n_unseen += int(np.sum(codes < 0))
        enc = dict(des.schema.column_encoders or {})  # (read only: a copy)
        Z = np.column_stack([random_column(result.spec, df, c, enc) for c in fac.colnames])
        rows.append((codes, Z))
    return rows, n_unseen


def predict(result, kind: str = "fitted", data: pd.DataFrame | None = None):
    """Stata's predict: xb, fitted (xb + Zb), reffects, reses, residuals, rstandard.

    ``data``: new rows; levels not seen in the fit get zero random effects (and missing reses),
    with a warning that says how many rows that concerned. Returns a Series (xb, fitted,
    residuals, rstandard) or a DataFrame with one column per random effect (reffects, reses),
    indexed like the rows used.
    """
    if kind not in KINDS:
        raise DataError(f"predict kind must be one of {', '.join(KINDS)}, not {kind!r}")
    des = result.design
    spec = result.spec
    if data is None:
        X, y, index = des.X, des.y, des.rows
        df = None
    else:
        resp = set(spec.options.get("response_variables", (spec.response,)))
        need = [v for v in model_variables(spec, data.columns)
                if v not in resp or kind in ("residuals", "rstandard")]
        missing = [v for v in need if v not in data.columns]
        if missing:
            raise DataError(f"new data lack column(s) {', '.join(map(repr, missing))}")
        ok = data[need].notna().all(axis=1).to_numpy()
        df = data.loc[ok, need].reset_index(drop=True)
        index = np.flatnonzero(ok)
        X = fixed_matrix(spec, des.schema, df)
        y = response_values(spec, des, df) if resp <= set(df.columns) else None
    xb = X @ result.beta
    if kind == "xb":
        return pd.Series(xb, index=index, name="xb")
    rows, n_unseen = _row_effects(result, df)
    if n_unseen:
        warnings.warn(f"{n_unseen} row-level group memberships are levels not seen in the fit; "
                      "their random effects are set to 0", JaxmixedWarning, stacklevel=3)
    if kind in ("reffects", "reses"):
        tables = blups(result, se=(kind == "reses"))
        cols = {}
        for k, (codes, _) in enumerate(rows):
            key = list(tables)[k]
            t = tables[key].to_numpy()
            for j, name in enumerate(tables[key].columns):
                vals = np.where(codes >= 0, t[np.maximum(codes, 0), j], 0.0 if kind == "reffects" else np.nan)
                cols[f"{key}: {name}"] = vals
        return pd.DataFrame(cols, index=index)
    zb = np.zeros(len(xb))
    for k, (codes, Z) in enumerate(rows):
        bk = np.asarray(result.solution.b[k])
        zb += np.where(codes >= 0, np.sum(Z * bk[np.maximum(codes, 0)], axis=1), 0.0)
    fitted = xb + zb
    if kind == "fitted":
        return pd.Series(fitted, index=index, name="fitted")
    if y is None:
        raise DataError(f"predict(kind={kind!r}) needs the response {spec.response!r} in the data")
    resid = y - fitted
    if kind == "residuals":
        return pd.Series(resid, index=index, name="residuals")
    return pd.Series(resid / result.sigma, index=index, name="rstandard")
