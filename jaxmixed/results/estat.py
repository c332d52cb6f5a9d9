"""Post-estimation statistics (Stata's ``estat``): icc, recovariance, wcorrelation."""

from __future__ import annotations

import numpy as np
import pandas as pd

from jaxmixed.errors import ModelError
from jaxmixed.data.design import outer_factor
from jaxmixed.model.spec import CONS


def recovariance(result) -> dict:
    """{"level: Structure" or label: DataFrame Σ_k} — the fitted covariance of each term's effects."""
    out = {}
    covs = result.engine.term_covariances(result.params, result.sigma)
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
    Only defined for models whose random effects are all intercepts. For a GLMM the residual
    variance is that of the latent response: π²/3 for the logit link, 1 for the probit
    (Stata's ``estat icc`` after melogit / meprobit); other families have no ICC.
    """
    terms = result.design.terms
    family = getattr(result, "family", None)
    if family is not None:
        latent = {"logit": np.pi**2 / 3.0, "probit": 1.0}.get(result.link) if family == "binomial" else None
        if latent is None:
            raise ModelError(f"icc() is defined for binary or binomial responses with the logit or probit link "
                             f"(a latent residual variance), not for the {family} family with the {result.link} link")
    else:
        latent = result.sigma**2
    if any(tb.term.columns != (CONS,) for tb in terms):
        raise ModelError("estat icc is defined for random-intercept models only (this model has random slopes)")
    var = {}
    for tb, S in zip(terms, recovariance(result).values()):
        var[tb.term.group] = float(S.iloc[0, 0])
    total = sum(var.values()) + latent
    rows = []
    for tb in terms:
        g = tb.term.group
        # the variances of this level and every level it is nested in (its group's prefixes)
        num = sum(v for h, v in var.items() if h == g[:len(h)])
        rows.append((tb.term.label, num / total))
    return pd.DataFrame(rows, columns=["level", "icc"]).set_index("level")


def wcorrelation(result, level: int = 0) -> pd.DataFrame:
    """Marginal correlation matrix of y within one top-level group (Stata's ``estat wcorrelation``).

    V = Σ_k Z_k G_k Z_kᵀ + R over the rows of that group, from the fit's engine (R = σ²I, or the
    residual structure's); the correlation is D^{-1/2} V D^{-1/2}.
    ``level`` picks the group by its position in the outermost factor's levels (0: the first).
    """
    des = result.design
    if getattr(result, "family", None) is not None:
        raise ModelError("wcorrelation is defined for linear mixed models; a GLMM's marginal correlation "
                         "depends on the means (it has no closed form)")
    fac = des.factors[outer_factor(des)]
    if not 0 <= level < fac.n_levels:
        raise ModelError(f"level must be between 0 and {fac.n_levels - 1}")
    V, rows = result.engine.marginal_covariance(result.params, result.sigma, result.data, des, level)
    d = np.sqrt(np.diag(V))
    idx = pd.Index(des.rows[rows], name="obs")
    return pd.DataFrame(V / np.outer(d, d), index=idx, columns=idx)
