"""FitResult: the immutable record of a fitted model (built once, never patched)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class FitResult:
    """A fitted linear mixed model (attributes as in the API contract).

    loglik       maximised log likelihood (restricted for REML)
    method       "reml" or "ml"
    nobs         observations used, after dropping incomplete rows
    converged    optimiser met its tolerance and the Hessian is negative definite
    singular     some variance parameter is on its boundary (sd 0, corr ±1)
    fixed        DataFrame: coef, se, z, p, ci_lower, ci_upper; index the term names (with a
                 df method: coef, se, t, df, p, ci_lower, ci_upper from t(df); Kenward-Roger's
                 se is the adjusted one)
    random       DataFrame: group, name, estimate, se, ci_lower, ci_upper
    wald         (chi2, df, p) for all fixed effects but _cons
    lr_vs_linear (stat, df, p, kind)
    groups       DataFrame per grouping level: n_groups, min, mean, max
    theta, beta, sigma   internal estimates (θ in lme4's parameterisation: the relative
                 Cholesky factors, Σ_k = σ² Λ_kΛ_kᵀ; with a residual structure relative to the
                 residual sd of the first variance group, ``sigma``)
    engine, data, params  the likelihood engine that fitted the model
                 (:mod:`jaxmixed.engine.interface`), its data (cross-products or panels) and
                 its parameters at the estimate: ``engine.deviance(params, data, reml)`` is
                 −2 ``loglik``. Post-estimation asks the engine, never which engine it is.
    """

    loglik: float
    method: str
    nobs: int
    converged: bool
    singular: bool
    fixed: pd.DataFrame
    random: pd.DataFrame
    wald: tuple
    lr_vs_linear: tuple
    groups: pd.DataFrame
    theta: np.ndarray
    beta: np.ndarray
    sigma: float
    iterations: tuple  # (restricted) log likelihood at each optimiser iteration
    n_dropped: int
    notes: tuple
    level: float
    variance: bool
    spec: Any = field(repr=False)
    design: Any = field(repr=False)
    engine: Any = field(repr=False)
    data: Any = field(repr=False)
    params: Any = field(repr=False)
    solution: Any = field(repr=False)
    cov_eta: Any = field(repr=False)
    display: dict = field(default_factory=dict, repr=False)
    family: str | None = None  # GLMMs: the family ("binomial", ...); None for linear models
    link: str | None = None
    nagq: int | None = None  # 1: Laplace; > 1: adaptive Gauss-Hermite points per dimension
    cov_params: Any = field(default=None, repr=False)  # GLMMs: Cov of (β, each term's η, s)
    dfmethod: str | None = None  # small-sample df method ("satterthwaite", "kroger", ...) or None
    small: Any = field(default=None, repr=False)  # its inference.smallsample.SmallSample
    f_test: Any = field(default=None, repr=False)  # with a df method: F test of all but _cons

    @property
    def lr_vs_fixed(self) -> tuple:
        """(stat, df, p, kind): LR test against the model without random effects (the linear
        regression, or the GLM of a GLMM)."""
        return self.lr_vs_linear

    @property
    def n_params(self) -> int:
        """Parameters counted by AIC/BIC: fixed effects, variance parameters, residual."""
        return len(self.beta) + len(self.random)

    @property
    def aic(self) -> float:
        return -2.0 * self.loglik + 2.0 * self.n_params

    @property
    def bic(self) -> float:
        return -2.0 * self.loglik + np.log(self.nobs) * self.n_params

    def blups(self, se: bool = False) -> dict:
        """Predicted random effects: {level: DataFrame indexed by group level, one column per
        effect}; ``se=True`` gives their conditional standard errors instead."""
        from jaxmixed.results.predict import blups

        return blups(self, se=se)

    def predict(self, kind: str = "fitted", data=None, conditional: bool = True, *, out=None,
                progress: bool = False):
        """xb, fitted, reffects, reses, residuals or rstandard; for GLMMs eta, mu, xb, reffects,
        reses, pearson, deviance, response; ``conditional=False``: random effects set to 0 (see
        ``jaxmixed.results.predict.predict``). ``data`` may be a streamed source (Parquet files,
        Arrow, polars, Dask): predicted batch by batch, written to the Parquet file ``out`` when
        given (``jaxmixed.results.predict.predict_source``)."""
        from jaxmixed.data.sources import is_source
        from jaxmixed.results.predict import predict, predict_source

        if out is not None or is_source(data):
            return predict_source(self, kind, data, out=out, conditional=conditional, progress=progress)
        return predict(self, kind, data, conditional)

    def icc(self) -> pd.DataFrame:
        """Intraclass correlation per level (``estat icc``)."""
        from jaxmixed.results.estat import icc

        return icc(self)

    def recovariance(self) -> dict:
        """Fitted covariance matrix of each term's random effects (``estat recovariance``)."""
        from jaxmixed.results.estat import recovariance

        return recovariance(self)

    def wcorrelation(self, level: int = 0) -> pd.DataFrame:
        """Marginal within-group correlation of y (``estat wcorrelation``)."""
        from jaxmixed.results.estat import wcorrelation

        return wcorrelation(self, level)

    def bootstrap(self, n: int = 1000, seed: int = 0, level: float | None = None, **kwargs):
        """Parametric bootstrap: simulate ``n`` responses from the fitted model, refit them all
        in one batched program and return percentile intervals for every fixed effect and
        variance component (``jaxmixed.bootstrap.BootstrapResult``; ``level`` defaults to the
        fit's). Reproducible: the same ``seed`` and ``n`` give the same draws. Keyword
        arguments: chunk_size, progress, device (as for ``jm.fit_many``)."""
        from jaxmixed.inference.bootstrap import bootstrap

        return bootstrap(self, n=n, seed=seed, level=level, **kwargs)

    def simulate(self, n: int = 1, seed: int = 0, device=None):
        """``n`` responses simulated from the fitted model (nobs × n; lme4's ``simulate``): new
        random effects and residuals (a GLMM: responses from its family, successes for the
        binomial) on the observations the fit used (``design.rows`` of the data), the
        bootstrap's own draws (the same ``seed`` gives the same columns)."""
        from jaxmixed.inference.bootstrap import simulate

        return simulate(self, n=n, seed=seed, device=device)

    def test(self, which, rhs=0.0):
        """Test of linear hypotheses on the fixed effects (Stata's ``test``/``testparm``): a
        coefficient name, a list of names (each = ``rhs``), or a contrast matrix L (rows × p, or
        one row) with ``Lβ = rhs``. An F test with the fit's df method, else χ²
        (``inference.hypotheses.TestResult``: stat, df1, df2, p, kind)."""
        from jaxmixed.inference.hypotheses import test

        return test(self, which, rhs)

    def lincom(self, L, rhs=0.0) -> pd.DataFrame:
        """Estimate, se, t or z, df, p and CI of a linear combination ℓᵀβ − rhs (Stata's ``lincom``)."""
        from jaxmixed.inference.hypotheses import lincom

        return lincom(self, L, rhs)

    def anova(self, type: int = 3) -> pd.DataFrame:
        """One row per fixed-effects term: numdf, dendf, F, p (type 3: marginal, SAS/lmerTest
        contrasts; type 1: sequential); χ² with dendf = inf when the fit has no df method."""
        from jaxmixed.inference.hypotheses import anova

        return anova(self, type)

    def confint(self, method: str = "wald", level: float | None = None, **kwargs) -> pd.DataFrame:
        """Intervals for every parameter (fixed effects, then the random-effects rows):
        ``"wald"`` (the tables'), ``"profile"`` (profile likelihood, lme4's
        ``confint(method = "profile")``) or ``"bootstrap"`` (parametric, ``n=`` draws)."""
        from jaxmixed.inference.profile import confint

        return confint(self, method, level, **kwargs)

    def estat_df(self, methods=None) -> pd.DataFrame:
        """Degrees of freedom of every fixed effect under each df method (Stata's ``estat df``):
        ``methods`` one name or several of residual, repeated, anova, satterthwaite, kroger;
        default the fit's own method, or every one that applies."""
        from jaxmixed.inference.smallsample import df_table

        return df_table(self, methods)

    def tidy(self) -> pd.DataFrame:
        """One row per parameter with broom.mixed's columns (``jaxmixed.results.tidy.tidy``)."""
        from jaxmixed.results.tidy import tidy

        return tidy(self)

    def glance(self) -> pd.DataFrame:
        """One row: nobs, sigma, loglik, aic, bic, deviance, df_residual, method, converged, singular."""
        from jaxmixed.results.tidy import glance

        return glance(self)

    def vcov(self) -> pd.DataFrame:
        """Covariance of the fixed-effects estimates, labelled by their names."""
        from jaxmixed.results.tidy import vcov

        return vcov(self)

    def to_latex(self) -> str:
        """The coefficient and random-effects tables as LaTeX ``tabular`` environments."""
        from jaxmixed.results.tidy import to_latex

        return to_latex(self)

    def _repr_html_(self) -> str:
        """The Stata-style tables as HTML (what Jupyter shows for a fit)."""
        from jaxmixed.results.tidy import to_html

        return to_html(self)

    def __str__(self) -> str:
        from jaxmixed.results.report import format_result

        return format_result(self)

    def summary(self, **display) -> str:
        """The Stata-style report; display options: log, group, fetable, retable, header, lrtest."""
        from jaxmixed.results.report import format_result

        return format_result(self, **display)
