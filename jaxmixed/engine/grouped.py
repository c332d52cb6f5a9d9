"""The marginal likelihood of a one-factor Gaussian mixed model with any fixed part, group by group.

For a prediction η (from any differentiable function of the covariates, e.g. a neural network),
random effects b_g ~ N(0, Σ_b) per level g of one grouping factor with covariates z_i (q of
them: an intercept, slopes) and errors ε_i ~ N(0, σ²),

    y_i = η_i + z_iᵀ b_{g(i)} + ε_i,

the rows of group g have V_g = σ² I + Z_g Σ_b Z_gᵀ. With Σ_b = L Lᵀ (L lower triangular) and the
per-group sums S_g = Z_gᵀZ_g, t_g = Z_gᵀr_g, ρ_g = r_gᵀr_g of the residuals r = y − η, the
Woodbury identity and the matrix determinant lemma give, with M_g = σ² I + LᵀS_gL and
c_g = Lᵀt_g,

    −log p(y_g) = ½ [ n_g log 2π + (n_g − q) log σ² + log|M_g| + (ρ_g − c_gᵀ M_g⁻¹ c_g) / σ² ],

an O(n_g q²) term per group: the negative log likelihood is a sum over groups, so a mini-batch
of whole groups scaled by (number of groups) / (groups in the batch) is an unbiased estimate of
it and of its gradient. A group without rows adds exactly 0. The BLUP (conditional mean) of b_g
is L M_g⁻¹ c_g.

Variance parameters for gradient optimisers (:class:`VarianceParams`): log σ and an
unconstrained q × q matrix whose lower triangle, with its diagonal exponentiated, is L.
Every factorisation is the engine's plain-XLA Cholesky (q is small), so ``jit``, ``grad``,
``hessian`` and ``vmap`` all apply.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmixed.data.crossprod import segment_cross
from jaxmixed.engine.kernels import cholesky_xla, triangular_solve_xla
from jaxmixed.model.family import family_of

LOG_2PI = float(np.log(2.0 * np.pi))


class VarianceParams(NamedTuple):
    """Unconstrained variance parameters: σ = exp(log_sigma); L = tril(chol) with its diagonal
    replaced by exp(diag(chol)); Σ_b = L Lᵀ."""

    log_sigma: jax.Array
    chol: jax.Array  # (q, q)


def init_params(q: int, sigma: float = 1.0, sd: float = 1.0) -> VarianceParams:
    """σ = ``sigma``, Σ_b = sd² I."""
    return VarianceParams(jnp.asarray(np.log(sigma), dtype=float), jnp.diag(jnp.full(q, float(np.log(sd)))))


def factor(params: VarianceParams):
    """(L, σ²): Σ_b = L Lᵀ."""
    C = jnp.asarray(params.chol)
    L = jnp.tril(C, -1) + jnp.diag(jnp.exp(jnp.diagonal(C)))
    return L, jnp.exp(2.0 * jnp.asarray(params.log_sigma))


def group_sums(r, Z, groups, n_groups: int):
    """(n_g, S_g = Z_gᵀZ_g, t_g = Z_gᵀr_g, ρ_g = r_gᵀr_g) per group: segment sums, the
    cross-products' own (:func:`jaxmixed.data.crossprod.segment_cross`) for S and t."""
    seg = lambda x: jax.ops.segment_sum(x, groups, num_segments=n_groups)  # noqa: E731
    S = segment_cross(groups, Z, Z, n_groups, xp=jnp)
    t = segment_cross(groups, Z, r[:, None], n_groups, xp=jnp)[..., 0]
    return seg(jnp.ones_like(r)), S, t, seg(r * r)


def _as_Z(Z, n):
    return jnp.ones((n, 1)) if Z is None else jnp.asarray(Z, dtype=float).reshape(n, -1)


def _pieces(eta, y, groups, params, Z, n_groups):
    r = jnp.asarray(y, dtype=float) - jnp.asarray(eta, dtype=float)
    Z = _as_Z(Z, r.shape[0])
    L, s2 = factor(params)
    q = L.shape[0]
    n, S, t, rho = group_sums(r, Z, groups, n_groups)
    M = s2 * jnp.eye(q) + jnp.einsum("ji,gjk,kl->gil", L, S, L)
    c = t @ L  # (Lᵀ t_g) per group
    C = cholesky_xla(M)
    w = triangular_solve_xla(C, c[..., None], left_side=True, lower=True)[..., 0]  # C⁻¹ c
    return n, rho, C, w, L, s2, q


def nll_terms(eta, y, groups, params: VarianceParams, Z=None, *, n_groups: int):
    """−log p(y_g) of every group g (``n_groups`` of them; empty groups 0): see the module
    docstring. ``groups``: integer codes 0..n_groups-1 per row; ``Z``: (n, q) random-effects
    covariates, default a random intercept."""
    n, rho, C, w, _, s2, q = _pieces(eta, y, groups, params, Z, n_groups)
    logdet_M = 2.0 * jnp.sum(jnp.log(jnp.diagonal(C, axis1=-2, axis2=-1)), axis=-1)
    # log|V_g| = n_g log σ² + log|I + LᵀS_gL/σ²| = (n_g − q) log σ² + log|M_g|
    return 0.5 * (n * LOG_2PI + (n - q) * jnp.log(s2) + logdet_M + (rho - jnp.sum(w * w, axis=-1)) / s2)


def nll(eta, y, groups, params: VarianceParams, Z=None, *, n_groups: int, scale=1.0):
    """The marginal negative log likelihood Σ_g −log p(y_g), times ``scale`` (for a mini-batch
    of whole groups: n_groups_total / n_groups_in_batch makes it unbiased)."""
    return scale * jnp.sum(nll_terms(eta, y, groups, params, Z, n_groups=n_groups))


def blups(eta, y, groups, params: VarianceParams, Z=None, *, n_groups: int):
    """E[b_g | y] = L M_g⁻¹ Lᵀ Z_gᵀ (y_g − η_g) per group, (n_groups, q); 0 for groups without rows."""
    _, _, C, w, L, _, _ = _pieces(eta, y, groups, params, Z, n_groups)
    v = triangular_solve_xla(C, w[..., None], left_side=True, lower=True, transpose_a=True)[..., 0]  # M⁻¹ c
    return v @ L.T


def predict(eta, groups, b, Z=None):
    """Conditional predictions η + z_iᵀ b_{g(i)} for rows of seen groups (``groups`` ≥ 0) and the
    marginal prediction η for rows of new groups (``groups`` = −1)."""
    eta = jnp.asarray(eta, dtype=float)
    Z = _as_Z(Z, eta.shape[0])
    g = jnp.asarray(groups)
    zb = jnp.sum(Z * b[jnp.maximum(g, 0)], axis=1)
    return eta + jnp.where(g >= 0, zb, 0.0)


def report(params: VarianceParams, names=None) -> dict:
    """The variance parameters in the report's metric: sd of each random effect, their
    correlations, and sd(Residual)."""
    L, s2 = factor(params)
    Sigma = np.asarray(L @ L.T)
    sd = np.sqrt(np.diag(Sigma))
    q = len(sd)
    names = list(names) if names is not None else (["_cons"] if q == 1 else [f"z{j}" for j in range(q)])
    out = {f"sd({nm})": float(s) for nm, s in zip(names, sd)}
    for i in range(q):
        for j in range(i + 1, q):
            out[f"corr({names[i]},{names[j]})"] = float(Sigma[i, j] / (sd[i] * sd[j]))
    out["sd(Residual)"] = float(np.sqrt(s2))
    return out


# ---------------------------------------------------------------------------------------------
# the Laplace approximation for a Bernoulli (logit) or Poisson (log) response

FAMILIES = ("bernoulli", "poisson")
NEWTON_STEPS = 30


def _family(family: str):
    """(the Family, its canonical link): the model layer's log densities and their closed-form
    derivatives (:meth:`jaxmixed.model.family.Family.eta_derivatives`)."""
    fam = family_of(family)
    return fam, fam.canonical


def laplace_terms(eta, y, groups, params: VarianceParams, Z=None, *, n_groups: int, family: str = "bernoulli"):
    """−log p(y_g) per group by the Laplace approximation, for a Bernoulli (logit link) or
    Poisson (log link) response with linear predictor η + z_iᵀ b_g, b_g = L u_g, u_g ~ N(0, I):

        −log p(y_g) ≈ φ_g(û_g) + ½ log|H_g|,   φ_g(u) = −Σ_{i∈g} log p(y_i | η_i + z_iᵀLu) + ½‖u‖²,

    H_g = LᵀZ_gᵀW_gZ_gL + I at the mode û_g (W the conditional variances: the observed curvature,
    which for these canonical links is also the expected one; as jm.fit's GLMMs and lme4's
    glmer at nAGQ = 1). The modes come from NEWTON_STEPS Newton steps (vectorised over the
    groups) taken without derivatives, then one more step with them: at the mode that step's
    derivative is the implicit-function one, −H⁻¹ ∂∇φ/∂(η, L), so gradients are exact without
    differentiating through the iterations. ``params.log_sigma`` is not used (no scale)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    y = jnp.asarray(y, dtype=float)
    eta = jnp.asarray(eta, dtype=float)
    Z = _as_Z(Z, y.shape[0])
    L, _ = factor(params)
    q = L.shape[0]
    seg = lambda x: jax.ops.segment_sum(x, groups, num_segments=n_groups)  # noqa: E731
    fam, link = _family(family)
    ones = jnp.ones_like(y)
    ZL = Z @ L  # rows' covariates in the spherical metric: linear predictor η + (ZL)ᵢ·u_g

    def at(u, eta, ZL):  # (linear predictor, μ, Cholesky factor of H_g) at the modes u
        lin = eta + jnp.sum(ZL * u[groups], axis=1)
        score, w = fam.eta_derivatives(link, y, ones, ones, lin)  # (y − μ, its variance)
        H = jnp.eye(q) + segment_cross(groups, ZL, ZL, n_groups, weights=w, xp=jnp)
        return lin, score, cholesky_xla(H)

    def newton(u, eta, ZL):
        _, score, C = at(u, eta, ZL)
        grad = u - segment_cross(groups, ZL, score[:, None], n_groups, xp=jnp)[..., 0]
        step = triangular_solve_xla(C, triangular_solve_xla(C, grad[..., None], left_side=True, lower=True),
                                    left_side=True, lower=True, transpose_a=True)[..., 0]
        return u - step

    eta0, ZL0 = jax.lax.stop_gradient(eta), jax.lax.stop_gradient(ZL)
    u = jax.lax.fori_loop(0, NEWTON_STEPS, lambda _, u: newton(u, eta0, ZL0), jnp.zeros((n_groups, q)))
    u = newton(jax.lax.stop_gradient(u), eta, ZL)  # the step that carries the derivatives
    lin, _, C = at(u, eta, ZL)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(C, axis1=-2, axis2=-1)), axis=-1)
    phi = -seg(fam.loglik(link, y, ones, ones, lin, 0.0)) + 0.5 * jnp.sum(u * u, axis=1)
    return phi + 0.5 * logdet, u @ L.T


def nll_laplace(eta, y, groups, params: VarianceParams, Z=None, *, n_groups: int, family: str = "bernoulli",
                scale=1.0):
    """Σ_g of :func:`laplace_terms` times ``scale`` (mini-batches of whole groups as :func:`nll`)."""
    terms, _ = laplace_terms(eta, y, groups, params, Z, n_groups=n_groups, family=family)
    return scale * jnp.sum(terms)


def laplace_modes(eta, y, groups, params: VarianceParams, Z=None, *, n_groups: int, family: str = "bernoulli"):
    """The conditional modes b̂_g (n_groups, q): predictions are η + z_iᵀb̂_g on the link scale."""
    return laplace_terms(eta, y, groups, params, Z, n_groups=n_groups, family=family)[1]
