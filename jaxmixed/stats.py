"""Sufficient statistics: the cross-products the profiled deviance needs, formed once.

With the random-effects columns split into the first factor (block-diagonal part of ZᵀZ) and the
rest (a small dense part), and W = [X y]:

    D11   (L₁, q₁, q₁)   per-level blocks of Z₁ᵀZ₁
    A21   (L₁, q₁, m₂)   Z₁ᵀZ₂, per level of the first factor
    A22   (m₂, m₂)       Z₂ᵀZ₂
    Z1W   (L₁, q₁, p+1)  Z₁ᵀW per level
    Z2W   (m₂, p+1)      Z₂ᵀW
    WW    (p+1, p+1)     WᵀW
    n                    number of observations

Columns of Z₂ are level-major within each factor: factor f, level ℓ, column j sits at
offset_f + ℓ q_f + j. Nothing here depends on θ, so an objective evaluation costs nothing in n.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from .design import Design


class Stats(NamedTuple):
    D11: jnp.ndarray
    A21: jnp.ndarray
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

    @property
    def m2(self) -> int:
        return sum(L * q for L, q in zip(self.L[1:], self.q[1:]))

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each factor ≥ 2 inside the dense part."""
        out, pos = [], 0
        for L, q in zip(self.L[1:], self.q[1:]):
            out.append(pos)
            pos += L * q
        return tuple(out)


def structure_of(design: Design) -> Structure:
    return Structure(
        L=tuple(f.n_levels for f in design.factors),
        q=tuple(f.q for f in design.factors),
        terms=tuple(TermStruct(t.structure, t.factor, t.cols, t.theta) for t in design.terms),
        p=design.p,
        n_theta=design.n_theta,
    )


def _sparse_z(codes: np.ndarray, Z: np.ndarray, n_levels: int) -> sp.csr_matrix:
    """The n × (L q) indicator-times-covariate matrix of one factor, level-major columns."""
    n, q = Z.shape
    rows = np.repeat(np.arange(n), q)
    cols = (codes[:, None] * q + np.arange(q)[None, :]).ravel()
    return sp.csr_matrix((Z.ravel(), (rows, cols)), shape=(n, n_levels * q))


def _per_level(codes, A, B, n_levels):
    """Σ over rows of level ℓ of A[i]ᵀ B[i]: (L, qa, qb), one bincount per column pair."""
    out = np.empty((n_levels, A.shape[1], B.shape[1]))
    for i in range(A.shape[1]):
        for j in range(B.shape[1]):
            out[:, i, j] = np.bincount(codes, weights=A[:, i] * B[:, j], minlength=n_levels)
    return out


def cross_products(design: Design, y: np.ndarray | None = None) -> Stats:
    """Form all cross-products in one pass over the rows (``y`` overrides the design's response)."""
    y = design.y if y is None else np.asarray(y, dtype=float)
    W = np.column_stack([design.X, y])
    f1 = design.factors[0]
    D11 = _per_level(f1.codes, f1.Z, f1.Z, f1.n_levels)
    Z1W = _per_level(f1.codes, f1.Z, W, f1.n_levels)
    rest = design.factors[1:]
    if rest:
        Z1 = _sparse_z(f1.codes, f1.Z, f1.n_levels)
        Z2 = sp.hstack([_sparse_z(f.codes, f.Z, f.n_levels) for f in rest]).tocsr()
        m2 = Z2.shape[1]
        A21 = (Z1.T @ Z2).toarray().reshape(f1.n_levels, f1.q, m2)
        A22 = (Z2.T @ Z2).toarray()
        Z2W = np.asarray(Z2.T @ W)
    else:
        A21 = np.zeros((f1.n_levels, f1.q, 0))
        A22 = np.zeros((0, 0))
        Z2W = np.zeros((0, W.shape[1]))
    return Stats(D11=jnp.asarray(D11), A21=jnp.asarray(A21), A22=jnp.asarray(A22),
                 Z1W=jnp.asarray(Z1W), Z2W=jnp.asarray(Z2W), WW=jnp.asarray(W.T @ W),
                 n=jnp.asarray(float(len(y))))
