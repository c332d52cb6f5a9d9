"""Sufficient statistics: the cross-products the profiled deviance needs, formed once.

With the random-effects columns split into the first factor (block-diagonal part of ZᵀZ) and the
rest, and W = [X y]:

    D11   (L₁, q₁, q₁)   per-level blocks of Z₁ᵀZ₁
    Z1W   (L₁, q₁, p+1)  Z₁ᵀW per level
    Z2W   (m₂, p+1)      Z₂ᵀW
    WW    (p+1, p+1)     WᵀW
    n                    number of observations
    A21, A22             Z₁ᵀZ₂ and Z₂ᵀZ₂, stored by the engine the Structure names:
        dense engine (``struct.engine is None``): A21 (L₁, q₁, m₂) and A22 (m₂, m₂) dense;
        blocked engine (``struct.engine`` a :class:`~jaxmixed.blocked.Layout`): A21 a
        :class:`~jaxmixed.blocked.Sparse21` (non-zero entries and their within-level pairs) and
        A22 the lower triangles of the Schur panels, flattened (see :mod:`jaxmixed.blocked`).

Columns of Z₂ (in Z2W, and in the dense A21/A22) are level-major within each factor: factor f,
level ℓ, column j sits at offset_f + ℓ q_f + j. Nothing here depends on θ, so an objective
evaluation costs nothing in n.

All of it comes from one pass over the rows, in batches of ``batch_rows`` rows (per-level
segment sums with ``np.bincount``): no n × q or n × n matrix is formed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxmixed.engine import sparse as blocked
from jaxmixed.runtime.devices import host_array as _put
from jaxmixed.data.design import Design

BATCH_ROWS = 1 << 18  # rows per batch of the streamed cross-products
#: engine used when ``engine`` is not given: 'auto' (from the design), 'dense' or 'sparse';
#: the environment variable JAXMIXED_ENGINE sets it at import (tests and benchmarks force one)
DEFAULT_ENGINE = os.environ.get("JAXMIXED_ENGINE", "auto")


class Stats(NamedTuple):
    D11: jnp.ndarray
    A21: object  # jnp.ndarray (dense engine) or blocked.Sparse21
    A22: jnp.ndarray
    Z1W: jnp.ndarray
    Z2W: jnp.ndarray
    WW: jnp.ndarray
    n: jnp.ndarray


@dataclass(frozen=True)
class TermStruct:
    """Static description of one term for the jitted engine."""

    structure: object  # covariance.* (frozen, hashable)
    factor: int
    cols: tuple[int, int]
    theta: tuple[int, int]


@dataclass(frozen=True)
class Structure:
    """Everything about a model's shape that is static under jit (hashable)."""

    L: tuple[int, ...]  # levels per factor, engine order
    q: tuple[int, ...]  # columns per factor
    terms: tuple[TermStruct, ...]
    p: int
    n_theta: int
    engine: blocked.Layout | None = None  # None: dense engine; else the blocked engine's layout

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
        return self.engine is not None and self.engine.quasi_newton


def structure_of(design: Design, engine: str | None = None) -> Structure:
    """The static structure; ``engine`` 'auto' (chosen from the design), 'dense' or 'sparse'
    (default: DEFAULT_ENGINE). ``cross_products`` must be called with the same ``engine``."""
    kind = blocked.choose_engine(design, engine or DEFAULT_ENGINE)
    layout = blocked.pattern_of(design).layout if kind == "sparse" else None
    return Structure(
        L=tuple(f.n_levels for f in design.factors),
        q=tuple(f.q for f in design.factors),
        terms=tuple(TermStruct(t.structure, t.factor, t.cols, t.theta) for t in design.terms),
        p=design.p,
        n_theta=design.n_theta,
        engine=layout,
    )


def _sparse_z(codes: np.ndarray, Z: np.ndarray, n_levels: int) -> "scipy.sparse.csr_matrix":
    """The n × (L q) indicator-times-covariate matrix of one factor, level-major columns."""
    n, q = Z.shape
    rows = np.repeat(np.arange(n), q)
    cols = (codes[:, None] * q + np.arange(q)[None, :]).ravel()
    import scipy.sparse as sp  # lazily: not needed for a fit (≈ 0.1 s of import)

    return sp.csr_matrix((Z.ravel(), (rows, cols)), shape=(n, n_levels * q))


def _per_level(codes, A, B, n_levels, out=None):
    """Σ over rows of level ℓ of A[i]ᵀ B[i]: (L, qa, qb), one bincount per column pair."""
    if out is None:
        out = np.zeros((n_levels, A.shape[1], B.shape[1]))
    for i in range(A.shape[1]):
        for j in range(B.shape[1]):
            out[:, i, j] += np.bincount(codes, weights=A[:, i] * B[:, j], minlength=n_levels)
    return out


def cross_products(design: Design, y: np.ndarray | None = None, *, engine: str | None = None,
                   batch_rows: int | None = None) -> Stats:
    """Form all cross-products in one pass over the rows (``y`` overrides the design's response).

    ``engine`` as in :func:`structure_of`; ``batch_rows`` rows are processed at a time."""
    y = design.y if y is None else np.asarray(y, dtype=float)
    n = len(y)
    batch = int(batch_rows or BATCH_ROWS)
    kind = blocked.choose_engine(design, engine or DEFAULT_ENGINE)
    f1, rest = design.factors[0], design.factors[1:]
    pat = blocked.pattern_of(design)
    p1 = design.p + 1
    L1, q1 = f1.n_levels, f1.q
    D11 = np.zeros((L1, q1, q1))
    Z1W = np.zeros((L1, q1, p1))
    WW = np.zeros((p1, p1))
    Z2W = [np.zeros((f.n_levels, f.q, p1)) for f in rest]
    diag = [np.zeros((f.n_levels, f.q, f.q)) for f in rest]
    blk = [np.zeros((len(lev), q1, f.q)) for lev, f in zip(pat.blk_lev, rest)]
    xv = {k: np.zeros((len(ja), rest[k[0]].q, rest[k[1]].q)) for k, (ja, _) in pat.x_j.items()}
    for a in range(0, n, batch):
        s = slice(a, min(a + batch, n))
        W = np.column_stack([design.X[s], y[s]])
        WW += W.T @ W
        c1, Z1 = f1.codes[s], f1.Z[s]
        _per_level(c1, Z1, Z1, L1, D11)
        _per_level(c1, Z1, W, L1, Z1W)
        for k, f in enumerate(rest):
            ck, Zk = f.codes[s], f.Z[s]
            _per_level(ck, Zk, W, f.n_levels, Z2W[k])
            _per_level(ck, Zk, Zk, f.n_levels, diag[k])
            _per_level(pat.blk_inv[k][s], Z1, Zk, len(blk[k]), blk[k])
        for (ka, kb), inv in pat.x_inv.items():
            _per_level(inv[s], rest[ka].Z[s], rest[kb].Z[s], len(xv[(ka, kb)]), xv[(ka, kb)])
    m2 = sum(f.n_levels * f.q for f in rest)
    Z2W_nat = np.concatenate([z.reshape(-1, p1) for z in Z2W]) if rest else np.zeros((0, p1))
    if kind == "sparse":
        A21, A22 = blocked.sparse_arrays(design, pat, blk, xv, diag)
    else:
        A21 = np.zeros((L1, q1, m2))
        A22 = np.zeros((m2, m2))
        offs = np.cumsum([0] + [f.n_levels * f.q for f in rest])
        for k, f in enumerate(rest):
            cols = offs[k] + pat.blk_j[k][:, None] * f.q + np.arange(f.q)[None, :]  # (nb, q_k)
            A21[pat.blk_lev[k][:, None, None], np.arange(q1)[None, :, None], cols[:, None, :]] = blk[k]
            c = offs[k] + np.arange(f.n_levels)[:, None] * f.q + np.arange(f.q)[None, :]
            A22[c[:, :, None], c[:, None, :]] = diag[k]
        for (ka, kb), (ja, jb) in pat.x_j.items():
            fa, fb = rest[ka], rest[kb]
            ca = offs[ka] + ja[:, None] * fa.q + np.arange(fa.q)[None, :]
            cb = offs[kb] + jb[:, None] * fb.q + np.arange(fb.q)[None, :]
            A22[ca[:, :, None], cb[:, None, :]] = xv[(ka, kb)]
            A22[cb[:, None, :], ca[:, :, None]] = xv[(ka, kb)]
        A21, A22 = _put(A21), _put(A22)
    return Stats(D11=_put(D11), A21=A21, A22=A22, Z1W=_put(Z1W), Z2W=_put(Z2W_nat), WW=_put(WW),
                 n=_put(np.float64(n)))



def moment_start(design: Design, stats: Stats, struct: Structure) -> np.ndarray:
    """A starting θ from one-way ANOVA moments (numpy, from the cross-products).

    For each random intercept (q = 1 term on the constant), the variance ratio of its factor
    alone, σ_b²/σ² ≈ (MSB − MSW)/(n₀ MSW), computed on the OLS residuals (Z_fᵀr and the level
    counts come from Z₁W/Z₂W and D₁₁/A₂₂); θ = its square root, at least 0.01. Crossed and
    nested factors bias these one-way moments, but they land near the optimum where θ = 1 may
    be far; other terms keep the default start."""
    from jaxmixed.model.spec import CONS

    theta0 = np.array(design.theta0, dtype=float)
    WW = np.asarray(stats.WW)
    p, n = design.p, design.nobs
    try:
        beta = np.linalg.solve(WW[:p, :p], WW[:p, p]) if p else np.zeros(0)
    except np.linalg.LinAlgError:
        return theta0
    rss = WW[p, p] - WW[p, :p] @ beta
    Z2W = np.asarray(stats.Z2W)
    for t in design.terms:
        f = design.factors[t.factor]
        if t.theta[1] - t.theta[0] != 1 or f.q != 1 or f.colnames[0] != CONS:
            continue
        if t.factor == 0:
            zr = np.asarray(stats.Z1W)[:, 0, :]
        else:
            off = struct.offsets[t.factor - 1]
            zr = Z2W[off:off + f.n_levels]
        cnt = np.bincount(f.codes, minlength=f.n_levels).astype(float)
        J = f.n_levels
        if J < 2 or n - J < 1 or rss <= 0:
            continue
        s = zr[:, p] - zr[:, :p] @ beta
        ssb = float(np.sum(s ** 2 / np.maximum(cnt, 1)))
        msb, msw = ssb / (J - 1), (rss - ssb) / (n - J)
        n0 = (n - np.sum(cnt ** 2) / n) / (J - 1)
        if not (msw > 0 and n0 > 0):
            continue
        ratio = (msb - msw) / (n0 * msw)
        theta0[t.theta[0]] = np.sqrt(max(ratio, 1e-4))
    return theta0
