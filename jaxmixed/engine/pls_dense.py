"""The dense layout of the PLS engine: A₂₁ dense, one dense Schur block for the rest factors.

Notation as in :mod:`jaxmixed.engine.pls`. L = [[L₁, 0], [Wᵀ, L₂₂]]: L₁ block-diagonal over
the first factor's levels (batched Cholesky), W = L₁⁻¹Λ₁ᵀZ₁ᵀZ₂Λ₂ and
L₂₂L₂₂ᵀ = Λ₂ᵀZ₂ᵀZ₂Λ₂ + I − WᵀW (the Schur complement). Carrying y as the last column of
[X y] gives the penalised RSS r² as the square of the last diagonal entry of the final factor.
Cheap to compile, so small models use it; single matrices (L₂₂, the fixed-effects block) are
factorised by the shape's kernel policy (:mod:`jaxmixed.engine.kernels`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmixed.engine import kernels
from jaxmixed.engine.numerics import logdet_from_chol_diag


def _rest_rows(M, lams, shape):
    """Λ₂ᵀ M for M with m₂ rows (Λ₂ = blockdiag_f I_{L_f} ⊗ Λ_f)."""
    parts = []
    for lam, off, L, q in zip(lams[1:], shape.offsets, shape.L[1:], shape.q[1:]):
        blk = M[off:off + L * q].reshape((L, q) + M.shape[1:])
        parts.append(jnp.einsum("ji,lj...->li...", lam, blk).reshape((L * q,) + M.shape[1:]))
    return jnp.concatenate(parts, axis=0)


def _rest_cols(M, lams, shape):
    """M Λ₂ for M with m₂ columns (last axis)."""
    parts = []
    for lam, off, L, q in zip(lams[1:], shape.offsets, shape.L[1:], shape.q[1:]):
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


class RandomFactor(NamedTuple):
    """The random-effects part of L: L = [[L₁, 0], [Wᵀ, L₂₂]] with LLᵀ = ΛᵀZᵀZΛ + I (weighted
    cross-products give ΛᵀZᵀWZΛ + I, the penalised Hessian of a GLMM's PIRLS step)."""

    L1: jnp.ndarray  # (L₁, q₁, q₁)
    W: jnp.ndarray  # (L₁, q₁, m₂)
    L22: jnp.ndarray  # (m₂, m₂)
    logdet: jnp.ndarray  # log|L|²


def factorize_random(data, shape, lams) -> RandomFactor:
    """The blocked Cholesky factor of ΛᵀZᵀZΛ + I alone (no fixed effects, no response)."""
    lam1 = lams[0]
    C1 = jnp.einsum("ji,ljk,kh->lih", lam1, data.D11, lam1) + jnp.eye(shape.q[0])
    L1 = kernels.cholesky(C1)
    logdet = logdet_from_chol_diag(jnp.diagonal(L1, axis1=1, axis2=2))
    if not shape.m2:
        return RandomFactor(L1, data.A21, data.A22, logdet)
    B = _rest_cols(jnp.einsum("ji,ljm->lim", lam1, data.A21), lams, shape)
    W = kernels.solve_lower(L1, B)
    C22 = _rest_cols(_rest_rows(data.A22, lams, shape), lams, shape)
    C22 = C22 + jnp.eye(shape.m2) - jnp.einsum("lim,lin->mn", W, W)
    L22 = kernels.cholesky(C22, shape.kernels)
    return RandomFactor(L1, W, L22, logdet + logdet_from_chol_diag(jnp.diagonal(L22)))


def solve_random(f: RandomFactor, r1, r2, shape):
    """(x₁, x₂) with LLᵀ [x₁; x₂] = [r₁; r₂] (r₁ (L₁, q₁), r₂ (m₂,)): forward then back
    substitution through the blocked factor."""
    y1 = kernels.solve_lower(f.L1, r1[..., None])[..., 0]
    if shape.m2:
        y2 = kernels.solve_lower(f.L22, (r2 - jnp.einsum("lim,li->m", f.W, y1))[:, None], shape.kernels)[:, 0]
        x2 = kernels.solve_lower_t(f.L22, y2[:, None], shape.kernels)[:, 0]
        y1 = y1 - jnp.einsum("lim,m->li", f.W, x2)
    else:
        x2 = r2
    return kernels.solve_lower_t(f.L1, y1[..., None])[..., 0], x2


def factorize(theta, data, shape, lams) -> Factorization:
    """Blocked Cholesky of the penalised system at θ (see the module docstring)."""
    pol = shape.kernels
    lam1 = lams[0]
    rf = factorize_random(data, shape, lams)
    L1, W, L22, logdet_L = rf
    c1 = jnp.einsum("ji,ljr->lir", lam1, data.Z1W)
    r1 = kernels.solve_lower(L1, c1)
    M = data.WW - jnp.einsum("lir,lis->rs", r1, r1)
    if shape.m2:
        c2 = _rest_rows(data.Z2W, lams, shape) - jnp.einsum("lim,lir->mr", W, r1)
        r2 = kernels.solve_lower(L22, c2, pol)
        M = M - r2.T @ r2
    else:
        r2 = data.Z2W
    LM = kernels.cholesky(M, pol)
    p = shape.p
    logdet_RX = logdet_from_chol_diag(jnp.diagonal(LM)[:p])
    pwrss = LM[p, p] ** 2
    return Factorization(L1, W, L22, r1, r2, LM, logdet_L, logdet_RX, pwrss)


def solve_parts(theta, data, shape, lams, beta_of):
    """(LM, β, u₁, u₂): back-substitution Lᵀu = c_y − R_ZX β, with c = [r1; r2] holding R_ZX in
    its first p columns and c_y last; ``beta_of(LM) -> β``."""
    p = shape.p
    f = factorize(theta, data, shape, lams)
    beta = beta_of(f.LM)
    rhs1 = f.r1[..., p] - f.r1[..., :p] @ beta
    if shape.m2:
        rhs2 = f.r2[:, p] - f.r2[:, :p] @ beta
        u2 = kernels.solve_lower_t(f.L22, rhs2[:, None], shape.kernels)[:, 0]
        rhs1 = rhs1 - jnp.einsum("lim,m->li", f.W, u2)
    else:
        u2 = jnp.zeros((0,))
    u1 = kernels.solve_lower_t(f.L1, rhs1[..., None])[..., 0]
    return f.LM, beta, u1, u2


def conditional_blocks(theta, data, shape, lams):
    """Diagonal blocks of (LLᵀ)⁻¹ (spherical u), per factor: the first factor's level ℓ block
    is AᵀA + KᵀK with A = L₁ℓ⁻¹ and K = L₂₂⁻¹ Wℓᵀ A, the rest's L₂₂⁻ᵀ L₂₂⁻¹."""
    f = factorize(theta, data, shape, lams)
    L1n, q1 = shape.L[0], shape.q[0]
    A = kernels.solve_lower(f.L1, jnp.broadcast_to(jnp.eye(q1), (L1n, q1, q1)))
    V1 = jnp.einsum("lki,lkj->lij", A, A)
    out = []
    if shape.m2:
        m2 = shape.m2
        WtA = jnp.einsum("lim,lij->mlj", f.W, A).reshape(m2, L1n * q1)
        K = kernels.solve_lower(f.L22, WtA, shape.kernels).reshape(m2, L1n, q1)
        V1 = V1 + jnp.einsum("mli,mlj->lij", K, K)
        Linv = kernels.solve_lower(f.L22, jnp.eye(m2), shape.kernels)
        V2 = Linv.T @ Linv
    out.append(V1)
    for off, L, q in zip(shape.offsets, shape.L[1:], shape.q[1:]):
        blk = V2[off:off + L * q, off:off + L * q].reshape(L, q, L, q)
        out.append(jnp.einsum("lilj->lij", blk))
    return out


# ---------------------------------------------------------------------------------------------
# Kenward-Roger's parts in closed form (small dense models)


def _factor_blocks(rows, blocks, shape):
    """F R for F = blockdiag_f (I_{L_f} ⊗ Φ_f) and R with q = L₁q₁ + m₂ rows (engine order).
    ``blocks``: each factor's Φ_f, q_f × q_f, or a stack (k, q_f, q_f) of k such F at once
    (then the result is (k, q, c))."""
    out, pos = [], 0
    for phi, L, q in zip(blocks, shape.L, shape.q):
        blk = rows[pos:pos + L * q].reshape(L, q, rows.shape[1])
        pos += L * q
        y = jnp.einsum("...ij,ljc->...lic", phi, blk)
        out.append(y.reshape(y.shape[:-3] + (L * q, rows.shape[1])))
    return jnp.concatenate(out, axis=-2)


def _dense_crossproducts(data, shape):
    """(A = ZᵀZ (q × q), B = ZᵀX̃ (q × p), X̃ᵀX̃) from the dense layout's blocks."""
    L1, q1, p, m2 = shape.L[0], shape.q[0], shape.p, shape.m2
    A = jnp.einsum("lij,lm->limj", data.D11, jnp.eye(L1, dtype=data.D11.dtype)).reshape(L1 * q1, L1 * q1)
    B = data.Z1W.reshape(L1 * q1, -1)[:, :p]
    if m2:
        A12 = data.A21.reshape(L1 * q1, m2)
        A = jnp.concatenate([jnp.concatenate([A, A12], axis=1), jnp.concatenate([A12.T, data.A22], axis=1)], axis=0)
        B = jnp.concatenate([B, data.Z2W[:, :p]], axis=0)
    return A, B, data.WW[:p, :p]


def kenward_roger_closed(gamma, data, shape):
    """(M, P (p × p × k), Q (p × p × k × k), IE2 (k × k)) of :func:`jaxmixed.engine.pls.kenward_roger_parts`
    at γ, in closed form for the dense layout: no derivative is traced, so the program is a few
    factorisations and products (cheap to compile; the autodiff program costs ~0.5 s of XLA
    compile and 0.2 s of tracing on a 3,000-row crossed model).

    With V = σ²I + ZDZᵀ, D = blockdiag_f(I ⊗ Σ_f) linear in γ, ∂V/∂γ_r = Z E_r Zᵀ for the
    random-effects parameters and I for σ² = γ_k. Since V⁻¹ = σ⁻²(I − V⁻¹ZDZᵀ), every sandwich
    V⁻¹(∂_rV)V⁻¹ is V⁻¹Z F_r ZᵀV⁻¹ + a_r V⁻¹ with (F_r, a_r) = (E_r, 0), and (−σ⁻²D, σ⁻²) for σ².
    With 𝒵 = ZᵀV⁻¹Z, U = ZᵀV⁻¹X̃ and M = X̃ᵀV⁻¹X̃ (Woodbury through ΛᵀZᵀZΛ + I, D = σ²ΛΛᵀ):
    ∂_rM = −(UᵀF_rU + a_rM); ∂_r∂_sM = T_rs + T_rsᵀ with T_rs = (F_rU)ᵀ𝒵(F_sU) + a_sUᵀF_rU +
    a_rUᵀF_sU + a_ra_sM; tr(V⁻¹∂_rV V⁻¹∂_sV) = tr(Y_rY_s) + a_s tr Y_r + a_r tr Y_s + a_ra_s n with
    Y_r = F_r𝒵; and IE2 = −∂_r∂_s(log|V| + log|M|) = tr(V⁻¹∂_rV V⁻¹∂_sV) − tr(M⁻¹∂_r∂_sM) +
    tr(M⁻¹∂_rM M⁻¹∂_sM). Λ_f is the Cholesky factor of Σ_f/σ², so γ must lie inside the cone
    (:func:`~jaxmixed.engine.pls.gamma_of` moves a boundary estimate 1e-9 inside, as for the
    autodiff path); nothing is differentiated through that factor, so the parts stay exact to
    rounding there, where the autodiff ones lose digits through the near-singular γ → θ map."""
    p = shape.p
    k = gamma.shape[0]
    s2 = gamma[-1]
    terms_of = [[t for t in shape.terms if t.factor == f] for f in range(len(shape.L))]

    def factor_matrix(f, g):  # Σ_f at γ = g (terms of factor f, block-diagonal in their columns)
        qf = shape.q[f]
        S = jnp.zeros((qf, qf), dtype=gamma.dtype)
        for t in terms_of[f]:
            a, b = t.cols
            S = S.at[a:b, a:b].set(t.structure.sigma_from_gamma(g[t.theta[0]:t.theta[1]]))
        return S

    sig = [factor_matrix(f, gamma) for f in range(len(shape.L))]
    lam_t = [jnp.linalg.cholesky(S / s2).T for S in sig]  # Λ_fᵀ of the relative factors, D = σ²ΛΛᵀ
    A, B, XX = _dense_crossproducts(data, shape)
    q = A.shape[0]
    AL = _factor_blocks(A, lam_t, shape).T  # A Λ (A symmetric: (Λᵀ A)ᵀ)
    K = _factor_blocks(AL, lam_t, shape) + jnp.eye(q, dtype=A.dtype)  # ΛᵀAΛ + I
    C = jnp.linalg.cholesky(K)
    solve = lambda R: jax.scipy.linalg.solve_triangular(C, R, lower=True)
    H = solve(AL.T)  # C⁻¹ΛᵀA
    h = solve(_factor_blocks(B, lam_t, shape))  # C⁻¹ΛᵀB
    Zs = (A - H.T @ H) / s2
    Zs = 0.5 * (Zs + Zs.T)
    U = (B - H.T @ h) / s2
    M = (XX - h.T @ h) / s2
    M = 0.5 * (M + M.T)

    # Φ_f (k, q_f, q_f): F_r's block on factor f for every r (E_r where γ_r belongs to one of
    # f's terms, −Σ_f/σ² for σ²), so that F_r R for all r is one product per factor
    eye_k = jnp.eye(k, dtype=gamma.dtype)
    phis = []
    for f in range(len(shape.L)):
        rows = [factor_matrix(f, eye_k[r]) if any(t.theta[0] <= r < t.theta[1] for t in terms_of[f])
                else jnp.zeros_like(sig[f]) for r in range(k - 1)]
        phis.append(jnp.stack(rows + [-sig[f] / s2]))
    a = jnp.zeros((k,), dtype=gamma.dtype).at[k - 1].set(1.0 / s2)
    FU = _factor_blocks(U, phis, shape)  # (k, q, p): F_r U
    Y = _factor_blocks(Zs, phis, shape)  # (k, q, q): F_r 𝒵
    UFU = jnp.einsum("qa,kqb->kab", U, FU)
    P = -(UFU + a[:, None, None] * M)
    T = (jnp.einsum("rqa,qc,scb->rsab", FU, Zs, FU) + a[None, :, None, None] * UFU[:, None]
         + a[:, None, None, None] * UFU[None, :] + (a[:, None] * a[None, :])[:, :, None, None] * M)
    Q = T + jnp.swapaxes(T, -1, -2)
    trY = jnp.einsum("kii->k", Y)
    trVV = (jnp.einsum("rij,sji->rs", Y, Y) + a[None, :] * trY[:, None] + a[:, None] * trY[None, :]
            + a[:, None] * a[None, :] * data.n)
    CM = jnp.linalg.cholesky(M)
    Minv = jax.scipy.linalg.cho_solve((CM, True), jnp.eye(p, dtype=M.dtype))
    Minv = 0.5 * (Minv + Minv.T)
    MP = jnp.einsum("ab,kbc->kac", Minv, P)
    IE2 = trVV - jnp.einsum("ab,rsba->rs", Minv, Q) + jnp.einsum("rab,sba->rs", MP, MP)
    Pm = jnp.moveaxis(P, 0, -1)
    Qm = jnp.moveaxis(Q, (0, 1), (-2, -1))
    return M, Pm, Qm, 0.5 * (IE2 + IE2.T)
