"""Likelihood-ratio tests between nested fits (Stata's ``lrtest``, lme4's ``anova``)."""

from __future__ import annotations

from jaxmixed.inference import distributions as sps
from jaxmixed.errors import ModelError


class LRTest(tuple):
    """(stat, df, p) with a ``note`` attribute (boundary and REML caveats)."""

    def __new__(cls, stat: float, df: int, p: float, note: str = ""):
        obj = super().__new__(cls, (stat, df, p))
        obj.note = note
        return obj

    stat = property(lambda self: self[0])
    df = property(lambda self: self[1])
    p = property(lambda self: self[2])

    def __repr__(self):
        return f"LRTest(stat={self[0]:.4f}, df={self[1]}, p={self[2]:.4g}{', note=' + repr(self.note) if self.note else ''})"


def lrtest(a, b) -> LRTest:
    """LR test of the smaller of two nested fits against the larger: 2(ℓ_big − ℓ_small) ~ χ²(Δk).

    Refuses fits by different criteria, on different observations, or REML fits whose fixed
    effects differ (their restricted likelihoods are of different data). When the models differ
    in variance parameters the null is on the boundary and the test is conservative (noted).
    """
    fa, fb = getattr(a, "family", None), getattr(b, "family", None)
    if (fa, getattr(a, "link", None)) != (fb, getattr(b, "link", None)):
        raise ModelError(f"lrtest: the models have different families or links ({fa or 'linear'}, "
                         f"{fb or 'linear'}); their likelihoods are of different models of the data")
    if fa is not None and (a.method, a.nagq) != (b.method, b.nagq):
        raise ModelError(f"lrtest: the GLMMs use different integration methods (nagq {a.nagq} and {b.nagq}); "
                         "refit both the same way")
    if a.method != b.method:
        raise ModelError("lrtest: one model was fitted by ML and the other by REML")
    if a.nobs != b.nobs:
        raise ModelError(f"lrtest: the models use different observations ({a.nobs} vs {b.nobs})")
    if a.method == "reml" and list(a.fixed.index) != list(b.fixed.index):
        raise ModelError("lrtest: REML fits with different fixed effects cannot be compared "
                         "(refit both with method='ml')")
    small, big = (a, b) if a.n_params <= b.n_params else (b, a)
    df = big.n_params - small.n_params
    if df == 0:
        raise ModelError("lrtest: the models have the same number of parameters; they are not nested")
    stat = max(0.0, 2.0 * (big.loglik - small.loglik))
    p = float(sps.chi2.sf(stat, df))
    note = ""
    if len(big.random) != len(small.random):
        note = ("the null hypothesis puts a variance on the boundary of the parameter space; "
                "the reported test is conservative")
    return LRTest(stat, df, p, note)
