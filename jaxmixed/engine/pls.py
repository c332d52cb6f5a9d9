"""The penalised-least-squares engine: the profiled (restricted) deviance from cross-products.

Pure functions of (θ, PLSArrays, reml) with a static :class:`ModelShape` (``reml`` is a traced
flag, so ML and REML fits share one compiled program); ``jit``, ``grad``, ``hessian`` and
``vmap`` all use the same code. Notation as in Bates et al. (2015, JSS, section 3):

    [ΛᵀZᵀZΛ + I   ΛᵀZᵀX]   [L      0  ] [Lᵀ  R_ZX]
    [XᵀZΛ         XᵀX  ] = [R_ZXᵀ  R_Xᵀ] [0   R_X ]

    ML:    -2ℓ(θ)  = log|L|² + n (1 + log(2π r²/n))
    REML:  -2ℓ_R(θ) = log|L|² + log|R_X|² + (n-p)(1 + log(2π r²/(n-p)))

The factorisation of L comes in two layouts, picked from the design (``engine="auto"``) or by
the caller: dense (:mod:`jaxmixed.engine.pls_dense`: A₂₁ dense, one dense Schur block) and
blocked sparse (:mod:`jaxmixed.engine.pls_sparse`: the pattern's non-zero blocks, one dense
panel per connected component). :class:`PLSEngine` is the engine interface
(:mod:`jaxmixed.engine.interface`) over both.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import block_diag

from jaxmixed.data.pattern import Layout, choose_engine, cross_pairs
from jaxmixed.engine import kernels, pls_dense, pls_sparse
from jaxmixed.engine.numerics import LOG_2PI, hessian, hessian_through, jacobian, safe_log, second_order
from jaxmixed.model.covariance import SINGULAR_TOL, interior_covariance, is_singular, theta_from_gamma, \
    thetas_from_eta
from jaxmixed.runtime import programs
from jaxmixed.runtime.devices import host_array


class PLSArrays(NamedTuple):
    """The cross-products in the engine's layout (jit arguments).

    D11 (L₁, q₁, q₁), Z1W (L₁, q₁, p+1), Z2W (m₂, p+1), WW (p+1, p+1), n; A21 and A22:
    dense layout (``shape.layout is None``): A21 (L₁, q₁, m₂) and A22 (m₂, m₂) dense; blocked
    layout: A21 a :class:`~jaxmixed.engine.pls_sparse.Sparse21` and A22 the lower triangles of
    the Schur panels, flattened. Columns of Z₂ are level-major within each factor: factor f,
    level ℓ, column j at offset_f + ℓ q_f + j. With a fixed-effects basis X̃ = X R₀⁻¹ the
    solve returns β = R₀⁻¹β̃ and the REML deviance includes log|R₀|² (identity and 0 without)."""

    D11: jnp.ndarray
    A21: object
    A22: jnp.ndarray
    Z1W: jnp.ndarray
    Z2W: jnp.ndarray
    WW: jnp.ndarray
    n: jnp.ndarray
    R0_inv: jnp.ndarray  # (p, p): the fixed-effects columns are X̃ = X R₀⁻¹ (Design.fixed_basis)
    ld_x: jnp.ndarray  # log|R₀|², added to the REML deviance


@dataclass(frozen=True)
class TermShape:
    """Static description of one random-effects term for the jitted engine."""

    structure: object  # covariance.* (frozen, hashable)
    factor: int
    cols: tuple[int, int]
    theta: tuple[int, int]


@dataclass(frozen=True)
class ModelShape:
    """Everything about a model's shape that is static under jit (hashable).

    ``layout`` None: the dense layout; else the blocked layout's panels. ``kernels``: the
    kernel policy for single matrices (:mod:`jaxmixed.engine.kernels`)."""

    L: tuple[int, ...]  # levels per factor, engine order
    q: tuple[int, ...]  # columns per factor
    terms: tuple[TermShape, ...]
    p: int
    n_theta: int
    layout: Layout | None = None
    kernels: str = "lapack"

    @property
    def m2(self) -> int:
        return sum(L * q for L, q in zip(self.L[1:], self.q[1:]))

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each factor ≥ 2 inside the rest columns (natural order)."""
        out, pos = [], 0
        for L, q in zip(self.L[1:], self.q[1:]):
            out.append(pos)
            pos += L * q
        return tuple(out)

    @property
    def quasi_newton(self) -> bool:
        """True when Hessians are too costly: the optimiser then uses gradients only."""
        return self.layout is not None and self.layout.quasi_newton

    @property
    def kind(self) -> str:
        """The layout as ``engine=`` names it: "dense" or "sparse"."""
        return "dense" if self.layout is None else "sparse"

    @property
    def structures(self) -> tuple:
        """Each term's covariance structure, in term order (all that the map η → θ needs)."""
        return tuple(t.structure for t in self.terms)

    @property
    def n_eta(self) -> int:
        """Parameters in the reporting metric: each term's, then ln σ."""
        return sum(t.structure.n_eta for t in self.terms) + 1


def shape_of(design, pattern, engine: str = "auto", kernels: str = "lapack") -> ModelShape:
    """The static shape of a design; ``engine`` 'auto' (chosen from the design and its
    ``pattern``), 'dense' or 'sparse'."""
    kind = choose_engine(design, pattern, engine)
    return ModelShape(
        L=tuple(f.n_levels for f in design.factors),
        q=tuple(f.q for f in design.factors),
        terms=tuple(TermShape(t.structure, t.factor, t.cols, t.theta) for t in design.terms),
        p=design.p, n_theta=design.n_theta,
        layout=pattern.layout if kind == "sparse" else None, kernels=kernels)


# ---------------------------------------------------------------------------------------------
# from engine-neutral cross-products to the engine's layout


def arrange(cp, shape: ModelShape, pattern=None, xp=np, basis=None) -> PLSArrays:
    """:class:`PLSArrays` from :class:`~jaxmixed.data.crossprod.CrossProducts`.

    ``pattern`` None: the blocks are those of the full pattern
    (:func:`~jaxmixed.data.pattern.dense_block_index`), dense layout only, traceable
    (``xp=jax.numpy``); else the design's pattern (numpy). ``basis``: (R₀⁻¹, log|R₀|²) when
    the cross-products were formed with X̃ = X R₀⁻¹ (``Design.fixed_basis``), else None."""
    L1, q1 = shape.L[0], shape.q[0]
    p1 = cp.WW.shape[0]
    if basis is None:
        R0_inv, ld_x = xp.eye(p1 - 1), xp.zeros(())
    else:
        R0_inv, ld_x = xp.asarray(basis[0], dtype=float), xp.asarray(basis[1], dtype=float)
    rest = list(zip(shape.L[1:], shape.q[1:]))
    Z2W = (xp.concatenate([z.reshape(-1, p1) for z in cp.Z2W]) if rest else xp.zeros((0, p1)))
    if shape.layout is not None:
        A21, A22 = pls_sparse.sparse_arrays(shape, pattern, list(cp.A21), dict(zip(cross_pairs(len(rest)), cp.X22)),
                                            list(cp.D22))
        put = host_array
        return PLSArrays(D11=put(cp.D11), A21=A21, A22=A22, Z1W=put(cp.Z1W), Z2W=put(Z2W), WW=put(cp.WW),
                         n=put(np.float64(cp.n)), R0_inv=put(R0_inv), ld_x=put(np.float64(ld_x)))
    m2 = shape.m2
    if pattern is None:  # full pattern: every pair of levels a block, so A₂₁ is a reshape
        parts = [blk.reshape(L1, Lk, q1, qk).transpose(0, 2, 1, 3).reshape(L1, q1, Lk * qk)
                 for blk, (Lk, qk) in zip(cp.A21, rest)]
        A21 = xp.concatenate(parts, axis=2) if parts else xp.zeros((L1, q1, 0))
        rows = []
        for a, (La, qa) in enumerate(rest):
            row = []
            for b, (Lb, qb) in enumerate(rest):
                if a == b:
                    blk = xp.einsum("lij,lm->limj", cp.D22[a], xp.eye(La)).reshape(La * qa, La * qa)
                else:
                    lo, hi = (a, b) if a < b else (b, a)
                    X = cp.X22[cross_pairs(len(rest)).index((lo, hi))]
                    X = X.reshape(shape.L[lo + 1], shape.L[hi + 1], shape.q[lo + 1], shape.q[hi + 1])
                    X = X.transpose(0, 2, 1, 3).reshape(shape.L[lo + 1] * shape.q[lo + 1], -1)
                    blk = X if a < b else X.T
                row.append(blk)
            rows.append(xp.concatenate(row, axis=1))
        A22 = xp.concatenate(rows, axis=0) if rows else xp.zeros((0, 0))
        return PLSArrays(D11=cp.D11, A21=A21, A22=A22, Z1W=cp.Z1W, Z2W=Z2W, WW=cp.WW, n=xp.asarray(cp.n, float),
                         R0_inv=R0_inv, ld_x=ld_x)
    A21 = np.zeros((L1, q1, m2))
    A22 = np.zeros((m2, m2))
    offs = np.cumsum([0] + [Lk * qk for Lk, qk in rest])
    for k, (Lk, qk) in enumerate(rest):
        cols = offs[k] + pattern.blk_j[k][:, None] * qk + np.arange(qk)[None, :]  # (nb, q_k)
        A21[pattern.blk_lev[k][:, None, None], np.arange(q1)[None, :, None], cols[:, None, :]] = cp.A21[k]
        c = offs[k] + np.arange(Lk)[:, None] * qk + np.arange(qk)[None, :]
        A22[c[:, :, None], c[:, None, :]] = cp.D22[k]
    for (ka, kb), X in zip(cross_pairs(len(rest)), cp.X22):
        ja, jb = pattern.x_j[(ka, kb)]
        qa, qb = rest[ka][1], rest[kb][1]
        ca = offs[ka] + ja[:, None] * qa + np.arange(qa)[None, :]
        cb = offs[kb] + jb[:, None] * qb + np.arange(qb)[None, :]
        A22[ca[:, :, None], cb[:, None, :]] = X
        A22[cb[:, None, :], ca[:, :, None]] = X
    put = host_array
    return PLSArrays(D11=put(cp.D11), A21=put(A21), A22=put(A22), Z1W=put(cp.Z1W), Z2W=put(Z2W), WW=put(cp.WW),
                     n=put(np.float64(cp.n)), R0_inv=put(R0_inv), ld_x=put(np.float64(ld_x)))


# ---------------------------------------------------------------------------------------------
# the objective


def factor_lambdas(theta, shape: ModelShape):
    """Λ_f for every factor: block-diagonal over the terms that share the factor."""
    per_factor = [[] for _ in shape.L]
    for t in shape.terms:
        per_factor[t.factor].append(t.structure.lam(theta[t.theta[0]:t.theta[1]]))
    return [blocks[0] if len(blocks) == 1 else block_diag(*blocks) for blocks in per_factor]


def term_lambdas(theta, shape: ModelShape, xp=jnp):
    """Λ_k of each term, in the design's term order (``xp=np``: on the host, no JAX operation)."""
    return [t.structure.lam(theta[t.theta[0]:t.theta[1]], xp) for t in shape.terms]


def dof(data: PLSArrays, shape: ModelShape, reml):
    """Residual degrees of freedom: n - p for REML, n for ML (``reml`` may be traced)."""
    return jnp.where(reml, data.n - shape.p, data.n)


def deviance_parts(theta, data: PLSArrays, shape: ModelShape):
    """(log|L|², log|R_X|², r²) at θ (log|R_X|² of the original X: log|R̃_X|² + log|R₀|²)."""
    lams = factor_lambdas(theta, shape)
    if shape.layout is not None:
        ld_L, ld_RX, pwrss = pls_sparse.deviance_parts(theta, data, shape, lams)
    else:
        f = pls_dense.factorize(theta, data, shape, lams)
        ld_L, ld_RX, pwrss = f.logdet_L, f.logdet_RX, f.pwrss
    return ld_L, ld_RX + data.ld_x, pwrss


@programs.tracked
@partial(jax.jit, static_argnames=("shape",))
def deviance(theta, data: PLSArrays, shape: ModelShape, reml):
    """Profiled deviance: -2 × (restricted) log likelihood with β and σ² profiled out."""
    ld_L, ld_RX, pwrss = deviance_parts(theta, data, shape)
    nu = dof(data, shape, reml)
    dev = ld_L + nu * (1.0 + LOG_2PI + safe_log(pwrss / nu))
    return dev + jnp.where(reml, ld_RX, 0.0)


def deviance_at_sigma(theta, log_sigma, data: PLSArrays, shape: ModelShape, reml):
    """-2ℓ at θ and a given σ (β still profiled: exact for ML, and REML has no β):

        ML:   log|L|² + n log(2πσ²) + r²/σ²
        REML: log|L|² + log|R_X|² + (n-p) log(2πσ²) + r²/σ²
    """
    ld_L, ld_RX, pwrss = deviance_parts(theta, data, shape)
    nu = dof(data, shape, reml)
    dev = ld_L + nu * (LOG_2PI + 2.0 * log_sigma) + pwrss * jnp.exp(-2.0 * log_sigma)
    return dev + jnp.where(reml, ld_RX, 0.0)


class Solution(NamedTuple):
    beta: jnp.ndarray  # (p,)
    sigma: jnp.ndarray  # residual sd
    cov_beta: jnp.ndarray  # σ² (R_XᵀR_X)⁻¹
    b: tuple  # per factor (L_f, q_f): b = Λu, the BLUPs in the data's units


@programs.tracked
@partial(jax.jit, static_argnames=("shape",))
def solve(theta, data: PLSArrays, shape: ModelShape, reml) -> Solution:
    """β̂, σ̂, Var(β̂) and the conditional modes b at θ (back-substitution through L)."""
    p = shape.p
    nu = dof(data, shape, reml)
    lams = factor_lambdas(theta, shape)

    def beta_of(LM):  # R_X β = r_Xy
        return kernels.solve_triangular(LM[:p, :p], LM[p, :p][:, None], transpose=True, policy=shape.kernels)[:, 0]

    solver = pls_sparse.solve_parts if shape.layout is not None else pls_dense.solve_parts
    LM, beta, u1, u2 = solver(theta, data, shape, lams, beta_of)
    pwrss = LM[p, p] ** 2
    RXt = LM[:p, :p]  # R_Xᵀ
    sigma = jnp.sqrt(pwrss / nu)
    RXt_inv = kernels.solve_lower(RXt, jnp.eye(p, dtype=RXt.dtype), policy=shape.kernels)
    cov_beta = sigma**2 * RXt_inv.T @ RXt_inv
    # back from the basis X̃ = X R₀⁻¹: β = R₀⁻¹β̃, Var(β) = R₀⁻¹ Var(β̃) R₀⁻ᵀ (u and b need no change)
    beta = data.R0_inv @ beta
    cov_beta = data.R0_inv @ cov_beta @ data.R0_inv.T
    b = [u1 @ lams[0].T]
    for lam, off, L, q in zip(lams[1:], shape.offsets, shape.L[1:], shape.q[1:]):
        b.append(u2[off:off + L * q].reshape(L, q) @ lam.T)
    return Solution(beta, sigma, cov_beta, tuple(b))


@programs.tracked
@partial(jax.jit, static_argnames=("shape",))
def conditional_variances(theta, sigma, data: PLSArrays, shape: ModelShape):
    """Per factor, (L_f, q_f, q_f) blocks of Var(b | y) = σ² Λ (LLᵀ)⁻¹ Λᵀ (lme4's condVar,
    Stata's reses)."""
    lams = factor_lambdas(theta, shape)
    if shape.layout is not None:
        out = pls_sparse.conditional_blocks(theta, data, shape, lams)
    else:
        out = pls_dense.conditional_blocks(theta, data, shape, lams)
    return [sigma**2 * jnp.einsum("ij,ljk,hk->lih", lam, V, lam) for lam, V in zip(lams, out)]


# ---------------------------------------------------------------------------------------------
# the reporting metric η = (each term's ln sd / atanh corr, ln σ)


def eta_of(theta, sigma, shape: ModelShape, lams=None, xp=jnp):
    """η at θ, σ: each term's Stata parameters, then ln σ (``xp`` numpy or jax.numpy: the
    same rule for the fit's table and the batched fits; ``lams``: each term's Λ at θ when
    already computed, so that no eager JAX operation runs)."""
    parts = []
    lams = term_lambdas(theta, shape) if lams is None else lams
    for t, lam in zip(shape.terms, lams):
        lam = xp.asarray(lam)
        parts.append(t.structure.eta_from_sigma(sigma**2 * lam @ lam.T, xp))
    parts.append(xp.log(xp.asarray(sigma))[None])
    return xp.concatenate(parts)


def theta_from_eta(eta, shape: ModelShape):
    """θ and ln σ for a Stata-metric parameter vector η."""
    return _theta_from_eta(eta, shape.structures)


def _theta_from_eta(eta, structures: tuple):
    """θ and ln σ for η, given the terms' covariance structures (in term order)."""
    log_sigma = eta[-1]
    return thetas_from_eta(eta, structures, jnp.exp(log_sigma))[0], log_sigma


def _eta_hessian_from_x(eta, grad_x, hess_x, structures: tuple):
    """∇²_η of :func:`loglik_eta` from −2ℓ's gradient and Hessian in x = (θ, ln σ) at x(η)
    (:func:`jaxmixed.engine.numerics.hessian_through`; :func:`optimum_derivatives_x` gives
    them from the optimiser's). It depends on the covariance structures alone, not on the
    data: one small program serves every model with the same terms."""
    def x_of(e):
        th, s_ = _theta_from_eta(e, structures)
        return jnp.concatenate([th, s_[None]])

    return hessian_through(x_of, eta, grad_x, hess_x)


eta_hessian_from_x = programs.cached(_eta_hessian_from_x, static_argnames=("structures",))


def _factor_lambda_np(theta, shape: ModelShape, f: int) -> np.ndarray:
    """Λ_f on the host (:func:`factor_lambdas` without a JAX operation): block-diagonal over the
    terms of factor f."""
    blocks = [lam for t, lam in zip(shape.terms, term_lambdas(np.asarray(theta, dtype=float), shape, np))
              if t.factor == f]
    q = sum(b.shape[0] for b in blocks)
    out, pos = np.zeros((q, q)), 0
    for b in blocks:
        out[pos:pos + b.shape[0], pos:pos + b.shape[0]] = b
        pos += b.shape[0]
    return out


def optimum_derivatives_x(theta, grad, hess, b, sigma: float, nu: float, shape: ModelShape):
    """(∇_x D, ∇²_x D) of D = −2ℓ(θ, ln σ) (:func:`deviance_at_sigma`) at the optimum (θ̂, σ̂),
    from the profiled deviance's gradient and Hessian there (the optimiser's), on the host:

        ∇²_θθ D = ∇²D_prof + ∇r² ∇r²ᵀ / (ν σ̂⁴),  ∂²D/∂θ∂s = −2 ∇r² / σ̂²,  ∂²D/∂s² = 4ν,
        ∇_θ D = ∇D_prof,  ∂D/∂s = 0 (σ̂² = r²/ν),

    since D_prof(θ) = D(θ, ŝ(θ)) with P₀ and r² as in :func:`deviance_at_sigma`. ∇r² by the
    envelope theorem on r²(θ) = min_{β,u} ‖y − Xβ − ZΛ_θu‖² + ‖u‖² at the solution (whose
    u-condition is ΛᵀZᵀr̂ = û): ∂r²/∂θ_k = −2 Σ_ℓ ûᵀ_ℓ Λ_f⁻¹ (∂Λ_f/∂θ_k) û_ℓ, with û_ℓ = Λ_f⁻¹ b̂_ℓ
    from the BLUPs ``b`` (Solution.b), Λ_f linear in θ. None where that cannot be trusted: a Λ_f
    that is not linear in θ or too ill-conditioned to invert (the caller then differentiates
    the log likelihood itself)."""
    theta = np.asarray(theta, dtype=float)
    k = theta.shape[0]
    d_r2 = np.zeros(k)
    for f, bf in enumerate(b):
        lam = _factor_lambda_np(theta, shape, f)
        if not np.all(np.isfinite(lam)) or np.linalg.cond(lam) > 1e8:
            return None
        u = np.linalg.solve(lam, np.asarray(bf, dtype=float).T)  # (q, L_f): û_ℓ in the columns
        U = u @ u.T
        total = np.zeros_like(lam)
        for j in (j for t in shape.terms if t.factor == f for j in range(*t.theta)):
            e = np.zeros(k)
            e[j] = 1.0
            dlam = _factor_lambda_np(e, shape, f)
            total += theta[j] * dlam
            d_r2[j] = -2.0 * np.trace(np.linalg.solve(lam, dlam) @ U)
        if not np.allclose(total, lam, rtol=1e-12, atol=1e-14 * np.max(np.abs(lam))):
            return None  # Λ_f not linear in θ
    s2 = sigma**2
    H = np.zeros((k + 1, k + 1))
    H[:k, :k] = np.asarray(hess, dtype=float) + np.outer(d_r2, d_r2) / (nu * s2**2)
    H[:k, k] = H[k, :k] = -2.0 * d_r2 / s2
    H[k, k] = 4.0 * nu
    G = np.concatenate([np.asarray(grad, dtype=float), [0.0]])
    if not (np.all(np.isfinite(H)) and np.all(np.isfinite(G))):
        return None
    return G, 0.5 * (H + H.T)


def loglik_eta(eta, data: PLSArrays, shape: ModelShape, reml):
    """(Restricted) log likelihood as a function of η = (ln sd, atanh corr, …, ln σ)."""
    theta, log_sigma = theta_from_eta(eta, shape)
    return -0.5 * deviance_at_sigma(theta, log_sigma, data, shape, reml)


@programs.tracked
@partial(jax.jit, static_argnames=("shape",))
def hessian_eta(eta, data: PLSArrays, shape: ModelShape, reml):
    """∇²_η of :func:`loglik_eta`, with k expensive columns for k θ entries, not k + 1.

    In x = (θ, s = ln σ) the deviance is D = P₀(θ) + ν(log 2π + 2s) + P₁(θ)e^{−2s}
    (:func:`deviance_at_sigma`: P₀ = log|L|² (+ log|R_X|² for REML), P₁ = r²), so s enters only
    through scalars: one forward-over-reverse column per θ direction gives ∇²_θθ D, ∂²D/∂θ∂s
    (the s entry of that column) and ∇D; ∂²D/∂s² = 2(2ν − ∂D/∂s). The chain rule through the
    cheap map η → x (:func:`_eta_hessian_from_x`) then gives the Hessian in η:
    Jᵀ(∇²_x D)J + Σᵢ ∂D/∂xᵢ ∇²xᵢ(η). Equal to ``numerics.hessian(loglik_eta)`` to rounding
    (tests/test_engine.py)."""
    theta, s = theta_from_eta(eta, shape)
    nu = dof(data, shape, reml)

    def dev(th, s_):
        ld_L, ld_RX, pwrss = deviance_parts(th, data, shape)
        return ld_L + jnp.where(reml, ld_RX, 0.0) + nu * (LOG_2PI + 2.0 * s_) + pwrss * jnp.exp(-2.0 * s_)

    grad_x = jax.grad(dev, argnums=(0, 1))
    # the gradient once (its factorisations kept), then its derivative one θ direction at a
    # time: InstEval 0.52 s against 0.62 s for a jvp per direction, which redoes the primal
    (g_th, g_s), column = jax.linearize(lambda th: grad_x(th, s), theta)
    k = theta.shape[0]
    H_tt, H_ts = jax.lax.map(column, jnp.eye(k, dtype=theta.dtype))
    H_tt = 0.5 * (H_tt + H_tt.T)
    H_ss = 2.0 * (2.0 * nu - g_s)
    H_x = jnp.block([[H_tt, H_ts[:, None]], [H_ts[None, :], H_ss[None, None]]])
    G = jnp.concatenate([g_th, g_s[None]])
    return _eta_hessian_from_x(eta, G, H_x, shape.structures)


# ---------------------------------------------------------------------------------------------
# small-sample inference: the derivatives Satterthwaite and Kenward-Roger need (all p × p or
# k × k quantities from the blocked factorisation; never an n × n matrix)


def fixed_gram(theta, data: PLSArrays, shape: ModelShape):
    """(log|L|², G̃) at θ: G̃ = R̃_XᵀR̃_X = X̃ᵀ(ZΛΛᵀZᵀ + I)⁻¹X̃ in the basis X̃ (so that
    XᵀV⁻¹X = R₀ᵀG̃R₀/σ²)."""
    lams = factor_lambdas(theta, shape)
    p = shape.p
    if shape.layout is not None:
        ld_L, LM = pls_sparse.fixed_factor(theta, data, shape, lams)
    else:
        f = pls_dense.factorize(theta, data, shape, lams)
        ld_L, LM = f.logdet_L, f.LM
    R = LM[:p, :p]
    return ld_L, R @ R.T


def vcov_beta_x(x, data: PLSArrays, shape: ModelShape):
    """Var(β̂) = σ² R₀⁻¹ G̃(θ)⁻¹ R₀⁻ᵀ as a function of x = (θ, σ), unprofiled (lmerTest's
    parameterisation of the variance parameters)."""
    _, G = fixed_gram(x[:-1], data, shape)
    Gi = jnp.linalg.inv(G)
    return x[-1] ** 2 * data.R0_inv @ (0.5 * (Gi + Gi.T)) @ data.R0_inv.T


def deviance_x(x, data: PLSArrays, shape: ModelShape, reml):
    """−2ℓ (restricted for REML) at x = (θ, σ), β profiled (:func:`deviance_at_sigma`)."""
    return deviance_at_sigma(x[:-1], jnp.log(x[-1]), data, shape, reml)


@programs.cached(static_argnames=("shape",))
def satterthwaite_parts(x, data: PLSArrays, shape: ModelShape, reml):
    """(Var(β̂), ∂Var(β̂)/∂x (p × p × k), ∇²_x deviance (k × k)) at x = (θ, σ): exact forward-
    and reverse-mode derivatives of the cross-product solve."""
    # one direction at a time (lax.map, not vmap): memory of one tangent, no batched LAPACK calls
    V = vcov_beta_x(x, data, shape)
    J = jnp.moveaxis(jacobian(vcov_beta_x)(x, data, shape), 0, -1)
    H = hessian(deviance_x)(x, data, shape, reml)
    return V, J, 0.5 * (H + H.T)


def theta_sigma_of_gamma(gamma, shape: ModelShape):
    """(θ, σ) from γ = (each term's linear covariance parameters, σ²) (``sigma_from_gamma``)."""
    sigma = jnp.sqrt(gamma[-1])
    parts = [theta_from_gamma(t.structure, gamma[t.theta[0]:t.theta[1]], sigma) for t in shape.terms]
    return jnp.concatenate(parts), sigma


def _kr_functions(gamma, data: PLSArrays, shape: ModelShape):
    """(log|Σ| + log|XᵀΣ⁻¹X|, R₀⁻ᵀ(XᵀΣ⁻¹X)R₀⁻¹ = G̃/σ²) as functions of γ, up to constants."""
    theta, sigma = theta_sigma_of_gamma(gamma, shape)
    ld_L, G = fixed_gram(theta, data, shape)
    s2 = sigma**2
    ld_G = jnp.linalg.slogdet(G)[1]
    return ld_L + data.n * jnp.log(s2) + ld_G - shape.p * jnp.log(s2), G / s2


def gamma_of(theta, sigma, shape: ModelShape):
    """γ at θ, σ: each term's Σ_k = σ²Λ_kΛ_kᵀ in its linear parameters (moved just inside the cone
    by :func:`~jaxmixed.model.covariance.interior_covariance` on a boundary), then σ²;
    traceable (jax.numpy)."""
    parts = []
    for t, lam in zip(shape.terms, term_lambdas(theta, shape)):
        parts.append(t.structure.gamma_from_sigma(interior_covariance(sigma**2 * lam @ lam.T, sigma**2), jnp))
    return jnp.concatenate(parts + [jnp.reshape(sigma**2, (1,))])


#: dense-layout models with at most this many random-effects columns get Kenward-Roger's parts
#: in closed form (:func:`~jaxmixed.engine.pls_dense.kenward_roger_closed`: q × q matrices, a few
#: O(q³) products, nothing differentiated, so cheap to compile); larger ones the autodiff program
KR_CLOSED_FORM_MAX_Q = 300


@programs.cached(static_argnames=("shape",))
def kenward_roger_parts(theta, sigma, data: PLSArrays, shape: ModelShape):
    """(M, ∂M/∂γ (p × p × k), ∂²M/∂γ∂γ (p × p × k × k), IE2 (k × k)) at γ = γ(θ, σ): in closed form
    for small dense models (:data:`KR_CLOSED_FORM_MAX_Q`), else by autodiff
    (:func:`_kenward_roger_autodiff`); both at the same γ and equal to rounding (tests)."""
    if closed_form_kr(shape):
        gamma = jax.lax.stop_gradient(gamma_of(theta, sigma, shape))
        return pls_dense.kenward_roger_closed(gamma, data, shape)
    return _kenward_roger_autodiff(theta, sigma, data, shape)


def closed_form_kr(shape: ModelShape) -> bool:
    """Whether :func:`kenward_roger_parts` uses the closed form for this shape."""
    return shape.layout is None and sum(L * q for L, q in zip(shape.L, shape.q)) <= KR_CLOSED_FORM_MAX_Q


def _kenward_roger_autodiff(theta, sigma, data: PLSArrays, shape: ModelShape):
    """(M, ∂M/∂γ (p × p × k), ∂²M/∂γ∂γ (p × p × k × k), IE2 (k × k)) at γ = γ(θ, σ) (:func:`gamma_of`)
    with M = XᵀΣ⁻¹X in the basis X̃ (M = R₀⁻ᵀ XᵀΣ⁻¹X R₀⁻¹) and IE2 = −∇²_γ[log|Σ| + log|XᵀΣ⁻¹X|]
    = tr(P G_r P G_s) (pbkrtest's expected-information matrix; Σ linear in γ, so its second
    derivatives vanish). Directions one (pair) at a time through ``lax.map``: the memory of one
    tangent, and no batched LAPACK calls."""
    p = shape.p
    gamma = jax.lax.stop_gradient(gamma_of(theta, sigma, shape))
    k = gamma.shape[0]

    def F(g):  # (ℓ, M) as one vector
        ell, M = _kr_functions(g, data, shape)
        return jnp.concatenate([ell[None], M.reshape(-1)])

    v, J, H = second_order(F)(gamma)  # (1 + p²), (k, 1 + p²), (k, k, 1 + p²)
    M = v[1:].reshape(p, p)
    P = jnp.moveaxis(J[:, 1:].reshape(k, p, p), 0, -1)
    Q = jnp.moveaxis(H[:, :, 1:].reshape(k, k, p, p), (0, 1), (-2, -1))
    return M, P, Q, -H[:, :, 0]


def residual_rows(variance: bool) -> list[tuple[str, str]]:
    """The reporting-metric row of R = σ²I after the terms' rows: ln σ, shown as sd(Residual)
    (var(Residual) with ``variance``)."""
    return [("var(Residual)" if variance else "sd(Residual)", "sd")]


# ---------------------------------------------------------------------------------------------
# the engine interface


@dataclass(frozen=True)
class PLSEngine:
    """The engine interface (:mod:`jaxmixed.engine.interface`) for independent homoskedastic
    errors, R = σ²I. Parameters: θ (lme4's relative Cholesky factors); data: PLSArrays."""

    shape: ModelShape
    name = "pls"

    @property
    def n_params(self) -> int:
        return self.shape.n_theta

    def deviance(self, params, data, reml):
        return deviance(params, data, self.shape, reml)

    def solve(self, params, data, reml) -> Solution:
        return solve(params, data, self.shape, reml)

    def eta(self, params, sigma, theta_scale=None, lams=None) -> np.ndarray:
        """η at the estimate (``lams``: each term's Λ, when already at hand)."""
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero variance: ln sd = −inf
            return eta_of(np.asarray(params), sigma, self.shape, lams, xp=np)

    def hessian_eta(self, eta, data, reml):
        return hessian_eta(eta, data, self.shape, reml)

    def hessian_eta_from(self, params, grad, hess, solution, fallback=None):
        """A ``hessian_program`` for ``tables.variance_components`` (called as
        ``program(eta, data, reml)``, only where the fit is not singular): ``hessian_eta`` at the
        optimum from the optimiser's gradient and Hessian of the profiled deviance there
        (:func:`optimum_derivatives_x`, then the small program :data:`eta_hessian_from_x`).
        Where that does not apply (no Hessian from the optimiser, or see
        :func:`optimum_derivatives_x`) it is ``fallback`` (default :meth:`hessian_eta`)."""
        fallback = fallback or self.hessian_eta
        if hess is None:
            return fallback
        def program(eta, data, reml):
            n = float(np.asarray(data.n))
            nu = n - self.shape.p if reml else n
            parts = optimum_derivatives_x(params, grad, hess, solution.b, float(solution.sigma), nu, self.shape)
            if parts is None:
                return fallback(eta, data, reml)
            return eta_hessian_from_x(np.asarray(eta, dtype=float), parts[0], parts[1], self.shape.structures)

        return program

    def theta(self, params, sigma) -> np.ndarray:
        return np.asarray(params, dtype=float)

    def term_covariances(self, params, sigma) -> list[np.ndarray]:
        """Σ_k = σ² Λ_kΛ_kᵀ of each term."""
        lams = term_lambdas(np.asarray(params), self.shape, np)
        return [sigma**2 * lam @ lam.T for lam in lams]

    def conditional_variances(self, params, sigma, data, design=None) -> list[np.ndarray]:
        return [np.asarray(v) for v in conditional_variances(host_array(params), sigma, data, self.shape)]

    def marginal_covariance(self, params, sigma, data, design, level: int):
        """V = Σ_k Z_k Σ_k Z_kᵀ + σ²I of the rows of one panel (the outer factor's level
        ``level``), and their positions in the design's rows."""
        from jaxmixed.data.design import outer_factor

        fac = design.factors[outer_factor(design)]
        rows = np.flatnonzero(fac.codes == level)
        V = np.eye(len(rows)) * sigma**2
        for tb, S in zip(design.terms, self.term_covariances(params, sigma)):
            f = design.factors[tb.factor]
            Z = f.Z[rows, tb.cols[0]:tb.cols[1]]
            codes = f.codes[rows]
            V += (codes[:, None] == codes[None, :]) * (Z @ S @ Z.T)
        return V, rows

    def residual_rows(self, variance: bool) -> list[tuple[str, str]]:
        """(name, kind) of the reporting-metric entries after the terms'."""
        return residual_rows(variance)

    @property
    def n_variance_params(self) -> int:
        """Variance parameters counted by the LR test against the linear model."""
        return self.shape.n_eta - 1

    def singular(self, params, unit) -> bool:
        return is_singular(np.asarray(params), [t.structure for t in self.shape.terms],
                           [t.theta for t in self.shape.terms], unit)

    def satterthwaite_parts(self, params, sigma, data, reml):
        """(Var(β̂), ∂Var(β̂)/∂x (k × p × p), ∇²_x −2ℓ (k × k)) in x = (θ, σ), numpy."""
        x = np.concatenate([np.asarray(params, dtype=float), [float(sigma)]])  # on the host: no JAX op
        V, J, H = satterthwaite_parts(x, data, self.shape, reml)
        return np.asarray(V), np.moveaxis(np.asarray(J), -1, 0), np.asarray(H)

    def kenward_roger_parts(self, params, sigma, data):
        """(Φ = (XᵀΣ⁻¹X)⁻¹, P_r = ∂(XᵀΣ⁻¹X)/∂γ_r (k × p × p), ∂²(XᵀΣ⁻¹X)/∂γ_r∂γ_s
        (k × k × p × p), IE2 (k × k)) at the REML estimate, γ the linear covariance parameters
        (:func:`kenward_roger_parts`), in the original fixed-effects columns."""
        M, P, Q, IE2 = (np.asarray(a) for a in kenward_roger_parts(host_array(params), host_array(sigma),
                                                                   data, self.shape))
        R0 = np.linalg.inv(np.asarray(data.R0_inv))  # X = X̃R₀: XᵀΣ⁻¹X = R₀ᵀ M R₀
        M = R0.T @ M @ R0
        P = np.einsum("ai,abk,bj->kij", R0, P, R0)
        Q = np.einsum("ai,abkl,bj->klij", R0, Q, R0)
        Phi = np.linalg.inv(M)
        return 0.5 * (Phi + Phi.T), P, Q, 0.5 * (IE2 + IE2.T)

    supports_batched = True
    residual_title = None

    @property
    def quasi_newton(self) -> bool:
        return self.shape.quasi_newton



def from_design(design, engine: str = "auto", kernels: str = "lapack", pattern=None, orthonormal: bool = True):
    """(PLSArrays, ModelShape) of a design: its pattern (computed here unless given), the
    shape, and the cross-products in the engine's layout (numpy, one pass over the rows), with
    the fixed-effects columns in the design's basis X̃ (``Design.fixed_basis``; ``orthonormal=False``: X as
    it is)."""
    from jaxmixed.data.crossprod import cross_products
    from jaxmixed.data.pattern import build_pattern

    pattern = build_pattern(design) if pattern is None else pattern
    shape = shape_of(design, pattern, engine, kernels)
    cp = cross_products(design, pattern, orthonormal=orthonormal)
    return arrange(cp, shape, pattern, basis=design.fixed_basis[1:] if orthonormal else None), shape
