"""Linear-algebra kernels of the likelihood engines: Cholesky factors and triangular solves.

Two implementations, chosen per call by a static *kernel policy* (a field of the model's shape,
:class:`KernelPolicy`, so that the choice is part of what ``jit`` specialises on, and every
``custom_jvp`` rule of the engines stays in place):

- plain XLA operations (:func:`cholesky_xla`, :func:`triangular_solve_xla`): fully unrolled for
  orders ≤ ``UNROLL_MAX``, a column loop otherwise. XLA fuses the unrolled forms, far faster
  than one LAPACK call per tiny block, and they never call LAPACK: jaxlib 0.10's batched CPU
  LAPACK kernels run on a small shared thread pool and can wedge it when several run at once
  (seen here on 2 cores in the per-level and per-panel blocks and in the batched tangents of
  ``jax.hessian``). Batched blocks are therefore always factorised this way.
- LAPACK (``lax.linalg``), for single matrices: fast for large orders, quick to compile.

Policies for single matrices (one Schur block, the fixed-effects block, one large panel):

    "lapack"    LAPACK (``jm.fit``: one program per model, run once)
    "unrolled"  XLA ops up to UNROLL_MAX, LAPACK above (batched fits: ``fit_many``, the bootstrap)
    "xla"       XLA ops at every order (the functional core: no LAPACK inside user programs)
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

KernelPolicy = str  # one of POLICIES
POLICIES = ("lapack", "unrolled", "xla")
UNROLL_MAX = 8  # matrices up to this order are factorised / solved fully unrolled

def cholesky_xla(a):
    """Lower Cholesky factor of (..., n, n) ``a`` (NaN where not positive definite), in plain
    XLA ops: unrolled for n ≤ UNROLL_MAX, a column loop otherwise."""
    n = a.shape[-1]
    if n == 0:
        return a
    if n <= UNROLL_MAX:
        # entry by entry on (...)-shaped slices, the factor assembled once at the end
        L = {}
        for j in range(n):
            s = a[..., j, j]
            for k in range(j):
                s = s - L[j, k] * L[j, k]
            d = jnp.sqrt(s)
            L[j, j] = d
            for i in range(j + 1, n):
                s = a[..., i, j]
                for k in range(j):
                    s = s - L[i, k] * L[j, k]
                L[i, j] = s / d
        zero = jnp.zeros_like(L[0, 0])
        return jnp.stack([jnp.stack([L.get((i, j), zero) for j in range(n)], axis=-1) for i in range(n)], axis=-2)
    idx = jnp.arange(n)

    def body(j, L):
        # left-looking: column j from A[:, j] minus the contributions of columns < j
        Lj = lax.dynamic_index_in_dim(L, j, axis=-2, keepdims=False)  # row j of L (..., n)
        Lj = jnp.where(idx < j, Lj, 0.0)
        col = lax.dynamic_index_in_dim(a, j, axis=-1, keepdims=False) - jnp.einsum("...ik,...k->...i", L, Lj)
        d = jnp.sqrt(lax.dynamic_index_in_dim(col, j, axis=-1, keepdims=False))
        newcol = jnp.where(idx > j, col / d[..., None], jnp.where(idx == j, d[..., None], 0.0))
        return jnp.where(idx == j, newcol[..., :, None], L)

    return lax.fori_loop(0, n, body, jnp.zeros_like(a))


def _solve_lower(T, B, unit):
    """T X = B with T (..., n, n) lower triangular, B (..., n, k)."""
    n = T.shape[-1]
    if n <= UNROLL_MAX:
        if n == 0:
            return B
        xs = []
        for i in range(n):
            s = B[..., i, :]
            for k in range(i):
                s = s - T[..., i, k][..., None] * xs[k]
            xs.append(s if unit else s / T[..., i, i][..., None])
        return jnp.stack(xs, axis=-2)
    idx = jnp.arange(n)

    def body(i, X):
        Ti = lax.dynamic_index_in_dim(T, i, axis=-2, keepdims=False)  # (..., n)
        Ti = jnp.where(idx < i, Ti, 0.0)
        s = lax.dynamic_index_in_dim(B, i, axis=-2, keepdims=False) - jnp.einsum("...k,...kj->...j", Ti, X)
        if not unit:
            s = s / lax.dynamic_index_in_dim(lax.dynamic_index_in_dim(T, i, axis=-2, keepdims=False), i,
                                             axis=-1, keepdims=True)
        return jnp.where((idx == i)[:, None], s[..., None, :], X)

    return lax.fori_loop(0, n, body, jnp.zeros_like(B))


def triangular_solve_xla(a, b, *, left_side=False, lower=False, transpose_a=False, conjugate_a=False,
                         unit_diagonal=False):
    """``lax.linalg.triangular_solve`` in plain XLA ops (real matrices)."""
    if not left_side:  # X op(A) = B  ⇔  op(A)ᵀ Xᵀ = Bᵀ
        x = triangular_solve_xla(a, jnp.swapaxes(b, -1, -2), left_side=True, lower=lower,
                                 transpose_a=not transpose_a, unit_diagonal=unit_diagonal)
        return jnp.swapaxes(x, -1, -2)
    T = jnp.swapaxes(a, -1, -2) if transpose_a else a
    low = lower != bool(transpose_a)
    if low:
        return _solve_lower(T, b, unit_diagonal)
    # upper: reverse the order of rows and columns to make it lower
    Tr = T[..., ::-1, ::-1]
    return _solve_lower(Tr, b[..., ::-1, :], unit_diagonal)[..., ::-1, :]


def spd_solve_xla(A, b):
    """A⁻¹b for symmetric positive definite A (..., n, n), b (..., n): Cholesky, two solves."""
    L = cholesky_xla(0.5 * (A + jnp.swapaxes(A, -1, -2)))
    z = _solve_lower(L, b[..., None], False)
    return triangular_solve_xla(L, z, left_side=True, lower=True, transpose_a=True)[..., 0]



#: sweeps after which :func:`eigh_xla` stops even if the off-diagonal part is not yet negligible
#: (cyclic Jacobi converges quadratically: 4-6 sweeps reach rounding for the orders used here)
JACOBI_MAX_SWEEPS = 30


def eigh_xla(a):
    """Eigenvalues (ascending) and eigenvectors (columns) of a symmetric (n, n) ``a`` by cyclic
    Jacobi rotations in plain XLA ops: ``jnp.linalg.eigh`` without LAPACK, for the optimiser's
    n × n Hessians (n = the number of parameters, a handful) inside batched programs, where a
    LAPACK call becomes a batched kernel (module docstring). Under ``vmap`` the rotation
    indices stay unbatched (they come from the loop counter); the loop runs until every
    matrix's off-diagonal part is at rounding level (or :data:`JACOBI_MAX_SWEEPS`). NaN in,
    NaN out. Only the lower triangle's mirror is assumed: ``a`` is symmetrised first."""
    n = a.shape[-1]
    a = 0.5 * (a + jnp.swapaxes(a, -1, -2))
    if n <= 1:
        return a[..., 0, :], jnp.ones_like(a)
    pq = [(p, q) for p in range(n - 1) for q in range(p + 1, n)]
    P = jnp.array([p for p, _ in pq], dtype=jnp.int32)
    Q = jnp.array([q for _, q in pq], dtype=jnp.int32)
    idx = jnp.arange(n)
    eye = jnp.eye(n, dtype=a.dtype)

    def rotate(m, AV):
        A, V = AV
        p, q = P[m], Q[m]
        ep, eq = (idx == p).astype(a.dtype), (idx == q).astype(a.dtype)
        app, aqq, apq = ep @ A @ ep, eq @ A @ eq, ep @ A @ eq
        nonzero = apq != 0
        tau = (aqq - app) / (2.0 * jnp.where(nonzero, apq, 1.0))
        t = jnp.where(tau >= 0, 1.0, -1.0) / (jnp.abs(tau) + jnp.sqrt(1.0 + tau * tau))
        t = jnp.where(nonzero, t, 0.0)
        c = 1.0 / jnp.sqrt(1.0 + t * t)
        s = t * c
        J = eye + (c - 1.0) * (jnp.outer(ep, ep) + jnp.outer(eq, eq)) + s * (jnp.outer(ep, eq) - jnp.outer(eq, ep))
        return J.T @ A @ J, V @ J

    def off(A):
        return jnp.sum(jnp.where(idx[:, None] != idx[None, :], A * A, 0.0))

    def cond(state):
        k, A, _ = state
        return (k < JACOBI_MAX_SWEEPS) & (off(A) > (1e-16 * 1e-16) * jnp.sum(A * A))

    def sweep(state):
        k, A, V = state
        A, V = lax.fori_loop(0, len(pq), rotate, (A, V))
        return k + 1, A, V

    _, A, V = lax.while_loop(cond, sweep, (0, a, eye))
    w = jnp.diagonal(A)
    order = jnp.argsort(w)
    finite = jnp.all(jnp.isfinite(a))  # else the loop may not have started: NaN, as LAPACK's
    return jnp.where(finite, w[order], jnp.nan), jnp.where(finite, V[:, order], jnp.nan)


def _use_xla(n: int, policy: KernelPolicy) -> bool:
    if policy not in POLICIES:
        raise ValueError(f"kernel policy must be one of {POLICIES}, not {policy!r}")
    return policy == "xla" or (policy == "unrolled" and n <= UNROLL_MAX)


def cholesky(a, policy: KernelPolicy | None = None, symmetrize: bool = True):
    """Lower Cholesky factor of (..., n, n) ``a``. Batches (ndim > 2) and ``policy=None``:
    plain XLA ops always (the lower triangle is read); a single matrix: as ``policy`` says
    (module docstring), LAPACK on (a + aᵀ)/2 with ``symmetrize`` (as ``jnp.linalg.cholesky``)."""
    if policy is None or a.ndim > 2 or _use_xla(a.shape[-1], policy):
        return cholesky_xla(a)
    return lax.linalg.cholesky(a, symmetrize_input=symmetrize)


def solve_triangular(L, B, *, lower: bool = True, transpose: bool = False, policy: KernelPolicy | None = None):
    """op(L)⁻¹B for triangular L (..., n, n), B (..., n, k); op = transpose if ``transpose``.
    Kernel as in :func:`cholesky`."""
    if policy is None or L.ndim > 2 or _use_xla(L.shape[-1], policy):
        return triangular_solve_xla(L, B, left_side=True, lower=lower, transpose_a=transpose)
    return lax.linalg.triangular_solve(L, B, left_side=True, lower=lower, transpose_a=transpose)


def solve_lower(L, B, policy: KernelPolicy | None = None):
    """L⁻¹B for lower-triangular L (..., n, n) and B (..., n, k)."""
    return solve_triangular(L, B, policy=policy)


def solve_lower_t(L, B, policy: KernelPolicy | None = None):
    """L⁻ᵀB for lower-triangular L (..., n, n) and B (..., n, k)."""
    return solve_triangular(L, B, transpose=True, policy=policy)
