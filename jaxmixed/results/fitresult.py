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
    fixed        DataFrame: coef, se, z, p, ci_lower, ci_upper; index the term names
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

    def predict(self, kind: str = "fitted", data: pd.DataFrame | None = None, conditional: bool = True):
        """xb, fitted, reffects, reses, residuals or rstandard; for GLMMs eta, mu, xb, reffects,
        reses, pearson, deviance, response; ``conditional=False``: random effects set to 0 (see
        ``jaxmixed.results.predict.predict``)."""
        from jaxmixed.results.predict import predict

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
