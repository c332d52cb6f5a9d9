"""Cross-products: every sum over rows that a linear mixed model's likelihood needs.

With W = [X y] (each row scaled by √wᵢ for prior weights wᵢ), the first factor's random-effects
columns Z₁ and the other ("rest") factors' Z_k, the likelihood sees the data only through

    n      number of observations
    WW     WᵀW                                       (p+1, p+1)
    D11    Σ_{i ∈ ℓ} z₁ᵢ z₁ᵢᵀ, per level ℓ of factor 1  (L₁, q₁, q₁)
    Z1W    Σ_{i ∈ ℓ} z₁ᵢ wᵢᵀ                           (L₁, q₁, p+1)
    Z2W    per rest factor k: Σ_{i ∈ j} z_kᵢ wᵢᵀ          (L_k, q_k, p+1)
    D22    per rest factor k: Σ_{i ∈ j} z_kᵢ z_kᵢᵀ        (L_k, q_k, q_k)
    A21    per rest factor k, per *block* (ℓ, j) of the pattern: Σ_{i ∈ ℓ, j} z₁ᵢ z_kᵢᵀ  (n_k, q₁, q_k)
    X22    per pair of rest factors a < b, per block (j_a, j_b): Σ z_aᵢ z_bᵢᵀ            (n_ab, q_a, q_b)

where the blocks are the level pairs that occur in the data (:mod:`jaxmixed.data.pattern`).
Nothing here depends on θ, so an objective evaluation costs nothing in n. Each field is a sum
over rows, so cross-products of batches of rows add (:func:`add`); an engine arranges the sums
in its own layout (:meth:`jaxmixed.engine.pls.PLSEngine.arrange`).

One function forms them for a batch of rows, :func:`accumulate`, in numpy (``xp=np``: the
first pass over data in memory or streamed, per-level segment sums with ``np.bincount``) or in
JAX (``xp=jax.numpy``: traceable, so that a reweighted fit can recompute weighted cross-products
on the device at each iteration; :mod:`jaxmixed.functional` uses it this way). No n × q or
n × n matrix is formed.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

BATCH_ROWS = 1 << 18  # rows per batch of the in-memory first pass


class CrossProducts(NamedTuple):
    n: object
    WW: object
    D11: object
    Z1W: object
    Z2W: tuple
    D22: tuple
    A21: tuple
    X22: tuple  # in the order of BlockIndex.cross_pairs


class BlockIndex(NamedTuple):
    """Which pattern block each row's pairs of levels fall in (arrays of the rows' length, or a
    description of how to compute them): per rest factor k, ``a21[k]`` the block of (factor-1
    level, factor-k level); per pair of rest factors, ``x22[m]`` the block of their levels."""

    a21: tuple
    x22: tuple
    n_a21: tuple  # number of blocks of each
    n_x22: tuple


def segment_cross(index, A, B, n_segments: int, weights=None, xp=np, unit=()):
    """Σ over the rows i with index[i] = s of wᵢ A[i] B[i]ᵀ, for s = 0..n_segments-1:
    (n_segments, a, b) from A (n, a), B (n, b). numpy: one ``bincount`` per column pair (the
    columns of A listed in ``unit`` are known to be 1: no product formed); JAX: one
    ``segment_sum`` of the row outer products."""
    if xp is np:
        out = np.zeros((n_segments, A.shape[1], B.shape[1]))
        for i in range(A.shape[1]):
            if i in unit:
                Ai = weights
            else:
                Ai = A[:, i] if weights is None else A[:, i] * weights
            for j in range(B.shape[1]):
                out[:, i, j] = np.bincount(index, weights=B[:, j] if Ai is None else Ai * B[:, j],
                                           minlength=n_segments)
        return out
    import jax

    prod = A[:, :, None] * B[:, None, :]
    if weights is not None:
        prod = prod * weights[:, None, None]
    return jax.ops.segment_sum(prod, index, num_segments=n_segments)


def _z_blocks(index, Zf, ZfW, L, weights, xp, same, unit):
    """Σ z zᵀ per level, its entries taken from Σ z wᵀ (``ZfW``) where a column of Z is a column
    of W (``same[j]``: that column's index in W, or -1) and summed otherwise (numpy)."""
    if xp is not np or same is None or ZfW is None:
        return segment_cross(index, Zf, Zf, L, weights, xp)
    q = Zf.shape[1]
    out = np.empty((L, q, q))
    for i in range(q):
        for j in range(i, q):
            if same[j] >= 0:
                out[:, i, j] = ZfW[:, i, same[j]]
            elif same[i] >= 0:
                out[:, i, j] = ZfW[:, j, same[i]]
            else:
                out[:, i, j] = segment_cross(index, Zf[:, [i]], Zf[:, [j]], L, weights, xp,
                                             unit=(0,) if i in unit else ())[:, 0, 0]
            out[:, j, i] = out[:, i, j]
    return out


def accumulate(W, codes, Z, n_levels, blocks: BlockIndex, weights=None, xp=np, same=None) -> CrossProducts:
    """The cross-products of one batch of rows.

    W        (n, p+1) = [X y], or None for the blocks of Z alone (a GLMM's PIRLS step: WW, Z1W
             and Z2W then come as zeros with one column, so that the engine's layout holds)
    codes    per factor (n,) integer level codes, engine order (factor 1 first)
    Z        per factor (n, q_f) random-effects covariates
    n_levels per factor L_f
    blocks   the rows' pattern blocks (:class:`BlockIndex`)
    weights  (n,) prior weights, or None
    xp       numpy or jax.numpy
    same     per factor, for each random-effects column the index of the identical column of W
             (the constant, a covariate that is also a fixed effect) or -1: numpy then takes Σ z zᵀ
             from Σ z wᵀ and forms no product with a constant (a third fewer sums for a random
             slope); None: every sum formed
    """
    c1, Z1 = codes[0], Z[0]
    L1 = n_levels[0]
    n = Z1.shape[0]

    cons = W is not None and same is not None and W.shape[1] > 1
    unit_of = [tuple(j for j, k in enumerate(same[f]) if cons and k >= 0 and _is_constant_column(W, k))
               if same is not None else () for f in range(len(codes))]

    def with_w(index, A, L, f):  # Σ z wᵀ per level, or its zero placeholder without W
        if W is None:
            return xp.zeros((L, A.shape[1], 1))
        return segment_cross(index, A, W, L, weights, xp, unit=unit_of[f] if xp is np else ())

    def zz(f, index, ZW):
        return _z_blocks(index, Z[f], ZW, n_levels[f], weights, xp, None if same is None else same[f], unit_of[f])

    if W is None:
        WW = xp.zeros((1, 1))
    else:
        WW = (W.T * weights) @ W if weights is not None else W.T @ W
    Z2W, D22, A21 = [], [], []
    for k in range(1, len(codes)):
        Z2W.append(with_w(codes[k], Z[k], n_levels[k], k))
        D22.append(zz(k, codes[k], Z2W[-1]))
        A21.append(segment_cross(blocks.a21[k - 1], Z1, Z[k], blocks.n_a21[k - 1], weights, xp))
    X22 = []
    pairs = [(a, b) for a in range(len(codes) - 1) for b in range(a + 1, len(codes) - 1)]
    for m, (a, b) in enumerate(pairs):
        X22.append(segment_cross(blocks.x22[m], Z[a + 1], Z[b + 1], blocks.n_x22[m], weights, xp))
    Z1W = with_w(c1, Z1, L1, 0)
    return CrossProducts(n=n, WW=WW, D11=zz(0, c1, Z1W), Z1W=Z1W, Z2W=tuple(Z2W), D22=tuple(D22),
                         A21=tuple(A21), X22=tuple(X22))


def _is_constant_column(W, k) -> bool:
    """Whether column k of W is all ones (the constant: ``same`` points the intercept there)."""
    col = W[:, k]
    return bool(col.size) and bool(col[0] == 1.0) and bool(np.all(col == 1.0))


def identical_columns(z_names, w_names) -> tuple:
    """For ``accumulate``'s ``same``: each random-effects column's index among W's columns
    (``_cons`` is the constant; a covariate the column of that name), or -1."""
    w_index = {nm: k for k, nm in enumerate(w_names)}
    return tuple(w_index.get(nm, -1) for nm in z_names)


def add(a: CrossProducts, b: CrossProducts) -> CrossProducts:
    """The cross-products of two disjoint sets of rows together."""
    return CrossProducts(*(tuple(x + y for x, y in zip(u, v)) if isinstance(u, tuple) else u + v
                           for u, v in zip(a, b)))


def cross_products(design, pattern, y=None, weights=None, *, batch_rows: int | None = None,
                   orthonormal: bool = True, accumulate_fn=None) -> CrossProducts:
    """All cross-products of a design's rows (numpy), ``batch_rows`` rows at a time; ``y``
    overrides the design's response, ``weights`` are prior weights. ``pattern`` is the design's
    :class:`~jaxmixed.data.pattern.Pattern` (computed once by the caller). The fixed-effects
    columns are the design's well-conditioned basis X̃ (``Design.fixed_basis``), or X itself with
    ``orthonormal=False``. ``accumulate_fn``: :func:`accumulate`'s replacement for each batch
    (the device-sharded one of :mod:`jaxmixed.data.sharded`), default :func:`accumulate`."""
    y = design.y if y is None else np.asarray(y, dtype=float)
    n = len(y)
    batch = int(batch_rows or BATCH_ROWS)
    facs = design.factors
    X = design.fixed_basis[0] if orthonormal else design.X  # X̃ = X R₀⁻¹ (Design.fixed_basis)
    total = None
    acc = accumulate if accumulate_fn is None else accumulate_fn
    for a in range(0, n, batch):
        s = slice(a, min(a + batch, n))
        W = np.column_stack([X[s], y[s]])
        blocks = pattern.block_index(tuple(f.codes[s] for f in facs))
        part = acc(W, [f.codes[s] for f in facs], [f.Z[s] for f in facs],
                          [f.n_levels for f in facs], blocks, None if weights is None else weights[s])
        total = part if total is None else add(total, part)
    return total._replace(n=float(n))
