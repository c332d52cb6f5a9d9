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
    V = None
    if se:  # (a GLMM's solution holds them, computed with its Hessian)
        V = getattr(result.solution, "V", None) or \
            result.engine.conditional_variances(result.params, result.sigma, result.data, des)
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


GLMM_KINDS = ("eta", "mu", "xb", "fitted", "reffects", "reses", "pearson", "deviance", "response")


def predict(result, kind: str = "fitted", data: pd.DataFrame | None = None, conditional: bool = True,
            unseen: list | None = None):
    """Stata's predict: xb, fitted (xb + Zb), reffects, reses, residuals, rstandard.

    For a GLMM (``result.family`` set): ``eta`` (the linear predictor, offset included), ``mu``
    (the conditional mean of the response: a probability, a rate times exposure, ...; ``fitted``
    is the same), ``xb`` (fixed part only, without the offset), ``reffects`` / ``reses`` (the
    conditional modes of the random effects and their conditional standard errors: the inverse
    curvature at the mode, as lme4's condVar and Stata's reses), ``pearson`` and ``deviance``
    residuals (of the response as counted: successes out of trials for the binomial), and
    ``response``. ``conditional=False`` sets the random effects to zero (lme4's
    ``re.form = NA``, Stata's ``conditional(fixedonly)``).

    ``data``: new rows; levels not seen in the fit get zero random effects (and missing reses),
    with a warning that says how many rows that concerned. Returns a Series (xb, fitted,
    residuals, rstandard) or a DataFrame with one column per random effect (reffects, reses),
    indexed like the rows used. ``unseen``: a list that receives the number of unseen levels'
    rows instead of the warning.
    """
    if getattr(result, "family", None) is not None:
        return _predict_glmm(result, kind, data, conditional)
    if not conditional and kind == "fitted":
        kind = "xb"
    if kind not in KINDS:
        raise DataError(f"predict kind must be one of {', '.join(KINDS)}, not {kind!r}")
    des = result.design
    spec = result.spec
    if data is None:
        X, y, index = des.X, des.y, des.rows
        df = None
    else:
        df, index = _new_rows(result, data, with_response=kind in ("residuals", "rstandard"))
        X = fixed_matrix(spec, des.schema, df)
        resp = set(spec.options.get("response_variables", (spec.response,)))
        y = response_values(spec, des, df) if resp <= set(df.columns) else None
    xb = X @ result.beta
    if kind == "xb":
        return pd.Series(xb, index=index, name="xb")
    rows = _effect_rows(result, df, unseen)
    if kind in ("reffects", "reses"):
        return _effects_frame(result, rows, kind, index)
    fitted = xb + _random_part(result, rows)
    if kind == "fitted":
        return pd.Series(fitted, index=index, name="fitted")
    if y is None:
        raise DataError(f"predict(kind={kind!r}) needs the response {spec.response!r} in the data")
    resid = y - fitted
    if kind == "residuals":
        return pd.Series(resid, index=index, name="residuals")
    return pd.Series(resid / result.sigma, index=index, name="rstandard")


def _new_rows(result, data: pd.DataFrame, with_response: bool):
    """(frame, index) of the new rows complete in every variable the model reads (its response
    only ``with_response``; never the columns a fit adds for itself: weights, trials, offset)."""
    spec = result.spec
    resp = set(spec.options.get("response_variables", (spec.response,)))
    aux = set(spec.options.get("aux_variables", ()))
    need = [v for v in model_variables(spec, data.columns) if v not in aux and (v not in resp or with_response)]
    missing = [v for v in need if v not in data.columns]
    if missing:
        raise DataError(f"new data lack column(s) {', '.join(map(repr, missing))}")
    ok = data[need].notna().all(axis=1).to_numpy()
    return data.loc[ok, need].reset_index(drop=True), np.flatnonzero(ok)


def _effect_rows(result, df, unseen: list | None = None):
    """:func:`_row_effects`, warning once about levels not seen in the fit (or their count
    appended to ``unseen``)."""
    rows, n_unseen = _row_effects(result, df)
    if unseen is not None:
        unseen.append(n_unseen)
    elif n_unseen:
        warnings.warn(f"{n_unseen} row-level group memberships are levels not seen in the fit; "
                      "their random effects are set to 0", JaxmixedWarning, stacklevel=4)
    return rows


def _random_part(result, rows) -> np.ndarray:
    """Σ_f z_fᵢᵀ b_f[level of row i] (0 for unseen levels)."""
    zb = np.zeros(len(rows[0][0]))
    for k, (codes, Z) in enumerate(rows):
        bk = np.asarray(result.solution.b[k])
        zb += np.where(codes >= 0, np.sum(Z * bk[np.maximum(codes, 0)], axis=1), 0.0)
    return zb


def _effects_frame(result, rows, kind: str, index) -> pd.DataFrame:
    """reffects / reses per row, one column per random effect ("level: name")."""
    tables = blups(result, se=(kind == "reses"))
    cols = {}
    for k, (codes, _) in enumerate(rows):
        key = list(tables)[k]
        t = tables[key].to_numpy()
        for j, name in enumerate(tables[key].columns):
            cols[f"{key}: {name}"] = np.where(codes >= 0, t[np.maximum(codes, 0), j],
                                              0.0 if kind == "reffects" else np.nan)
    return pd.DataFrame(cols, index=index)


def _predict_glmm(result, kind: str, data, conditional: bool):
    """A GLMM's predictions (see :func:`predict`): on the fitted rows every kind; on new rows
    xb, eta and mu, the offset re-evaluated from the fit's offset expressions."""
    from jaxmixed.data.design import evaluate_expression
    from jaxmixed.model.family import family_of, inverse_link

    if kind not in GLMM_KINDS:
        raise DataError(f"predict kind for a GLMM must be one of {', '.join(GLMM_KINDS)}, not {kind!r}")
    des, arrays = result.design, result.data
    if data is None:
        X, index, df = des.X, des.rows, None
        offset = np.asarray(arrays.offset)
    else:
        if kind not in ("xb", "eta", "mu", "fitted"):
            raise DataError(f"predict on new data for a GLMM gives xb, eta or mu, not {kind!r}")
        exprs = result.display.get("offset_exprs", ())
        if exprs is None:
            raise DataError("this GLMM's offset was given as an array: predict on new data needs it as a "
                            "column name or an offset(...) term")
        df, index = _new_rows(result, data, with_response=False)
        X = fixed_matrix(result.spec, des.schema, df)
        offset = np.zeros(len(df))
        for expr in exprs:
            offset = offset + evaluate_expression(data.loc[index].reset_index(drop=True), expr, "offset")
    xb = X @ result.beta
    if kind == "xb":
        return pd.Series(xb, index=index, name="xb")
    rows = _effect_rows(result, df)
    if kind in ("reffects", "reses"):
        return _effects_frame(result, rows, kind, index)
    eta = xb + offset + (_random_part(result, rows) if conditional else 0.0)
    if kind == "eta":
        return pd.Series(eta, index=index, name="eta")
    mu = inverse_link(result.link, eta, np)
    if kind in ("mu", "fitted"):
        return pd.Series(mu, index=index, name="mu")
    y, m, pw = (np.asarray(a) for a in (arrays.y, arrays.m, arrays.pw))
    if kind == "response":
        return pd.Series(y, index=index, name="response")
    fam = family_of(result.family)
    s = float(result.params[-1]) if fam.has_scale else 0.0
    mean = m * mu
    if kind == "pearson":
        var = m * fam.variance(mu, s, np) / pw
        return pd.Series((y - mean) / np.sqrt(var), index=index, name="pearson")
    d = fam.unit_deviance(y, mu, m, s) * pw
    return pd.Series(np.sign(y - mean) * np.sqrt(np.maximum(d, 0.0)), index=index, name="deviance")


def predict_source(result, kind: str, source, *, out=None, conditional: bool = True, progress: bool = False):
    """:func:`predict` on a streamed source (:func:`jaxmixed.data.sources.open_source`), one
    record batch at a time. With ``out`` (a path) the predictions are written to that Parquet
    file batch by batch, with a ``row`` column (the row's position in the source; incomplete
    rows have no prediction, as in memory), and the path is returned; without it, the
    predictions come back as one Series/DataFrame indexed by that position. Memory: one batch."""
    from jaxmixed.data.sources import open_source

    if getattr(result, "family", None) is not None:
        raise DataError("predictions for a GLMM on a streamed source are not supported: read the rows with pandas")
    src = open_source(source)
    spec = result.spec
    resp = set(spec.options.get("response_variables", (spec.response,)))
    aux = set(spec.options.get("aux_variables", ()))
    with_response = kind in ("residuals", "rstandard")
    need = [v for v in model_variables(spec, src.columns) if v not in aux and (v not in resp or with_response)]
    src.check_columns(need)
    writer, parts, offset, unseen = None, [], 0, []
    try:
        for frame in src.batches(need, progress=progress, desc="predict"):
            pred = predict(result, kind, frame, conditional, unseen=unseen)
            pred.index = pred.index + offset
            offset += len(frame)
            if out is None:
                parts.append(pred)
                continue
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pd.DataFrame(pred).rename_axis("row").reset_index()
            table = pa.Table.from_pandas(table, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(out, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    if sum(unseen):
        warnings.warn(f"{sum(unseen)} row-level group memberships are levels not seen in the fit; "
                      "their random effects are set to 0", JaxmixedWarning, stacklevel=3)
    if out is not None:
        if writer is None:
            raise DataError("the source has no rows to predict")
        return out
    return pd.concat(parts) if parts else pd.Series([], dtype=float, name=kind)
