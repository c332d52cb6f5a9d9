"""Post-estimation statistics (Stata's ``estat``): icc, recovariance, wcorrelation."""

from __future__ import annotations

import numpy as np
import pandas as pd

from jaxmixed.errors import ModelError
from jaxmixed.inference.tables import term_lambdas
from jaxmixed.model.spec import CONS


def recovariance(result) -> dict:
    """{"level: Structure" or label: DataFrame Σ_k} — the fitted covariance of each term's effects."""
    out = {}
    if result.panel is not None:
        covs = result.panel["term_S"]
    else:
        lams = term_lambdas(np.asarray(result.theta), result.structure)
        covs = [result.sigma**2 * np.asarray(lam) @ np.asarray(lam).T for lam in lams]
    for tb, S in zip(result.design.terms, covs):
        names = list(tb.term.display)
        key = tb.term.label
        while key in out:  # repeated equations at one level
            key += "'"
        out[key] = pd.DataFrame(S, index=names, columns=names)
    return out


def icc(result) -> pd.DataFrame:
    """Intraclass correlations per level, as Stata's ``estat icc`` reports them.

    For nested random intercepts at levels 1..K (outermost first), the ICC at level k is the
    correlation of two observations in the same level-k group:
        ρ_k = Σ_{j≤k} σ²_j / (Σ_j σ²_j + σ²_ε).
    Crossed intercepts: ρ for the term alone, σ²_k / (Σ σ² + σ²_ε).
    Only defined for models whose random effects are all intercepts.
    """
    terms = result.design.terms
    if any(tb.term.columns != (CONS,) for tb in terms):
        raise ModelError("estat icc is defined for random-intercept models only (this model has random slopes)")
    var = {}
    for tb, S in zip(terms, recovariance(result).values()):
        var[tb.term.group] = float(S.iloc[0, 0])
    total = sum(var.values()) + result.sigma**2
    rows = []
    for tb in terms:
        g = tb.term.group
        # the variances of this level and every level it is nested in (its group's prefixes)
        num = sum(v for h, v in var.items() if h == g[:len(h)])
        rows.append((tb.term.label, num / total))
    return pd.DataFrame(rows, columns=["level", "icc"]).set_index("level")


def wcorrelation(result, level: int = 0) -> pd.DataFrame:
    """Marginal correlation matrix of y within one top-level group (Stata's ``estat wcorrelation``).

    V = Σ_k Z_k G_k Z_kᵀ + σ²I over the rows of that group; the correlation is D^{-1/2} V D^{-1/2}.
    ``level`` picks the group by its position in the outermost factor's levels (0: the first).
    """
    if result.panel is not None:
        from jaxmixed.engine.marginal import wcorrelation as panel_wcorrelation

        return panel_wcorrelation(result, level)
    des = result.design
    outer = min(range(len(des.factors)), key=lambda k: (len(des.factors[k].group), des.factors[k].n_levels))
    fac = des.factors[outer]
    if not 0 <= level < fac.n_levels:
        raise ModelError(f"level must be between 0 and {fac.n_levels - 1}")
    rows = np.flatnonzero(fac.codes == level)
    V = np.eye(len(rows)) * result.sigma**2
    covs = list(recovariance(result).values())
    for tb, S in zip(des.terms, covs):
        f = des.factors[tb.factor]
        Z = f.Z[rows, tb.cols[0]:tb.cols[1]]
        codes = f.codes[rows]
        same = codes[:, None] == codes[None, :]
        V += same * (Z @ S.to_numpy() @ Z.T)
    d = np.sqrt(np.diag(V))
    idx = pd.Index(des.rows[rows], name="obs")
    return pd.DataFrame(V / np.outer(d, d), index=idx, columns=idx)
