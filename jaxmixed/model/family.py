"""Response distributions (families) and link functions of generalized linear mixed models.

A :class:`Family` gives the full conditional log density of each row, ℓᵢ(ηᵢ), as a pure JAX
function of the linear predictor η (every normalising constant included: log C(m, y), −log y!,
the negative binomial's and the Gamma's lgamma terms), so that log likelihoods agree with R's
``logLik`` and Stata's across integration methods and with the model without random effects.
PIRLS and the Laplace/quadrature engines (:mod:`jaxmixed.engine.laplace`) differentiate ℓ with
respect to η by autodiff; nothing here is specific to one engine.

Row data: ``y`` (successes for the binomial), ``m`` (binomial trials; 1 elsewhere), ``pw``
(prior weights: each row's log density is multiplied by them, as lme4's and glmmTMB's
``weights=``; for the Gaussian family they are precision weights, Var(yᵢ | b) = σ²/wᵢ).
Families with a scale (negative binomial, Gamma, Gaussian) take its log, ``s``, as an extra
parameter:

    negbinomial  NB2, Var(y | b) = μ + μ²/α, s = ln α (glmmTMB's nbinom2 θ = α; Stata's
                 menbreg reports 1/α)
    gamma        shape ν, Var(y | b) = μ²/ν, s = ln ν (dispersion 1/ν)
    gaussian     s = ln σ
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln, log_ndtr, ndtr

from jaxmixed.errors import DataError, ModelError

LINKS = ("identity", "log", "logit", "probit", "cloglog", "inverse")


def _log_mu(link: str, eta):
    """log μ(η) for links whose mean is positive."""
    if link == "log":
        return eta
    if link == "logit":
        return -jax.nn.softplus(-eta)
    if link == "probit":
        return log_ndtr(eta)
    if link == "cloglog":
        return jnp.log(-jnp.expm1(-jnp.exp(eta)))
    if link == "inverse":
        return -jnp.log(eta)
    return jnp.log(eta)  # identity


def _log_1m_mu(link: str, eta):
    """log(1 − μ(η)) for links of a probability."""
    if link == "logit":
        return -jax.nn.softplus(eta)
    if link == "probit":
        return log_ndtr(-eta)
    if link == "cloglog":
        return -jnp.exp(eta)
    if link == "log":
        return jnp.log(-jnp.expm1(eta))
    return jnp.log1p(-eta)  # identity


def inverse_link(link: str, eta, xp=jnp):
    """μ = g⁻¹(η) (``xp`` numpy or jax.numpy)."""
    if link == "identity":
        return eta
    if link == "log":
        return xp.exp(eta)
    if link == "logit":
        return 1.0 / (1.0 + xp.exp(-eta))
    if link == "probit":
        return np.asarray(ndtr(jnp.asarray(eta))) if xp is np else ndtr(eta)
    if link == "cloglog":
        return -xp.expm1(-xp.exp(eta))
    if link == "inverse":
        return 1.0 / eta
    raise ModelError(f"unknown link {link!r}")


@dataclass(frozen=True)
class Family:
    """A response distribution: its name, canonical link, the links it allows, whether it has
    a scale parameter, and how Stata names it."""

    name: str
    canonical: str
    links: tuple
    has_scale: bool
    title: str  # Stata's header word: "Bernoulli", "Poisson", ...
    glm_name: str  # "logistic", "Poisson", ... in "LR test vs. ... model"

    def loglik(self, link: str, y, m, pw, eta, s, constant: bool = True):
        """ℓᵢ(ηᵢ) per row (full log density, times the prior weight); ``constant=False`` leaves
        out the terms free of every parameter (:meth:`constant`: log C(m, y), −log y!), which
        the engines add once instead of at every evaluation."""
        if self.name == "binomial" and link == "logit":  # y log μ + (m − y) log(1 − μ), one softplus
            ll = y * eta - m * jax.nn.softplus(eta)
        elif self.name == "binomial":
            ll = jnp.where(y > 0, y * _log_mu(link, eta), 0.0) \
                + jnp.where(m - y > 0, (m - y) * _log_1m_mu(link, eta), 0.0)
        elif self.name == "poisson":
            mu_log = _log_mu(link, eta)
            ll = jnp.where(y > 0, y * mu_log, 0.0) - jnp.exp(mu_log)
        elif self.name == "negbinomial":
            mu_log = _log_mu(link, eta)
            la = s
            a = jnp.exp(la)
            lsum = jnp.logaddexp(la, mu_log)
            ll = gammaln(y + a) - gammaln(a) + a * (la - lsum) + y * (mu_log - lsum)
        elif self.name == "gamma":
            mu_log = _log_mu(link, eta)
            nu = jnp.exp(s)
            ll = -gammaln(nu) + nu * (s - mu_log) + (nu - 1.0) * jnp.log(y) - nu * y * jnp.exp(-mu_log)
        elif self.name == "gaussian":
            mu = inverse_link(link, eta)
            ll = -0.5 * (jnp.log(2 * jnp.pi) + 2.0 * s - jnp.log(pw)) - 0.5 * pw * (y - mu) ** 2 * jnp.exp(-2.0 * s)
            return ll
        else:  # pragma: no cover - families are checked on construction
            raise ModelError(f"unknown family {self.name!r}")
        if constant:
            ll = ll + self.row_constant(y, m, jnp)
        return pw * ll

    def eta_derivatives(self, link: str, y, m, pw, eta):
        """(∂ℓᵢ/∂ηᵢ, −∂²ℓᵢ/∂ηᵢ²) in closed form for the canonical links of the binomial (logit)
        and Poisson (log) families — one exponential per row where autodiff of :meth:`loglik`
        takes several — or None for the others (the engines then differentiate ``loglik``)."""
        if self.name == "binomial" and link == "logit":
            mu = jax.nn.sigmoid(eta)
            return pw * (y - m * mu), pw * m * mu * (1.0 - mu)
        if self.name == "poisson" and link == "log":
            mu = jnp.exp(eta)
            return pw * (y - mu), pw * mu
        return None

    def row_constant(self, y, m, xp=np):
        """The parameter-free part of each row's log density (before the prior weight):
        log C(m, y) for the binomial, −log y! for counts, 0 elsewhere."""
        lg = _lgamma if xp is np else gammaln
        if self.name == "binomial":
            return lg(m + 1.0) - lg(y + 1.0) - lg(m - y + 1.0)
        if self.name in ("poisson", "negbinomial"):
            return -lg(y + 1.0)
        return xp.zeros_like(y)

    def constant(self, y, m, pw, xp=np):
        """Σᵢ wᵢ × :meth:`row_constant` (numpy or jax.numpy)."""
        return xp.sum(pw * self.row_constant(y, m, xp))

    def variance(self, mu, s, xp=np):
        """Var(y | b) of one trial / count at mean μ (without the prior weight)."""
        if self.name == "binomial":
            return mu * (1.0 - mu)
        if self.name == "poisson":
            return mu
        if self.name == "negbinomial":
            return mu + mu**2 / xp.exp(s)
        if self.name == "gamma":
            return mu**2 / xp.exp(s)
        return xp.exp(2.0 * s) * xp.ones_like(mu)

    def unit_deviance(self, y, mu, m, s):
        """Deviance residual squared, dᵢ ≥ 0 (numpy; for residuals)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.name == "binomial":
                p = np.where(m > 0, y / np.where(m > 0, m, 1), 0)
                a = np.where(y > 0, y * np.log(np.where(p > 0, p, 1) / mu), 0.0)
                b = np.where(m - y > 0, (m - y) * np.log(np.where(p < 1, 1 - p, 1) / (1 - mu)), 0.0)
                return 2 * (a + b)
            if self.name == "poisson":
                return 2 * (np.where(y > 0, y * np.log(np.where(y > 0, y, 1) / mu), 0.0) - (y - mu))
            if self.name == "negbinomial":
                a = np.exp(s)
                t = np.where(y > 0, y * np.log(np.where(y > 0, y, 1) / mu), 0.0)
                return 2 * (t - (y + a) * np.log((y + a) / (mu + a)))
            if self.name == "gamma":
                return 2 * (-np.log(y / mu) + (y - mu) / mu)
            return (y - mu) ** 2

    def check_response(self, y, m, name: str) -> None:
        """A DataError naming the response and the rows it cannot take (numpy)."""
        y = np.asarray(y, dtype=float)
        if self.name == "binomial":
            bad = (y < 0) | (y > m) | (np.abs(y - np.round(y)) > 1e-8) | (m < 0) | (np.abs(m - np.round(m)) > 1e-8)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                if np.all(m == 1):
                    raise DataError(f"response {name!r} must be 0 or 1 for the Bernoulli family (or a two-level "
                                    f"factor); row {i} has {y[i]:g} ({int(bad.sum())} such row(s)). Give counts as "
                                    "cbind(successes, failures), or proportions with weights= the trials")
                raise DataError(f"response {name!r}: successes must be whole numbers between 0 and the trials; "
                                f"row {i} has {y[i]:g} successes of {m[i]:g} trials ({int(bad.sum())} such row(s))")
        elif self.name in ("poisson", "negbinomial"):
            bad = (y < 0) | (np.abs(y - np.round(y)) > 1e-8)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DataError(f"response {name!r} must be a non-negative whole-number count for the {self.name} "
                                f"family; row {i} has {y[i]:g} ({int(bad.sum())} such row(s))")
        elif self.name == "gamma":
            bad = ~(y > 0)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DataError(f"response {name!r} must be positive for the gamma family; row {i} has {y[i]:g} "
                                f"({int(bad.sum())} such row(s))")


FAMILIES = {
    "binomial": Family("binomial", "logit", ("logit", "probit", "cloglog", "log"), False, "Binomial", "logistic"),
    "poisson": Family("poisson", "log", ("log",), False, "Poisson", "Poisson"),
    "negbinomial": Family("negbinomial", "log", ("log",), True, "Negative binomial", "negative binomial"),
    "gamma": Family("gamma", "inverse", ("inverse", "log", "identity"), True, "Gamma", "gamma"),
    "gaussian": Family("gaussian", "identity", ("identity", "log", "inverse"), True, "Gaussian", "linear"),
}
ALIASES = {"bernoulli": "binomial", "binom": "binomial", "nbinom2": "negbinomial", "nbreg": "negbinomial",
           "negative binomial": "negbinomial", "nbinomial": "negbinomial", "normal": "gaussian", "gauss": "gaussian"}


def family_of(name) -> Family:
    """The family called ``name`` (lme4's, glmmTMB's or Stata's spelling); a ModelError otherwise."""
    if isinstance(name, Family):
        return name
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in FAMILIES:
        raise ModelError(f"unknown family {name!r}; use one of {', '.join(FAMILIES)} (or bernoulli)")
    return FAMILIES[key]


def link_of(family: Family, link) -> str:
    """The link to use: ``None`` gives the family's canonical link (log for the negative
    binomial); a link that does not fit the family's range is a ModelError."""
    if link is None:
        return family.canonical
    key = str(link).strip().lower()
    if key not in LINKS:
        raise ModelError(f"unknown link {link!r}; use one of {', '.join(LINKS)}")
    if key not in family.links:
        raise ModelError(f"link {key!r} does not fit the {family.name} family's range of means; "
                         f"use one of {', '.join(family.links)}")
    return key


def _lgamma(x):
    """log Γ(x) elementwise (numpy), by ``math.lgamma`` on the distinct values: counts and trials
    take few of them, and this spares importing scipy.special (≈ 0.5 s) in a fresh process."""
    import math  # noqa: PLC0415

    x = np.asarray(x, dtype=float)
    vals, inv = np.unique(x, return_inverse=True)
    out = np.array([math.lgamma(v) if v > 0 or v != np.floor(v) else math.inf for v in vals.tolist()])
    return out[inv].reshape(x.shape)
