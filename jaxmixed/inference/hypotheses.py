"""Tests of linear hypotheses on the fixed effects: ``r.test`` (Stata's ``test``/``testparm``),
``r.lincom`` and ``r.anova`` (per model term, type 1 sequential or type 3 marginal).

With a df method (:mod:`jaxmixed.inference.smallsample`) a test is an F test with that method's
denominator df (Kenward-Roger: pbkrtest's scaled F); without, a Wald χ² test (df2 = inf).
Type 3 contrasts follow lmerTest (SAS's type III): the overparameterised design's columns
expressed in X's columns, each term's contrasts orthogonalised against the terms that contain
it (same numeric variables, more factors); type 1 contrasts are the rows of the Cholesky factor
of XᵀX (intercept first, terms by degree, as R orders them).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from jaxmixed.errors import ModelError
from jaxmixed.inference import distributions as sps
from jaxmixed.inference.smallsample import TestResult, reduce_rows
from jaxmixed.inference.tables import wald_statistic


def _names(r) -> list[str]:
    return list(r.fixed.index)


def contrast_matrix(r, which) -> np.ndarray:
    """L (rows × p) from a coefficient name, a list of names or a matrix/vector."""
    names = _names(r)
    p = len(names)
    if isinstance(which, str) or (isinstance(which, (list, tuple)) and which and all(isinstance(w, str) for w in which)):
        items = [which] if isinstance(which, str) else list(which)
        L = np.zeros((len(items), p))
        for i, w in enumerate(items):
            if w not in names:
                close = [n for n in names if w.lower() in n.lower()]
                hint = f"; did you mean {close[0]!r}?" if close else f"; the coefficients are {', '.join(names)}"
                raise ModelError(f"{w!r} is not a fixed-effect coefficient{hint}")
            L[i, names.index(w)] = 1.0
        return L
    L = np.atleast_2d(np.asarray(which, dtype=float))
    if L.ndim != 2 or L.shape[1] != p:
        raise ModelError(f"a contrast matrix needs {p} columns (one per fixed effect: {', '.join(names)}), "
                         f"not shape {np.shape(which)}")
    if not np.all(np.isfinite(L)):
        raise ModelError("the contrast matrix has non-finite entries")
    return L


def _vcov(r) -> np.ndarray:
    return np.asarray(r.small.vcov if r.small is not None else r.solution.cov_beta, dtype=float)


def test(r, which, rhs=0.0) -> TestResult:
    """F (with the fit's df method) or χ² test of Lβ = rhs."""
    if r.family is not None and r.small is not None:
        raise ModelError("df methods are for linear mixed models")
    L, rhs = reduce_rows(contrast_matrix(r, which), rhs)
    beta = np.asarray(r.beta, dtype=float)
    if r.small is not None:
        return r.small.test(beta, L, rhs)
    chi2 = wald_statistic(L, beta, r.solution.cov_beta, rhs)
    q = L.shape[0]
    return TestResult(chi2, q, float("inf"), float(sps.chi2.sf(chi2, q)), "chi2")


def lincom(r, ell, rhs=0.0) -> pd.DataFrame:
    """ℓᵀβ − rhs with its se, t (or z), df, p and CI at the fit's level."""
    L = contrast_matrix(r, ell)
    if L.shape[0] != 1:
        raise ModelError("lincom takes one linear combination (one row); use test() for several")
    ell = L[0]
    est = float(ell @ np.asarray(r.beta) - rhs)
    se = float(np.sqrt(ell @ _vcov(r) @ ell))
    df = r.small.contrast_df(ell) if r.small is not None else float("inf")
    stat = est / se
    q = float(sps.t.ppf(0.5 + r.level / 200.0, df))
    return pd.DataFrame({"estimate": [est], "se": [se], ("t" if r.small is not None else "z"): [stat], "df": [df],
                         "p": [float(2 * sps.t.sf(abs(stat), df))], "ci_lower": [est - q * se],
                         "ci_upper": [est + q * se]})


def _zapsmall(x, digits: int = 7):
    """R's zapsmall: round to ``digits`` significant digits of the largest entry."""
    x = np.asarray(x, dtype=float)
    mx = np.max(np.abs(x)) if x.size else 0.0
    d = digits if mx <= 0 else max(0, digits - int(np.ceil(np.log10(mx))))
    return np.round(x, d)


def _r_term_order(ft) -> list[int]:
    """R's order of the terms: by degree (number of variables), then as written."""
    return sorted(range(len(ft.labels)), key=lambda k: (len(ft.variables[k]), k))


def _contained_in(ft, k) -> list[int]:
    """Terms that contain term k (lmerTest: all its variables and more, the same numeric ones)."""
    return [j for j in range(len(ft.labels)) if j != k and ft.variables[k] < ft.variables[j]
            and ft.numerics[k] == ft.numerics[j]]


def type3_contrasts(r) -> dict:
    ft = r.design.fixed_terms
    p = len(_names(r))
    if len(ft.labels) <= 1 or p <= 1:
        return type1_contrasts(r)
    if ft.rd_basis is None:
        raise ModelError("the type III table needs the model's overparameterised design, too large for these data "
                         "(rows × all factor-level columns > 5e7); use anova(type=1) or r.test() with the coefficients")
    Lf = _zapsmall(ft.rd_basis)  # (r × p): rows the all-levels columns, columns X's
    order = sorted(range(len(ft.labels)), key=lambda k: -len(ft.variables[k]))  # higher order first (stable)
    for k in order:
        cont = _contained_in(ft, k)
        if not cont:
            continue
        Xc = Lf[:, [c for j in cont for c in ft.columns[j]]]
        Y = Lf[:, list(ft.columns[k])]
        coef = np.linalg.lstsq(Xc, Y, rcond=None)[0]
        Lf[:, list(ft.columns[k])] = _zapsmall(Y - Xc @ coef)
    rows = [ft.rd_keys.index(key) for key in ft.x_keys]
    L = Lf[rows, :]  # (p × p): rows the model's coefficients
    out = {}
    for k, label in enumerate(ft.labels):
        C = L[:, list(ft.columns[k])].T
        out[label] = C[np.sum(np.abs(C), axis=1) > 1e-8]
    return out


def type1_contrasts(r) -> dict:
    ft = r.design.fixed_terms
    names = _names(r)
    G = np.asarray(r.design.xtx, dtype=float)  # XᵀX
    order = [names.index("_cons")] if "_cons" in names else []
    terms = _r_term_order(ft)
    for k in terms:
        order += list(ft.columns[k])
    Rt = np.linalg.cholesky(G[np.ix_(order, order)]).T  # upper: the Doolittle rows up to their scale
    Rt = Rt / np.diag(Rt)[:, None]
    out = {}
    pos = 1 if "_cons" in names else 0
    for k in terms:
        m = len(ft.columns[k])
        rows = np.zeros((m, len(names)))
        rows[:, order] = Rt[pos:pos + m]
        out[ft.labels[k]] = rows
        pos += m
    return {label: out[label] for label in ft.labels}


def anova(r, type: int = 3) -> pd.DataFrame:
    """Per term: numdf, dendf, F, p (with a df method; lmerTest's ``anova``), or chi2, df, p."""
    if r.family is not None:
        raise ModelError("anova() tables are for linear mixed models; use test() or lrtest for a GLMM")
    if r.design.fixed_terms is None:
        raise ModelError("anova() needs the fixed part's terms; a fixed part written with formula expressions "
                         "(I(), poly(), ...) has none here: use r.test() with the coefficient names")
    if type in (3, "3", "III", "iii"):
        contrasts = type3_contrasts(r)
    elif type in (1, "1", "I", "i"):
        contrasts = type1_contrasts(r)
    else:
        raise ModelError(f"anova type must be 1 or 3, not {type!r}")
    rows = []
    sigma2 = float(r.sigma) ** 2
    for label, L in contrasts.items():
        res = test(r, L, 0.0)
        if res.kind == "F":
            rows.append({"term": label, "sum_sq": res.stat * sigma2 * res.df1, "mean_sq": res.stat * sigma2,
                         "numdf": res.df1, "dendf": res.df2, "F": res.stat, "p": res.p})
        else:
            rows.append({"term": label, "chi2": res.stat, "df": res.df1, "p": res.p})
    cols = ["sum_sq", "mean_sq", "numdf", "dendf", "F", "p"] if r.small is not None else ["chi2", "df", "p"]
    return pd.DataFrame(rows, columns=["term"] + cols).set_index("term")
