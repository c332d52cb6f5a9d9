"""Covariance structures of a random-effects term: one class per structure, one interface.

Each term with q columns has a covariance matrix Σ = σ² Λ Λᵀ (σ² the residual variance).
The optimiser works with θ, the free entries of the relative factor Λ (lme4's parameterisation);
some entries of θ are bounded below by 0 (a variance on its boundary is a legal, "singular" fit).
Reports use Stata's metric η: ln sd for standard deviations and atanh corr for correlations.

Interface (all pure functions of arrays; sizes are static):
    n_theta             number of θ entries
    lower               lower bounds of θ (0.0 or -inf)
    theta0              default starting value
    lam(theta)          q × q matrix Λ with ΛΛᵀ = Σ/σ²
    n_eta, eta_names    Stata-metric parameters and the names Stata prints for them
    eta_kinds           "sd" or "corr" for each η entry
    eta_from_sigma(S, xp)  η from an (absolute) covariance matrix S (xp: numpy or jax.numpy)
    theta_from_eta(eta, sigma)  θ for the same Σ; used to differentiate the log likelihood in η
    theta_scale(ms)     the optimiser's unit for each θ entry, from the mean squares ``ms`` of the
                        term's random-effects columns (see below)
    sigma_from_gamma(g), gamma_from_sigma(S, xp)
                        a parameterisation γ (n_theta entries) in which Σ is *linear*: the free
                        variances and covariances (Kenward-Roger's γ, pbkrtest's; the second
                        derivative of Σ in γ is zero)

Scale of the random-effects columns. θ is in the units of the data (lme4's θ): with a covariate
x multiplied by c, the θ entries of x's row of Λ are divided by c. The optimiser's tolerances
and the boundary test (:func:`is_singular`) are absolute, so they work on θ / w instead,
where w = 1/s and s is the root mean square of the column rounded to a power of 2
(:func:`column_scale`): the θ of the model whose columns are divided by s, which is O(1) for
covariates on any scale (an exact reparametrisation: Λ = diag(1/s) Λ_s, so the row of Λ that
belongs to column j is divided by s_j). Structures that share one variance across their columns
(identity, exchangeable) use one common s, the root mean square over all their columns, so the
structure is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np


def _tril_indices(q: int):
    """Lower-triangular positions in column-major order (lme4's θ order)."""
    rows, cols = [], []
    for j in range(q):
        for i in range(j, q):
            rows.append(i)
            cols.append(j)
    return np.array(rows), np.array(cols)


def _pairs(q: int):
    return [(i, j) for i in range(q) for j in range(i + 1, q)]


def column_scale(ms, xp=np):
    """2^round(log₂ √ms): the root mean square of a column rounded to a power of 2 (exact in
    binary, so the intercept and covariates already near unit scale keep s = 1). ``xp`` is
    numpy or jax.numpy."""
    return 2.0 ** xp.round(0.5 * xp.log2(ms))


def _common(ms, xp):
    return column_scale(xp.mean(ms), xp)


@dataclass(frozen=True)
class Identity:
    """Σ = sd² I: one variance shared by all q columns, no covariance."""

    q: int
    title = "Identity"

    @property
    def n_theta(self):
        return 1

    @property
    def lower(self):
        return np.zeros(1)

    @property
    def theta0(self):
        return np.ones(1)

    def lam(self, theta, xp=jnp):
        return theta[0] * xp.eye(self.q)

    @property
    def n_eta(self):
        return 1

    def eta_names(self, names):
        return [f"sd({' '.join(names)})"]

    @property
    def eta_kinds(self):
        return ["sd"]

    def eta_from_sigma(self, S, xp=np):
        with np.errstate(divide="ignore"):  # a zero variance is a legal boundary: ln sd = -inf
            return xp.reshape(0.5 * xp.log(xp.mean(xp.diagonal(S))), (1,))

    def theta_from_eta(self, eta, sigma):
        return jnp.exp(eta[:1]) / sigma

    def boundary(self, theta, tol):
        return np.asarray(theta)[..., 0] < tol

    def sigma_from_gamma(self, g):
        return g[0] * jnp.eye(self.q)

    def gamma_from_sigma(self, S, xp=np):
        return xp.reshape(xp.mean(xp.diagonal(S)), (1,))

    def theta_scale(self, ms, xp=np):
        return xp.reshape(1.0 / _common(ms, xp), (1,))


@dataclass(frozen=True)
class Independent:
    """Σ = diag(sd₁², …, sd_q²)."""

    q: int
    title = "Independent"

    @property
    def n_theta(self):
        return self.q

    @property
    def lower(self):
        return np.zeros(self.q)

    @property
    def theta0(self):
        return np.ones(self.q)

    def lam(self, theta, xp=jnp):
        return xp.diag(theta)

    @property
    def n_eta(self):
        return self.q

    def eta_names(self, names):
        return [f"sd({n})" for n in names]

    @property
    def eta_kinds(self):
        return ["sd"] * self.q

    def eta_from_sigma(self, S, xp=np):
        with np.errstate(divide="ignore"):
            return 0.5 * xp.log(xp.diagonal(S))

    def theta_from_eta(self, eta, sigma):
        return jnp.exp(eta) / sigma

    def sigma_from_gamma(self, g):
        return jnp.diag(g)

    def gamma_from_sigma(self, S, xp=np):
        return xp.diagonal(S)

    def boundary(self, theta, tol):
        return np.any(np.asarray(theta) < tol, axis=-1)

    def theta_scale(self, ms, xp=np):
        return 1.0 / column_scale(ms, xp)


@dataclass(frozen=True)
class Exchangeable:
    """Σ = sd² [(1-ρ) I + ρ 11ᵀ]: one common variance and one common correlation.

    θ = (s⊥, s₁) are the square roots of Σ/σ²'s two eigenvalues, sd²(1-ρ)/σ² on the space
    orthogonal to 1 and sd²(1+(q-1)ρ)/σ² along 1, so Λ = s⊥ (I - J/q) + s₁ J/q with J = 11ᵀ.
    Both are ≥ 0; s⊥ = 0 is ρ = 1, s₁ = 0 is ρ = -1/(q-1).
    """

    q: int
    title = "Exchangeable"

    @property
    def n_theta(self):
        return 2

    @property
    def lower(self):
        return np.zeros(2)

    @property
    def theta0(self):
        return np.ones(2)

    def lam(self, theta, xp=jnp):
        J = xp.ones((self.q, self.q)) / self.q
        return theta[0] * (xp.eye(self.q) - J) + theta[1] * J

    @property
    def n_eta(self):
        return 2

    def eta_names(self, names):
        joined = " ".join(names)
        return [f"sd({joined})", f"corr({joined})"]

    @property
    def eta_kinds(self):
        return ["sd", "corr"]

    def eta_from_sigma(self, S, xp=np):
        q = self.q
        var = xp.mean(xp.diagonal(S))
        cov = (xp.sum(S) - xp.trace(S)) / (q * (q - 1))
        rho = xp.clip(cov / var, -1 + 1e-15, 1 - 1e-15)
        return xp.stack([0.5 * xp.log(var), xp.arctanh(rho)])

    def theta_from_eta(self, eta, sigma):
        sd = jnp.exp(eta[0])
        rho = jnp.tanh(eta[1])
        return jnp.stack([sd * jnp.sqrt(1 - rho), sd * jnp.sqrt(1 + (self.q - 1) * rho)]) / sigma

    def sigma_from_gamma(self, g):
        """γ = (variance, covariance)."""
        return g[0] * jnp.eye(self.q) + g[1] * (jnp.ones((self.q, self.q)) - jnp.eye(self.q))

    def gamma_from_sigma(self, S, xp=np):
        q = self.q
        return xp.stack([xp.mean(xp.diagonal(S)), (xp.sum(S) - xp.trace(S)) / (q * (q - 1))])

    def boundary(self, theta, tol):
        return np.any(np.asarray(theta) < tol, axis=-1)

    def theta_scale(self, ms, xp=np):
        return xp.ones(2) / _common(ms, xp)


@dataclass(frozen=True)
class Unstructured:
    """Σ any positive (semi)definite matrix; θ = lower triangle of Λ, column-major, diag ≥ 0."""

    q: int
    title = "Unstructured"

    @property
    def n_theta(self):
        return self.q * (self.q + 1) // 2

    @property
    def _diag_mask(self):
        r, c = _tril_indices(self.q)
        return r == c

    @property
    def lower(self):
        return np.where(self._diag_mask, 0.0, -np.inf)

    @property
    def theta0(self):
        return self._diag_mask.astype(float)

    def lam(self, theta, xp=jnp):
        r, c = _tril_indices(self.q)
        if xp is np:  # on the host (reporting): no JAX operation
            out = np.zeros((self.q, self.q))
            out[r, c] = theta
            return out
        return jnp.zeros((self.q, self.q), dtype=theta.dtype).at[r, c].set(theta)

    @property
    def n_eta(self):
        return self.q + len(_pairs(self.q))

    def eta_names(self, names):
        return [f"sd({n})" for n in names] + [
            f"corr({names[i]},{names[j]})" for i, j in _pairs(self.q)
        ]

    @property
    def eta_kinds(self):
        return ["sd"] * self.q + ["corr"] * len(_pairs(self.q))

    def eta_from_sigma(self, S, xp=np):
        with np.errstate(divide="ignore", invalid="ignore"):
            sd = xp.sqrt(xp.diagonal(S))
            R = S / xp.outer(sd, sd)
            rho = xp.clip(xp.stack([R[i, j] for i, j in _pairs(self.q)]), -1 + 1e-15, 1 - 1e-15)
            return xp.concatenate([xp.log(sd), xp.arctanh(rho)])

    def theta_from_eta(self, eta, sigma):
        q = self.q
        sd = jnp.exp(eta[:q])
        R = jnp.eye(q)
        for k, (i, j) in enumerate(_pairs(q)):
            rho = jnp.tanh(eta[q + k])
            R = R.at[i, j].set(rho).at[j, i].set(rho)
        lam = sd[:, None] * jnp.linalg.cholesky(R) / sigma
        r, c = _tril_indices(q)
        return lam[r, c]

    def sigma_from_gamma(self, g):
        """γ = the lower triangle of Σ, column-major (lme4's θ order)."""
        r, c = _tril_indices(self.q)
        L = jnp.zeros((self.q, self.q), dtype=g.dtype).at[r, c].set(g)
        return L + L.T - jnp.diag(jnp.diagonal(L))

    def gamma_from_sigma(self, S, xp=np):
        r, c = _tril_indices(self.q)
        return S[r, c]

    def boundary(self, theta, tol):
        return np.any(np.asarray(theta)[..., self._diag_mask] < tol, axis=-1)

    def theta_scale(self, ms, xp=np):
        """Entry (i, j) of Λ is in the units of 1/column i: w = 1/s_i."""
        return 1.0 / column_scale(ms, xp)[_tril_indices(self.q)[0]]


STRUCTURES = {
    "identity": Identity,
    "independent": Independent,
    "exchangeable": Exchangeable,
    "unstructured": Unstructured,
}


def make(cov: str, q: int):
    """The structure object for a term (q == 1 is always Identity)."""
    if q == 1:
        return Identity(1)
    return STRUCTURES[cov](q)


def eta_to_report(kind: str, value: float, variance: bool):
    """Stata's displayed value for one η entry: sd/corr, or var when ``variance``."""
    if kind == "sd":
        return float(np.exp(2 * value)) if variance else float(np.exp(value))
    return float(np.tanh(value))


def thetas_from_eta(eta, structures, sigma):
    """θ of every term (concatenated, relative to ``sigma``) from the leading entries of a
    Stata-metric η that holds the terms' parameters in order, and how many entries they took."""
    pos, parts = 0, [jnp.zeros((0,), eta.dtype)]
    for st in structures:
        parts.append(st.theta_from_eta(eta[pos:pos + st.n_eta], sigma))
        pos += st.n_eta
    return jnp.concatenate(parts), pos


def theta_from_gamma(structure, g, sigma):
    """θ (relative to ``sigma``) of the covariance whose linear parameters are ``g``
    (``sigma_from_gamma``), through the structure's own metric; traceable."""
    return structure.theta_from_eta(structure.eta_from_sigma(structure.sigma_from_gamma(g), jnp), sigma)


def interior_covariance(S, scale, eps: float = 1e-9):
    """S, or S + ε·scale·I where S is numerically singular (traceable). γ → θ goes through a
    Cholesky factor, whose derivatives are infinite on the boundary, while XᵀΣ⁻¹X is smooth there
    (Σ is linear in γ), so derivatives taken at S + εI differ from the boundary's by O(ε)."""
    lo = jnp.linalg.eigvalsh(S)[0]
    return S + jnp.where(lo < eps * scale, eps * scale, 0.0) * jnp.eye(S.shape[0], dtype=S.dtype)


#: θ entries closer than this to their lower bound: boundary (lme4's rule), applied to θ in the
#: optimiser's units, θ / Design.theta_scale (as if each random-effects column had unit scale)
SINGULAR_TOL = 1e-4


def is_singular(theta, structures, slices, scale=None, tol: float = SINGULAR_TOL) -> bool:
    """Some θ entry of some term within ``tol`` of its bound (a boundary, "singular" fit),
    measured in the optimiser's units θ / ``scale`` (``Design.theta_scale``; None: θ as it is).
    ``structures`` and ``slices``: each term's structure and its (start, stop) in θ. The one
    singularity test of the package (jm.fit, the per-panel engine, fit_many)."""
    th = np.asarray(theta, dtype=float)
    if scale is not None:
        th = th / np.asarray(scale, dtype=float)
    out = np.zeros(th.shape[:-1], dtype=bool)  # a batch of θ (one row per response): one flag each
    for s, (a, b) in zip(structures, slices):
        out |= s.boundary(th[..., a:b], tol)
    return out if th.ndim == 2 else bool(out)
