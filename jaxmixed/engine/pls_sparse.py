"""The blocked sparse engine: any mix of nested and crossed factors at real size.

Notation as in :mod:`jaxmixed.engine.pls`. The first factor (most levels) has L₁ levels with
q₁ × q₁ diagonal blocks of ZᵀZ; every other ("rest") factor's columns form the Schur complement

    S = I + Λ₂ᵀ (A₂₂ − Σ_ℓ A₂₁,ℓᵀ G_ℓ A₂₁,ℓ) Λ₂,    G_ℓ = Λ₁ (Λ₁ᵀ D_ℓ Λ₁ + I)⁻¹ Λ₁ᵀ,

where A₂₁,ℓ is the (sparse) block of Z₁ᵀZ₂ for level ℓ. Everything here is fixed by the design
and precomputed once (numpy): the non-zero *entries* of A₂₁ (level ℓ, rest column c, a q₁-vector)
and, for every level ℓ, the pairs of its entries, each with the position of the element of S it
updates. So the update above is one weighted pair sum (gather G at the pair's level, multiply,
scatter-add into S), and no L₁q₁ × m₂ matrix is ever formed.

**Panels.** The rest columns split into independent *panels*: the connected components of the
graph in which two rest levels are joined when they share a level of the first factor or occur
in the same row. S is block-diagonal over panels, so each panel gets its own dense Cholesky:
crossed factors (InstEval: lecturers d and departments) give one dense panel, nested factors
(classes in schools, schools in districts) give one small panel per top-level group. Panels are
padded to a common size within size buckets (sizes within a factor 2) and the Cholesky is
vmapped over each bucket; padded rows are identity rows and change nothing.

**Derivatives.** The dense panel part enters the deviance only through
F(S, C) = (log|S|, CᵀS⁻¹C) (C: the panel's right-hand sides [X y]). Its derivative is given by
hand (the textbook formulas, with one S⁻¹ per evaluation),

    d log|S| = tr(S⁻¹ dS),   d(CᵀS⁻¹C) = dCᵀX + XᵀdC − Xᵀ dS X,   X = S⁻¹C,

as a ``custom_jvp``, which JAX transposes for reverse mode; S⁻¹'s own derivative −S⁻¹ dS S⁻¹ is a
second ``custom_jvp``, so Hessians (Newton, inference) stay exact. The rest is plain JAX.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmixed.engine import kernels as xla

class Sparse21(NamedTuple):
    """The precomputed pattern and values of the blocked engine (arrays, jit arguments)."""

    lev: jnp.ndarray  # (nnz,) int32: first-factor level of each A₂₁ entry
    slot: jnp.ndarray  # (nnz,) int32: panel slot of its rest column
    nat: jnp.ndarray  # (nnz,) int32: its rest column in natural (Z₂W) order
    V: jnp.ndarray  # (nnz, q₁): the entry's values (Z₁ᵀ Z₂ for that level and column)
    pair_lev: jnp.ndarray  # (npairs,) int32: level of the pair
    pair_tgt: jnp.ndarray  # (npairs,) int32: flat position (lower triangle) it updates, sorted
    pair_coef: jnp.ndarray  # (npairs, q₁, q₁): V[e] V[e']ᵀ
    pair_diag: jnp.ndarray  # (npairs,) bool: e == e'
    slot_nat: jnp.ndarray  # (n_slots,) int32: natural column of each slot (m₂ for padding)
    nat_slot: jnp.ndarray  # (m₂,) int32
    slot_base: jnp.ndarray  # (n_slots,) int32: flat offset of the slot's panel
    slot_local: jnp.ndarray  # (n_slots,) int32: position inside the panel
    slot_P: jnp.ndarray  # (n_slots,) int32: padded size of the slot's panel
    lam_idx: jnp.ndarray  # (n_slots, qmax) int32: Λ_f[b, a] in the Λ table (Λ₂ᵀ side)
    lam_idx_t: jnp.ndarray  # (n_slots, qmax) int32: Λ_f[a, b] (Λ₂ side)
    sib: jnp.ndarray  # (n_slots, qmax) int32: local slot of component b of the same level


# ---------------------------------------------------------------------------------------------
# building the arrays (numpy)


def sparse_arrays(shape, pat, blockvals: list, xvals: dict, diagvals: list, pairs: bool = False):
    """Sparse21 and the flat lower-triangular panel storage of A₂₂ from accumulated block values
    (and, with ``pairs``, the two entries (e, e') of each pair, numpy, in Sparse21's pair order).

    blockvals[k]: (n_blocks_k, q₁, q_k) values of the A₂₁ blocks of rest factor k;
    xvals[(a, b)]: (n_cross, q_a, q_b) blocks of Z_aᵀZ_b; diagvals[k]: (L_k, q_k, q_k)."""
    rest = [_Factor(L, q) for L, q in zip(shape.L[1:], shape.q[1:])]
    lay = pat.layout
    q1, L1 = shape.q[0], shape.L[0]
    offs = np.cumsum([0] + [f.n_levels * f.q for f in rest])
    m2 = int(offs[-1])
    slot_of_nat = pat.slot_of_nat
    # per-slot panel geometry
    slot_base = np.zeros(lay.n_slots, dtype=np.int64)
    slot_local = np.zeros(lay.n_slots, dtype=np.int64)
    slot_P = np.ones(lay.n_slots, dtype=np.int64)
    for b in lay.buckets:
        s = np.arange(b.n * b.P)
        slot_base[b.slot0 + s] = b.flat0 + (s // b.P) * b.P * b.P
        slot_local[b.slot0 + s] = s % b.P
        slot_P[b.slot0 + s] = b.P

    row_start = slot_base + slot_local * slot_P  # flat index of each slot's row in its panel

    def flat(sa, sb):
        return row_start[np.maximum(sa, sb)] + slot_local[np.minimum(sa, sb)]

    # entries of A₂₁ (element level), sorted by (level, slot)
    lev_l, nat_l, val_l = [], [], []
    for k, f in enumerate(rest):
        lev, j = pat.blk_lev[k], pat.blk_j[k]
        for a in range(f.q):
            lev_l.append(lev)
            nat_l.append(offs[k] + j * f.q + a)
            val_l.append(blockvals[k][:, :, a])
    lev = np.concatenate(lev_l)
    nat = np.concatenate(nat_l)
    V = np.concatenate(val_l, axis=0)
    slot = slot_of_nat[nat]
    order = np.lexsort((slot, lev))
    lev, nat, V, slot = lev[order], nat[order], V[order], slot[order]
    # pairs within each level: e ≥ e' inside the level's run (so slot[e] ≥ slot[e'])
    counts = np.bincount(lev, minlength=L1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ea_l, eb_l = [], []
    for k in np.unique(counts):
        if k == 0:
            continue
        s = starts[counts == k]
        ii, jj = np.tril_indices(int(k))
        ea_l.append((s[:, None] + ii[None, :]).ravel())
        eb_l.append((s[:, None] + jj[None, :]).ravel())
    # 32-bit indices where they fit: the gathers and reorders over the (millions of) pairs move
    # half the bytes (InstEval, 1.8M pairs: ≈ 0.1 s a fit)
    small = max(len(lev), lay.n_flat) < np.iinfo(np.int32).max
    it = np.int32 if small else np.int64
    ea = np.concatenate(ea_l).astype(it, copy=False)
    eb = np.concatenate(eb_l).astype(it, copy=False)
    slot_i, row_i, local_i = slot.astype(it), row_start.astype(it), slot_local.astype(it)
    tgt = row_i[slot_i[ea]] + local_i[slot_i[eb]]  # = flat(...): slot[ea] ≥ slot[eb] here
    porder = np.argsort(tgt, kind="stable")  # timsort: the targets come in sorted runs
    ea, eb, tgt = ea[porder], eb[porder], tgt[porder]
    coef = V[ea][:, :, None] * V[eb][:, None, :]
    # A₂₂ in panel storage (lower triangle)
    A22 = np.zeros(lay.n_flat)
    for k, f in enumerate(rest):
        c = offs[k] + np.arange(f.n_levels)[:, None, None] * f.q
        ca = (c + np.arange(f.q)[None, :, None]).repeat(f.q, axis=2)
        cb = (c + np.arange(f.q)[None, None, :]).repeat(f.q, axis=1)
        keep = (slot_of_nat[ca] >= slot_of_nat[cb])
        np.add.at(A22, flat(slot_of_nat[ca][keep], slot_of_nat[cb][keep]), diagvals[k][keep])
    for (a, b), (ja, jb) in pat.x_j.items():
        fa, fb = rest[a], rest[b]
        ca = offs[a] + ja[:, None, None] * fa.q + np.arange(fa.q)[None, :, None]
        cb = offs[b] + jb[:, None, None] * fb.q + np.arange(fb.q)[None, None, :]
        ca, cb = np.broadcast_arrays(ca, cb)
        np.add.at(A22, flat(slot_of_nat[ca].ravel(), slot_of_nat[cb].ravel()), xvals[(a, b)].ravel())
    # Λ₂ coefficients per slot
    qmax = lay.qmax
    lam_off = np.cumsum([0] + [f.q * f.q for f in rest])
    zero = int(lam_off[-1])
    slot_nat = np.full(lay.n_slots, m2, dtype=np.int64)
    slot_nat[slot_of_nat] = np.arange(m2)
    lam_idx = np.full((lay.n_slots, qmax), zero, dtype=np.int64)
    lam_idx_t = np.full((lay.n_slots, qmax), zero, dtype=np.int64)
    sib = np.repeat(slot_local[:, None], qmax, axis=1)
    for k, f in enumerate(rest):
        cols = offs[k] + np.arange(f.n_levels * f.q)
        s = slot_of_nat[cols]
        comp = np.arange(f.n_levels * f.q) % f.q
        for b_ in range(f.q):
            lam_idx[s, b_] = lam_off[k] + b_ * f.q + comp  # Λ_f[b, a]
            lam_idx_t[s, b_] = lam_off[k] + comp * f.q + b_  # Λ_f[a, b]
            sib[s, b_] = slot_local[s] - comp + b_
    # device_put, not jnp.asarray: no one-operation program per shape (5–15 ms each, fresh process)
    from jaxmixed.runtime.devices import host_array as f64

    i32 = partial(f64, dtype=np.int32)
    sx = Sparse21(lev=i32(lev), slot=i32(slot), nat=i32(nat), V=f64(V), pair_lev=i32(lev[ea]),
                  pair_tgt=i32(tgt), pair_coef=f64(coef), pair_diag=jax.device_put(ea == eb),
                  slot_nat=i32(slot_nat), nat_slot=i32(slot_of_nat), slot_base=i32(slot_base),
                  slot_local=i32(slot_local), slot_P=i32(slot_P), lam_idx=i32(lam_idx),
                  lam_idx_t=i32(lam_idx_t), sib=i32(sib))
    if pairs:
        return sx, f64(A22), ea, eb
    return sx, f64(A22)


# ---------------------------------------------------------------------------------------------
# differentiable primitives with hand-written derivatives


class _Factor(NamedTuple):
    n_levels: int
    q: int


def _lapack(L, policy) -> bool:
    """LAPACK (fast for one large matrix) only for a single panel larger than the unrolled
    size, and not under the "xla" kernel policy; batches of small blocks use plain XLA ops
    (jaxlib's batched CPU LAPACK calls can wedge their thread pool: :mod:`jaxmixed.engine.kernels`)."""
    return policy != "xla" and L.ndim == 3 and L.shape[0] == 1 and L.shape[-1] > xla.UNROLL_MAX


def _chol(S, policy):
    """Cholesky factor(s) of the symmetric panel(s) S. LAPACK is handed Sᵀ, the same matrix up to
    round-off, whose row-major entries are the column-major layout LAPACK reads: XLA then passes
    the panel as it is instead of transposing a copy of it (InstEval: 10 ms an evaluation)."""
    if _lapack(S, policy):
        return lax.linalg.cholesky(jnp.swapaxes(S, -1, -2), symmetrize_input=False)
    return xla.cholesky(S)


def _solve(L, B, transpose=False, policy="lapack"):
    """L⁻¹B (or L⁻ᵀB) for lower-triangular L, batched."""
    if _lapack(L, policy):
        return lax.linalg.triangular_solve(L, B, left_side=True, lower=True, transpose_a=transpose)
    return xla.solve_lower_t(L, B) if transpose else xla.solve_lower(L, B)


INV_BASE = 128  # order below which the recursive inverse hands a block to LAPACK's trsm


def _tri_inv(L):
    """L⁻¹ for one lower-triangular matrix by 2×2 block recursion: [[X₁₁, 0], [−X₂₂L₂₁X₁₁, X₂₂]].

    About ½n³ flops, most of them in matrix products, against n³ for a triangular solve with the
    identity as right-hand side (which cannot skip the zeros of either factor)."""
    n = L.shape[-1]
    if n <= INV_BASE:
        return lax.linalg.triangular_solve(L, jnp.eye(n, dtype=L.dtype), left_side=True, lower=True)
    h = n // 2
    X11, X22 = _tri_inv(L[:h, :h]), _tri_inv(L[h:, h:])
    X21 = -(X22 @ (L[h:, :h] @ X11))
    return jnp.block([[X11, jnp.zeros((h, n - h), L.dtype)], [X21, X22]])


def _gram_lower(X):
    """XᵀX for lower-triangular X by the same block recursion (LAPACK's lauum, ⅔n³ flops
    instead of 2n³)."""
    n = X.shape[-1]
    if n <= INV_BASE:
        return X.T @ X
    h = n // 2
    X21, X22 = X[h:, :h], X[h:, h:]
    S11 = _gram_lower(X[:h, :h]) + X21.T @ X21
    S21 = X22.T @ X21
    return jnp.block([[S11, S21.T], [S21, _gram_lower(X22)]])


def _inv_from_chol(L, policy):
    """S⁻¹ = L⁻ᵀL⁻¹ from the Cholesky factor(s) L. One large panel (InstEval's 1,142 columns)
    goes through the block recursions above, ~3× faster than a solve with the identity and a
    full product; batches of small blocks through plain XLA ops."""
    if _lapack(L, policy):
        return _gram_lower(_tri_inv(L[0]))[None]
    n = L.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(n, dtype=L.dtype), L.shape)
    Li = _solve(L, eye, policy=policy)
    return jnp.einsum("...ki,...kj->...ij", Li, Li)


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def spd_inverse(S, L, policy="lapack"):
    """S⁻¹ for S = LLᵀ (L its Cholesky factor, passed so it is not recomputed).

    d(S⁻¹) = −S⁻¹ dS S⁻¹ (L's tangent is ignored: L is a function of S)."""
    return _inv_from_chol(L, policy)


@spd_inverse.defjvp
def _spd_inverse_jvp(policy, primals, tangents):
    S, L = primals
    dS, _ = tangents
    Si = spd_inverse(S, L, policy)
    return Si, -(Si @ dS @ Si)


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def logdet_spd(S, L, policy="lapack"):
    """Σ_b log|S_b| from the Cholesky factors L; d log|S| = tr(S⁻¹ dS) (L's tangent ignored)."""
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)))


@logdet_spd.defjvp
def _logdet_spd_jvp(policy, primals, tangents):
    S, L = primals
    dS, _ = tangents
    return logdet_spd(S, L, policy), jnp.sum(spd_inverse(S, L, policy) * dS)


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def logdet_quad(S, C, policy="lapack"):
    """(Σ_b log|S_b|, Σ_b C_bᵀ S_b⁻¹ C_b) over a batch of SPD panels S (n, P, P), C (n, P, r)."""
    L = _chol(S, policy)
    z = _solve(L, C, policy=policy)
    ld = 2.0 * jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)))
    return ld, jnp.einsum("bpi,bpj->ij", z, z)


@logdet_quad.defjvp
def _logdet_quad_jvp(policy, primals, tangents):
    """d log|S| = tr(S⁻¹dS), d(CᵀS⁻¹C) = dCᵀX + XᵀdC − XᵀdS X with X = S⁻¹C.

    Everything here is written through S⁻¹ (``spd_inverse``) and ``logdet_spd``, whose own
    derivatives are the textbook ones, and L is a constant for differentiation: a second
    derivative (Newton, the η-Hessian of inference) then costs two matrix products per
    direction (−S⁻¹ dS S⁻¹), not the Cholesky's own derivative (two triangular solves more)."""
    S, C = primals
    dS, dC = tangents
    L = lax.stop_gradient(_chol(S, policy))
    Si = spd_inverse(S, L, policy)
    X = Si @ C
    ld = logdet_spd(S, L, policy)
    Q = jnp.einsum("bpi,bpj->ij", C, X)
    Q = 0.5 * (Q + Q.T)
    dld = jnp.sum(Si * dS)
    XdC = jnp.einsum("bpi,bpj->ij", X, dC)
    dQ = XdC + XdC.T - jnp.einsum("bpi,bpq,bqj->ij", X, dS, X)
    return (ld, Q), (dld, dQ)


# ---------------------------------------------------------------------------------------------
# the evaluation (JAX)


def _lam_table(lams):
    parts = [lam.ravel() for lam in lams[1:]]
    return jnp.concatenate(parts + [jnp.zeros(1, dtype=parts[0].dtype)])


def _scale_panels(A, coef, sib, scalar: bool):
    """Λ₂ᵀ A Λ₂ on a batch of panels: coef[n, c, b] = Λ_f[b, a(c)], sib the local slots."""
    if scalar:
        s = coef[..., 0]
        return A * s[:, :, None] * s[:, None, :]

    def one(A, coef, sib):
        T = jnp.einsum("xdb,db->xd", A[:, sib], coef)
        return jnp.einsum("cb,cbd->cd", coef, T[sib, :])

    return jax.vmap(one)(A, coef, sib)


def _scale_rows(C, coef, sib, scalar: bool):
    """Λ₂ᵀ C for a batch of panel right-hand sides C (n, P, r)."""
    if scalar:
        return C * coef[..., 0][..., None]
    return jax.vmap(lambda C, cf, sb: jnp.einsum("cb,cbr->cr", cf, C[sb]))(C, coef, sib)


def _symmetric(A):
    """Lower-triangular panels → symmetric (the lower triangle, mirrored)."""
    n = A.shape[-1]
    lower = lax.broadcasted_iota(jnp.int32, (n, n), 0) >= lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return jnp.where(lower, A, jnp.swapaxes(A, -1, -2))


class Prepared(NamedTuple):
    L1: jnp.ndarray  # (L₁, q₁, q₁)
    K: jnp.ndarray  # (L₁, q₁, q₁) = L₁⁻¹ Λ₁ᵀ
    ld1: jnp.ndarray  # Σ log|C₁ℓ|
    M1: jnp.ndarray  # WᵀW − r₁ᵀr₁
    S: tuple  # per bucket (n, P, P)
    C: tuple  # per bucket (n, P, p+1)


def prepare(theta, data, shape, lams) -> Prepared:
    """First-factor elimination and the panel systems S, C at θ (see the module docstring)."""
    lay = shape.layout
    sx: Sparse21 = data.A21
    lam1 = lams[0]
    q1 = shape.q[0]
    C1 = jnp.einsum("ji,ljk,kh->lih", lam1, data.D11, lam1) + jnp.eye(q1)
    L1 = xla.cholesky(C1)
    K = xla.solve_lower(L1, jnp.broadcast_to(lam1.T, C1.shape))
    G = jnp.einsum("lki,lkj->lij", K, K)  # Λ₁ C₁⁻¹ Λ₁ᵀ
    H = G @ data.Z1W  # (L₁, q₁, p+1)
    ld1 = 2.0 * jnp.sum(jnp.log(jnp.diagonal(L1, axis1=1, axis2=2)))
    M1 = data.WW - jnp.einsum("lir,lis->rs", data.Z1W, H)
    if q1 == 1:
        vals = G[sx.pair_lev, 0, 0] * sx.pair_coef[:, 0, 0]
        upd = (sx.V[:, 0][:, None]) * H[sx.lev, 0, :]
    else:
        vals = jnp.einsum("pij,pij->p", G[sx.pair_lev], sx.pair_coef)
        upd = jnp.einsum("ei,eir->er", sx.V, H[sx.lev])
    A = data.A22 - jax.ops.segment_sum(vals, sx.pair_tgt, lay.n_flat, indices_are_sorted=True)
    Z2W = jnp.concatenate([data.Z2W, jnp.zeros((1, data.Z2W.shape[1]), data.Z2W.dtype)])
    ct = Z2W[sx.slot_nat] - jax.ops.segment_sum(upd, sx.slot, lay.n_slots)
    coef = _lam_table(lams)[sx.lam_idx]
    S, C = [], []
    for b in lay.buckets:
        Ab = _symmetric(A[b.flat0:b.flat0 + b.n * b.P * b.P].reshape(b.n, b.P, b.P))
        sl = slice(b.slot0, b.slot0 + b.n * b.P)
        cf = coef[sl].reshape(b.n, b.P, -1)
        sb = sx.sib[sl].reshape(b.n, b.P, -1)
        S.append(_scale_panels(Ab, cf, sb, lay.scalar_rest) + jnp.eye(b.P))
        C.append(_scale_rows(ct[sl].reshape(b.n, b.P, -1), cf, sb, lay.scalar_rest))
    return Prepared(L1, K, ld1, M1, tuple(S), tuple(C))


def fixed_factor(theta, data, shape, lams):
    """(log|L|², LM): the random part's log-determinant and the lower Cholesky factor of the
    fixed-effects Schur complement [X y]ᵀ(I − ZΛ(LLᵀ)⁻¹ΛᵀZᵀ)[X y] at θ."""
    pr = prepare(theta, data, shape, lams)
    ld, M = pr.ld1, pr.M1
    for S, C in zip(pr.S, pr.C):
        l2, Q = logdet_quad(S, C, shape.kernels)
        ld = ld + l2
        M = M - Q
    return ld, xla.cholesky(M)


def deviance_parts(theta, data, shape, lams):
    """(log|L|², log|R_X|², r²) at θ through the blocked engine."""
    ld, LM = fixed_factor(theta, data, shape, lams)
    p = shape.p
    d = jnp.diagonal(LM)
    logdet_RX = 2.0 * jnp.sum(jnp.log(jnp.maximum(d[:p], 1e-300)))
    return ld, logdet_RX, LM[p, p] ** 2


def solve_parts(theta, data, shape, lams, beta_of):
    """Back-substitution: returns (LM, u1, u2 natural order) given ``beta_of(LM) -> β``."""
    lay = shape.layout
    sx: Sparse21 = data.A21
    pr = prepare(theta, data, shape, lams)
    Ls = [_chol(S, shape.kernels) for S in pr.S]
    zs = [_solve(L, C, policy=shape.kernels) for L, C in zip(Ls, pr.C)]
    M = pr.M1
    for z in zs:
        M = M - jnp.einsum("bpi,bpj->ij", z, z)
    LM = xla.cholesky(M)
    beta = beta_of(LM)
    p = shape.p
    u_slots = []
    for L, z in zip(Ls, zs):
        rhs = z[..., p] - z[..., :p] @ beta
        u = _solve(L, rhs[..., None], transpose=True, policy=shape.kernels)
        u_slots.append(u[..., 0].reshape(-1))
    u2 = jnp.concatenate(u_slots)[sx.nat_slot]
    b2 = _lambda_rest(u2, lams, shape)  # then Wᵀu₂ per first-factor level
    Bu = jax.ops.segment_sum(sx.V * b2[sx.nat][:, None], sx.lev, shape.L[0], indices_are_sorted=True)
    lam1 = lams[0]
    c1 = jnp.einsum("ji,ljr->lir", lam1, data.Z1W)
    r1 = xla.solve_lower(pr.L1, c1)
    rhs1 = r1[..., p] - r1[..., :p] @ beta
    Wu = xla.solve_lower(pr.L1, (Bu @ lam1)[..., None])[..., 0]
    u1 = xla.solve_lower_t(pr.L1, (rhs1 - Wu)[..., None])[..., 0]
    return LM, beta, u1, u2


def _lambda_rest(u2, lams, shape):
    """b₂ = Λ₂u₂ for the rest columns in natural order (per rest factor, level by level)."""
    parts, off = [], 0
    for lam, L, q in zip(lams[1:], shape.L[1:], shape.q[1:]):
        parts.append((u2[off:off + L * q].reshape(L, q) @ lam.T).reshape(-1))
        off += L * q
    return jnp.concatenate(parts)


def conditional_blocks(theta, data, shape, lams):
    """Diagonal blocks of (LLᵀ)⁻¹ (spherical u): first factor (L₁, q₁, q₁), then per rest factor."""
    lay = shape.layout
    sx: Sparse21 = data.A21
    pr = prepare(theta, data, shape, lams)
    coef_t = _lam_table(lams)[sx.lam_idx_t]
    Rflat = []
    for S, b in zip(pr.S, lay.buckets):
        Si = _inv_from_chol(_chol(S, shape.kernels), shape.kernels)
        sl = slice(b.slot0, b.slot0 + b.n * b.P)
        R = _scale_panels(Si, coef_t[sl].reshape(b.n, b.P, -1), sx.sib[sl].reshape(b.n, b.P, -1),
                          lay.scalar_rest)  # Λ₂ S⁻¹ Λ₂ᵀ
        Rflat.append(Si.reshape(-1))
        Rflat.append(R.reshape(-1))
    Si_flat = jnp.concatenate(Rflat[0::2])
    R_flat = jnp.concatenate(Rflat[1::2])
    q1 = shape.q[0]
    # Σ_{e,e' ∈ ℓ} V[e] R[c_e, c_e'] V[e']ᵀ from the lower-triangular pairs
    Rp = R_flat[sx.pair_tgt]
    sym = sx.pair_coef + jnp.swapaxes(sx.pair_coef, 1, 2)
    contrib = Rp[:, None, None] * jnp.where(sx.pair_diag[:, None, None], 0.5 * sym, sym)
    BSB = jax.ops.segment_sum(contrib, sx.pair_lev, shape.L[0])  # A₂₁ℓ R A₂₁ℓᵀ
    C1inv = jnp.einsum("lki,lkj->lij", *(2 * [xla.solve_lower(pr.L1, jnp.broadcast_to(jnp.eye(q1), pr.L1.shape))]))
    lam1 = lams[0]
    T = C1inv @ (lam1.T @ BSB @ lam1) @ C1inv
    out = [C1inv + T]
    off = 0
    for L, q in zip(shape.L[1:], shape.q[1:]):
        s = sx.nat_slot[off:off + L * q].reshape(L, q)
        idx = sx.slot_base[s[:, :, None]] + sx.slot_local[s[:, :, None]] * sx.slot_P[s[:, :, None]] \
            + sx.slot_local[s[:, None, :]]
        out.append(Si_flat[idx])
        off += L * q
    return out


# ---------------------------------------------------------------------------------------------
# weighted systems: ΛᵀZᵀWZΛ + I with weights that change every step (a GLMM's PIRLS)


class WeightedRows(NamedTuple):
    """Where each row's weighted products land in the blocked layout, fixed by the design
    (device arrays; built once by :func:`weighted_rows`). A row's *rest components* are its
    rest factors' Z values side by side, (Σ_k q_k) of them."""

    entry: jnp.ndarray  # (n, Σq_k) int32: the A₂₁ entry (level of factor 1, rest column) of each
    a22: jnp.ndarray  # (n, n_cpairs) int32: flat panel position of each pair of rest components
    pair_a: jnp.ndarray  # (npairs,) int32: first entry of each pair (pair_coef = V[a] V[b]ᵀ)
    pair_b: jnp.ndarray  # (npairs,) int32
    base: Sparse21  # the pattern; its V and pair_coef come from the weights each step


class WeightedSystem(NamedTuple):
    """The arrays :func:`prepare` and :func:`conditional_blocks` read, for ΛᵀZᵀWZΛ + I alone
    (no fixed effects or response: Z1W, Z2W and WW are zero with one column)."""

    D11: jnp.ndarray
    A21: Sparse21
    A22: jnp.ndarray
    Z1W: jnp.ndarray
    Z2W: jnp.ndarray
    WW: jnp.ndarray


def component_pairs(shape) -> tuple:
    """(a, b) index pairs into a row's rest components whose product enters A₂₂ once each: the
    lower triangle (diagonal included) of each rest factor's own q × q block, and every pair
    of components of two different rest factors (static: from the shape)."""
    offs = np.cumsum([0] + list(shape.q[1:]))
    out = []
    for k, q in enumerate(shape.q[1:]):
        out += [(offs[k] + a, offs[k] + b) for a in range(q) for b in range(a + 1)]
        for k2 in range(k + 1, len(shape.q) - 1):
            out += [(offs[k2] + b, offs[k] + a) for a in range(q) for b in range(shape.q[k2 + 1])]
    return tuple((int(a), int(b)) for a, b in out)


def weighted_rows(shape, pat, codes) -> WeightedRows:
    """:class:`WeightedRows` of a design (numpy, once): ``codes`` per factor (n,), engine order."""
    from jaxmixed.runtime.devices import host_array

    rest = list(zip(shape.L[1:], shape.q[1:]))
    lay = shape.layout
    zeros = [np.zeros((len(lev), shape.q[0], q)) for lev, (_, q) in zip(pat.blk_lev, rest)]
    xz = {(a, b): np.zeros((len(ja), shape.q[a + 1], shape.q[b + 1])) for (a, b), (ja, _) in pat.x_j.items()}
    dz = [np.zeros((L, q, q)) for L, q in rest]
    sx, _, ea, eb = sparse_arrays(shape, pat, zeros, xz, dz, pairs=True)
    slot_of_nat = pat.slot_of_nat
    offs = np.cumsum([0] + [L * q for L, q in rest])
    c0 = np.asarray(codes[0], dtype=np.int64)
    nat = np.concatenate([offs[k] + np.asarray(codes[k + 1], dtype=np.int64)[:, None] * q + np.arange(q)[None, :]
                          for k, (_, q) in enumerate(rest)], axis=1)  # (n, Σq_k)
    slots = slot_of_nat[nat]
    keys = np.asarray(sx.lev).astype(np.int64) * lay.n_slots + np.asarray(sx.slot)
    entry = np.searchsorted(keys, c0[:, None] * lay.n_slots + slots)
    base_, local, P = (np.asarray(a, dtype=np.int64) for a in (sx.slot_base, sx.slot_local, sx.slot_P))
    row_start = base_ + local * P
    cp = np.array(component_pairs(shape), dtype=np.int64).reshape(-1, 2)
    sa, sb = slots[:, cp[:, 0]], slots[:, cp[:, 1]]
    a22 = row_start[np.maximum(sa, sb)] + local[np.minimum(sa, sb)]
    i32 = partial(host_array, dtype=np.int32)
    small = sx._replace(V=host_array(np.zeros((0, shape.q[0]))),
                        pair_coef=host_array(np.zeros((0, shape.q[0], shape.q[0]))))
    return WeightedRows(entry=i32(entry), a22=i32(a22), pair_a=i32(ea), pair_b=i32(eb), base=small)


def weighted_system(rows: WeightedRows, codes, Z, weights, shape) -> WeightedSystem:
    """ZᵀWZ in the blocked layout for row weights W (traced: one pass over the rows, scatter-
    adds into the level blocks, the A₂₁ entries and the panels; then the pairs' products)."""
    lay = shape.layout
    L1, q1 = shape.L[0], shape.q[0]
    Z1 = Z[0]
    wz1 = weights[:, None] * Z1
    D11 = jax.ops.segment_sum(wz1[:, :, None] * Z1[:, None, :], codes[0], num_segments=L1)
    R = jnp.concatenate(list(Z[1:]), axis=1)  # (n, Σq_k) rest components
    n_entries = rows.base.lev.shape[0]
    V = jax.ops.segment_sum((R[:, :, None] * wz1[:, None, :]).reshape(-1, q1), rows.entry.reshape(-1),
                            num_segments=n_entries)
    cp = np.array(component_pairs(shape)).reshape(-1, 2)
    A22 = jax.ops.segment_sum((weights[:, None] * R[:, cp[:, 0]] * R[:, cp[:, 1]]).reshape(-1),
                              rows.a22.reshape(-1), num_segments=lay.n_flat)
    coef = V[rows.pair_a][:, :, None] * V[rows.pair_b][:, None, :]
    sx = rows.base._replace(V=V, pair_coef=coef)
    dt = Z1.dtype
    return WeightedSystem(D11=D11, A21=sx, A22=A22, Z1W=jnp.zeros((L1, q1, 1), dt),
                          Z2W=jnp.zeros((shape.m2, 1), dt), WW=jnp.zeros((1, 1), dt))


class RandomFactor(NamedTuple):
    """The blocked factor of ΛᵀZᵀWZΛ + I: the first factor's level blocks and the panels' Cholesky
    factors of the Schur complement S (module docstring), with what a solve needs."""

    L1: jnp.ndarray  # (L₁, q₁, q₁)
    Ls: tuple  # per bucket (n, P, P)
    logdet: jnp.ndarray  # log|ΛᵀZᵀWZΛ + I|
    A21: Sparse21  # the weighted entries
    coef: jnp.ndarray  # (n_slots, qmax): Λ₂ᵀ's coefficients per slot
    lams: tuple  # Λ_f per factor


def factorize_random(data: WeightedSystem, shape, lams) -> RandomFactor:
    """The blocked Cholesky factor of ΛᵀZᵀWZΛ + I (``data`` from :func:`weighted_system`). The
    log-determinant's derivative is tr(S⁻¹ dS) per panel (:func:`logdet_spd`)."""
    pr = prepare(None, data, shape, lams)
    Ls = tuple(_chol(S, shape.kernels) for S in pr.S)
    logdet = pr.ld1
    for S, L in zip(pr.S, Ls):
        logdet = logdet + logdet_spd(S, L, shape.kernels)
    coef = _lam_table(lams)[data.A21.lam_idx]
    return RandomFactor(pr.L1, Ls, logdet, data.A21, coef, tuple(lams))


def solve_random(f: RandomFactor, r1, r2, shape):
    """(x₁, x₂) with (ΛᵀZᵀWZΛ + I)[x₁; x₂] = [r₁; r₂], r₁ (L₁, q₁), r₂ (m₂,) natural order: the
    first factor's blocks eliminated, the panels solved, then back-substitution."""
    lay = shape.layout
    sx = f.A21
    L1 = shape.L[0]
    y1 = xla.solve_lower_t(f.L1, xla.solve_lower(f.L1, r1[..., None]))[..., 0]  # C₁⁻¹ r₁
    lams = f.lams
    t = y1 @ lams[0].T  # Λ₁ C₁⁻¹ r₁ per level
    a = jax.ops.segment_sum(jnp.sum(sx.V * t[sx.lev], axis=1), sx.slot, lay.n_slots)
    g = jnp.concatenate([r2, jnp.zeros((1,), r2.dtype)])[sx.slot_nat]
    x_slots = []
    for L, b in zip(f.Ls, lay.buckets):
        sl = slice(b.slot0, b.slot0 + b.n * b.P)
        cf = f.coef[sl].reshape(b.n, b.P, -1)
        sb = sx.sib[sl].reshape(b.n, b.P, -1)
        rhs = g[sl].reshape(b.n, b.P, 1) - _scale_rows(a[sl].reshape(b.n, b.P, 1), cf, sb, lay.scalar_rest)
        z = _solve(L, rhs, policy=shape.kernels)
        x_slots.append(_solve(L, z, transpose=True, policy=shape.kernels)[..., 0].reshape(-1))
    x2 = jnp.concatenate(x_slots)[sx.nat_slot]
    b2 = _lambda_rest(x2, lams, shape)
    Bu = jax.ops.segment_sum(sx.V * b2[sx.nat][:, None], sx.lev, L1, indices_are_sorted=True)
    x1 = xla.solve_lower_t(f.L1, xla.solve_lower(f.L1, (r1 - Bu @ lams[0])[..., None]))[..., 0]
    return x1, x2
