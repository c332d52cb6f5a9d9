"""The profiled (restricted) deviance from cross-products, and the solve for β, u, σ at θ.

Pure functions of (θ, Stats, reml) with a static Structure (``reml`` is a traced flag, so ML
and REML fits share one compiled program); ``jit``, ``grad``, ``hessian`` and ``vmap``
all use the same code. Notation as in Bates et al. (2015, JSS, section 3):

    [ΛᵀZᵀZΛ + I   ΛᵀZᵀX]   [L      0  ] [Lᵀ  R_ZX]
    [XᵀZΛ         XᵀX  ] = [R_ZXᵀ  R_Xᵀ] [0   R_X ]

with L = [[L₁, 0], [Wᵀ, L₂₂]]: L₁ block-diagonal over the first factor's levels (vmapped
Cholesky), W = L₁⁻¹Λ₁ᵀZ₁ᵀZ₂Λ₂ and L₂₂L₂₂ᵀ = Λ₂ᵀZ₂ᵀZ₂Λ₂ + I - WᵀW (the Schur complement).
Carrying y as the last column of W = [X y] gives the penalised RSS r² as the square of the last
diagonal entry of the final Cholesky factor. Then

    ML:    -2ℓ(θ)  = log|L|² + n (1 + log(2π r²/n))
    REML:  -2ℓ_R(θ) = log|L|² + log|R_X|² + (n-p)(1 + log(2π r²/(n-p)))
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import block_diag, solve_triangular

from jaxmixed.engine import sparse as blocked
from jaxmixed.engine import kernels as xla
from jaxmixed.engine.numerics import LOG_2PI, logdet_from_chol_diag, safe_log
from jaxmixed.data.crossprod import Stats, Structure


def factor_lambdas(theta, struct: Structure):
    """Λ_f for every factor: block-diagonal over the terms that share the factor."""
    per_factor = [[] for _ in struct.L]
    for t in struct.terms:
        per_factor[t.factor].append(t.structure.lam(theta[t.theta[0]:t.theta[1]]))
    return [blocks[0] if len(blocks) == 1 else block_diag(*blocks) for blocks in per_factor]


def _rest_rows(M, lams, struct: Structure):
    """Λ₂ᵀ M for M with m₂ rows (Λ₂ = blockdiag_f I_{L_f} ⊗ Λ_f)."""
    parts = []
    for lam, off, L, q in zip(lams[1:], struct.offsets, struct.L[1:], struct.q[1:]):
        blk = M[off:off + L * q].reshape((L, q) + M.shape[1:])
        parts.append(jnp.einsum("ji,lj...->li...", lam, blk).reshape((L * q,) + M.shape[1:]))
    return jnp.concatenate(parts, axis=0)


def _rest_cols(M, lams, struct: Structure):
    """M Λ₂ for M with m₂ columns (last axis)."""
    parts = []
    for lam, off, L, q in zip(lams[1:], struct.offsets, struct.L[1:], struct.q[1:]):
        blk = M[..., off:off + L * q].reshape(M.shape[:-1] + (L, q))
        parts.append(jnp.einsum("...lj,ji->...li", blk, lam).reshape(M.shape[:-1] + (L * q,)))
    return jnp.concatenate(parts, axis=-1)


class Factorization(NamedTuple):
    L1: jnp.ndarray  # (L₁, q₁, q₁) lower Cholesky blocks
    W: jnp.ndarray  # (L₁, q₁, m₂) = L₁⁻¹ Λ₁ᵀ A₁₂ Λ₂
    L22: jnp.ndarray  # (m₂, m₂)
    r1: jnp.ndarray  # (L₁, q₁, p+1) = L₁⁻¹ Λ₁ᵀ Z₁ᵀ[X y]
    r2: jnp.ndarray  # (m₂, p+1)
    LM: jnp.ndarray  # (p+1, p+1) lower Cholesky of the fixed-effects Schur complement
    logdet_L: jnp.ndarray  # log|L|²
    logdet_RX: jnp.ndarray  # log|R_X|²
    pwrss: jnp.ndarray  # r²(θ)


def factorize(theta, stats: Stats, struct: Structure) -> Factorization:
    """Blocked Cholesky of the penalised system at θ (see the module docstring).

    Dense engine only (``struct.engine is None``); the blocked engine's pieces are in
    :mod:`jaxmixed.blocked`."""
    if struct.engine is not None:
        raise ValueError("factorize() is the dense engine's; this Structure uses the blocked engine")
    lams = factor_lambdas(theta, struct)
    lam1 = lams[0]
    q1 = struct.q[0]
    C1 = jnp.einsum("ji,ljk,kh->lih", lam1, stats.D11, lam1) + jnp.eye(q1)
    L1 = xla.cholesky(C1)
    c1 = jnp.einsum("ji,ljr->lir", lam1, stats.Z1W)
    r1 = xla.solve_lower(L1, c1)
    M = stats.WW - jnp.einsum("lir,lis->rs", r1, r1)
    logdet_L = logdet_from_chol_diag(jnp.diagonal(L1, axis1=1, axis2=2))
    if struct.m2:
        B = _rest_cols(jnp.einsum("ji,ljm->lim", lam1, stats.A21), lams, struct)
        W = xla.solve_lower(L1, B)
        C22 = _rest_cols(_rest_rows(stats.A22, lams, struct), lams, struct)
        C22 = C22 + jnp.eye(struct.m2) - jnp.einsum("lim,lin->mn", W, W)
        L22 = jnp.linalg.cholesky(C22)
        c2 = _rest_rows(stats.Z2W, lams, struct) - jnp.einsum("lim,lir->mr", W, r1)
        r2 = solve_triangular(L22, c2, lower=True)
        M = M - r2.T @ r2
        logdet_L = logdet_L + logdet_from_chol_diag(jnp.diagonal(L22))
    else:
        W = stats.A21
        L22 = stats.A22
        r2 = stats.Z2W
    LM = jnp.linalg.cholesky(M)
    p = struct.p
    logdet_RX = logdet_from_chol_diag(jnp.diagonal(LM)[:p])
    pwrss = LM[p, p] ** 2
    return Factorization(L1, W, L22, r1, r2, LM, logdet_L, logdet_RX, pwrss)


def _dof(stats: Stats, struct: Structure, reml):
    """Residual degrees of freedom: n - p for REML, n for ML (``reml`` may be traced)."""
    return jnp.where(reml, stats.n - struct.p, stats.n)


def deviance_parts(theta, stats: Stats, struct: Structure):
    """(log|L|², log|R_X|², r²) at θ."""
    if struct.engine is not None:
        return blocked.deviance_parts(theta, stats, struct, factor_lambdas(theta, struct))
    f = factorize(theta, stats, struct)
    return f.logdet_L, f.logdet_RX, f.pwrss


@partial(jax.jit, static_argnames=("struct",))
def deviance(theta, stats: Stats, struct: Structure, reml):
    """Profiled deviance: -2 × (restricted) log likelihood with β and σ² profiled out."""
    ld_L, ld_RX, pwrss = deviance_parts(theta, stats, struct)
    nu = _dof(stats, struct, reml)
    dev = ld_L + nu * (1.0 + LOG_2PI + safe_log(pwrss / nu))
    return dev + jnp.where(reml, ld_RX, 0.0)


def deviance_at_sigma(theta, log_sigma, stats: Stats, struct: Structure, reml):
    """-2ℓ at θ and a given σ (β still profiled: exact for ML, and REML has no β):

        ML:   log|L|² + n log(2πσ²) + r²/σ²
        REML: log|L|² + log|R_X|² + (n-p) log(2πσ²) + r²/σ²
    """
    ld_L, ld_RX, pwrss = deviance_parts(theta, stats, struct)
    nu = _dof(stats, struct, reml)
    dev = ld_L + nu * (LOG_2PI + 2.0 * log_sigma) + pwrss * jnp.exp(-2.0 * log_sigma)
    return dev + jnp.where(reml, ld_RX, 0.0)


class Solution(NamedTuple):
    beta: jnp.ndarray  # (p,)
    sigma: jnp.ndarray  # residual sd
    cov_beta: jnp.ndarray  # σ² (R_XᵀR_X)⁻¹
    u1: jnp.ndarray  # (L₁, q₁) spherical effects of the first factor
    u2: jnp.ndarray  # (m₂,)
    b: tuple  # per factor (L_f, q_f): b = Λu, the BLUPs in the data's units


@partial(jax.jit, static_argnames=("struct",))
def solve(theta, stats: Stats, struct: Structure, reml) -> Solution:
    """β̂, σ̂, Var(β̂) and the conditional modes u, b at θ (back-substitution through L)."""
    p = struct.p
    nu = _dof(stats, struct, reml)
    lams = factor_lambdas(theta, struct)

    def beta_of(LM):
        return solve_triangular(LM[:p, :p].T, LM[p, :p], lower=False)  # R_X β = r_Xy

    if struct.engine is not None:
        LM, beta, u1, u2 = blocked.solve_parts(theta, stats, struct, lams, beta_of)
        pwrss = LM[p, p] ** 2
    else:
        f = factorize(theta, stats, struct)
        LM, pwrss = f.LM, f.pwrss
        beta = beta_of(LM)
        # Lᵀ u = c_y - R_ZX β, with c = [r1; r2] holding R_ZX in its first p columns and c_y last.
        rhs1 = f.r1[..., p] - f.r1[..., :p] @ beta
        if struct.m2:
            rhs2 = f.r2[:, p] - f.r2[:, :p] @ beta
            u2 = solve_triangular(f.L22.T, rhs2, lower=False)
            rhs1 = rhs1 - jnp.einsum("lim,m->li", f.W, u2)
        else:
            u2 = jnp.zeros((0,))
        u1 = xla.solve_lower_t(f.L1, rhs1[..., None])[..., 0]
    RXt = LM[:p, :p]  # R_Xᵀ
    sigma = jnp.sqrt(pwrss / nu)
    RXt_inv = solve_triangular(RXt, jnp.eye(p), lower=True)
    cov_beta = sigma**2 * RXt_inv.T @ RXt_inv
    b = [u1 @ lams[0].T]
    for lam, off, L, q in zip(lams[1:], struct.offsets, struct.L[1:], struct.q[1:]):
        b.append(u2[off:off + L * q].reshape(L, q) @ lam.T)
    return Solution(beta, sigma, cov_beta, u1, u2, tuple(b))
