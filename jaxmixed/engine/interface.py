"""The engine interface: what every likelihood engine offers the fit and post-estimation.

An engine is a frozen, hashable object (a ``jit`` static argument) describing a model's shape;
its methods are pure functions of (params, data), where ``data`` are the engine's arrays
(cross-products, panels) and ``params`` its parameter vector. The fit driver
(:mod:`jaxmixed.api.fit`) optimises ``deviance`` and builds the tables from ``eta``,
``hessian_eta`` and ``residual_rows``; :class:`~jaxmixed.results.fitresult.FitResult` keeps the
engine, its data and its parameters, and everything after the fit asks the engine, never which
engine it is. Implementations: :class:`jaxmixed.engine.pls.PLSEngine` (R = σ²I, the profiled
deviance from cross-products, dense or blocked-sparse layout) and
:class:`jaxmixed.engine.gls_panels.MarginalEngine` (residual structures, marginal GLS per panel).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Engine(Protocol):
    name: str  # "pls", "marginal", ...
    quasi_newton: bool  # Hessians too costly for the optimiser (gradients only)
    supports_batched: bool  # fit_many / the bootstrap can refit it in batches
    residual_title: str | None  # the report's residual block title ("AR(1)"), None for σ²I

    @property
    def n_params(self) -> int: ...

    @property
    def n_variance_params(self) -> int:
        """Variance parameters the LR test against the linear model counts."""

    def deviance(self, params, data, reml):
        """−2ℓ (restricted for REML) with β (and, where possible, σ) profiled out; pure JAX."""

    def solve(self, params, data, reml):
        """β̂, σ̂, Var(β̂) and the BLUPs b per factor at ``params`` (a ``pls.Solution``)."""

    def eta(self, params, sigma, theta_scale, lams=None) -> np.ndarray:
        """The reporting metric: each term's (ln sd, atanh corr), then the residual parameters."""

    def hessian_eta(self, eta, data, reml):
        """∇²_η of the (restricted) log likelihood, for standard errors."""

    def residual_rows(self, variance: bool) -> list[tuple[str, str]]:
        """(name, kind) of the η entries after the terms' (kind sd, corr, free, logit)."""

    def singular(self, params, theta_scale) -> bool:
        """A boundary fit (a variance 0, a correlation ±1)."""

    def theta(self, params, sigma) -> np.ndarray:
        """θ in lme4's parameterisation (relative to ``sigma``)."""

    def term_covariances(self, params, sigma) -> list[np.ndarray]:
        """Σ_k of each random-effects term."""

    def conditional_variances(self, params, sigma, data, design) -> list[np.ndarray]:
        """Per factor (L_f, q_f, q_f): Var(b | y) at the estimates."""

    def marginal_covariance(self, params, sigma, data, design, level: int):
        """(V, rows): the marginal covariance of the rows of one panel and their positions."""
