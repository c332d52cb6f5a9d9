"""The blocked sparse engine: any mix of nested and crossed factors at real size.

Notation as in :mod:`jaxmixed.objective`. The first factor (most levels) has L₁ levels with
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

import weakref
from functools import partial
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmixed.engine import kernels as xla
from jaxmixed.errors import ModelError

# ---------------------------------------------------------------------------------------------
# static layout (hashable, part of Structure)


@dataclass(frozen=True)
class Bucket:
    """Panels padded to one size P: n of them, slots slot0.., flat storage flat0.. (n P²)."""

    n: int
    P: int
    slot0: int
    flat0: int


@dataclass(frozen=True)
class Layout:
    """Shapes of the blocked engine (static under jit)."""

    buckets: tuple[Bucket, ...]
    n_slots: int  # Σ n P: rest columns in panel order, with padding
    n_flat: int  # Σ n P²: panel matrices, flattened
    qmax: int  # largest q among the rest factors
    scalar_rest: bool  # every rest factor has q = 1 (Λ₂ is a diagonal scaling)
    quasi_newton: bool  # dense panels large enough that the optimiser should avoid Hessians
    n_entries: int
    n_pairs: int

    @property
    def max_panel(self) -> int:
        return max((b.P for b in self.buckets), default=0)

    @property
    def panel_flops(self) -> float:
        """Σ n P³/3: the cost of one Cholesky of all panels."""
        return sum(b.n * b.P ** 3 / 3.0 for b in self.buckets)


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
# the pattern: computed once per design (numpy), cached


@dataclass
class Pattern:
    """Where the non-zero blocks of ZᵀZ are, and the panel layout they imply."""

    blk_inv: list  # per rest factor: row -> A₂₁ block index
    blk_lev: list  # block -> first-factor level
    blk_j: list  # block -> level of the rest factor
    x_inv: dict  # (f, g) -> row -> cross block index (rest factors f < g)
    x_j: dict  # (f, g) -> (levels of f, levels of g) per cross block
    panel_of_node: np.ndarray | None = None
    pos_of_node: np.ndarray | None = None
    layout: Layout | None = None
    slot_of_nat: np.ndarray | None = None
    dense_cost: float = 0.0
    pair_count: float = 0.0


_PATTERNS: dict[int, Pattern] = {}

QUASI_NEWTON_FLOPS = 2e7  # panels costlier than this (Σ P³/3) are optimised without Hessians
MAX_PANEL_BYTES = 4 * 2**30


def _unique_inverse(key: np.ndarray):
    """Unique keys (sorted) and each row's index into them."""
    uniq, inv = np.unique(key, return_inverse=True)
    return uniq, inv.astype(np.int64)


def pattern_of(design) -> Pattern:
    """The (cached) sparsity pattern of a design: computed from the level codes only."""
    key = id(design)
    hit = _PATTERNS.get(key)
    if hit is not None:
        return hit
    pat = _build_pattern(design)
    _PATTERNS[key] = pat
    weakref.finalize(design, _PATTERNS.pop, key, None)
    return pat


def _build_pattern(design) -> Pattern:
    f1, rest = design.factors[0], design.factors[1:]
    L1, q1 = f1.n_levels, f1.q
    blk_inv, blk_lev, blk_j = [], [], []
    for f in rest:
        uniq, inv = _unique_inverse(f1.codes.astype(np.int64) * f.n_levels + f.codes)
        blk_inv.append(inv)
        blk_lev.append(uniq // f.n_levels)
        blk_j.append(uniq % f.n_levels)
    x_inv, x_j = {}, {}
    for a in range(len(rest)):
        for b in range(a + 1, len(rest)):
            fa, fb = rest[a], rest[b]
            uniq, inv = _unique_inverse(fa.codes.astype(np.int64) * fb.n_levels + fb.codes)
            x_inv[(a, b)] = inv
            x_j[(a, b)] = (uniq // fb.n_levels, uniq % fb.n_levels)
    pat = Pattern(blk_inv, blk_lev, blk_j, x_inv, x_j)
    if not rest:
        return pat
    m2 = sum(f.n_levels * f.q for f in rest)
    # entries per level of the first factor (element level) → pairs
    per_level = np.zeros(L1, dtype=np.int64)
    for f, lev in zip(rest, blk_lev):
        per_level += np.bincount(lev, minlength=L1) * f.q
    pat.pair_count = float(np.sum(per_level * (per_level + 1) // 2))
    pat.dense_cost = float(L1) * q1 * m2 * m2
    _panels(pat, design)
    return pat


def connected_components(n: int, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """A component label for each of n nodes of the undirected graph with edges (r[i], c[i]):
    each node's label is the smallest node of its component.

    Min-label hooking with pointer jumping, vectorised in numpy: every round each edge hooks
    the larger of its two roots under the smaller, then every node jumps to its root; rounds
    repeat until no edge joins two roots (O(log n) rounds on the graphs of crossed and nested
    designs). Used instead of scipy.sparse.csgraph, whose import (≈ 0.2–0.3 s: scipy.sparse
    pulls in numpy.f2py) would be a tenth of a large crossed model's fit in a fresh process."""
    label = np.arange(n)
    r, c = np.asarray(r, dtype=np.int64), np.asarray(c, dtype=np.int64)
    while True:
        lr, lc = label[r], label[c]
        diff = lr != lc
        if not diff.any():
            return label
        lo, hi = np.minimum(lr[diff], lc[diff]), np.maximum(lr[diff], lc[diff])
        np.minimum.at(label, hi, lo)  # hook: roots only (a root's label is itself)
        while True:  # compress: every node to its root
            nxt = label[label]
            if np.array_equal(nxt, label):
                break
            label = nxt
        keep = label[r] != label[c]
        r, c = r[keep], c[keep]


def _panels(pat: Pattern, design) -> None:
    """Connected components of the rest levels → panels, buckets, slots."""
    f1, rest = design.factors[0], design.factors[1:]
    L1 = f1.n_levels
    noff = np.cumsum([0] + [f.n_levels for f in rest])
    n_rest = int(noff[-1])
    rows, cols = [], []
    for k, (lev, j) in enumerate(zip(pat.blk_lev, pat.blk_j)):
        rows.append(n_rest + lev)
        cols.append(noff[k] + j)
    for (a, b), (ja, jb) in pat.x_j.items():
        rows.append(noff[a] + ja)
        cols.append(noff[b] + jb)
    r = np.concatenate(rows)
    c = np.concatenate(cols)
    N = n_rest + L1
    label = connected_components(N, r, c)
    lab_rest = label[:n_rest]
    _, panel = np.unique(lab_rest, return_inverse=True)  # panel id per rest node
    qnode = np.concatenate([np.full(f.n_levels, f.q) for f in rest])
    n_pan = int(panel.max()) + 1
    size = np.bincount(panel, weights=qnode, minlength=n_pan).astype(np.int64)
    # position of each node inside its panel: nodes in natural order (factor, level)
    order = np.argsort(panel, kind="stable")
    csum = np.cumsum(qnode[order]) - qnode[order]
    start = np.zeros(n_pan, dtype=np.int64)
    first = np.searchsorted(panel[order], np.arange(n_pan))
    start[:] = csum[first]
    pos = np.empty(n_rest, dtype=np.int64)
    pos[order] = csum - start[panel[order]]
    # buckets: panels whose sizes are within a factor 2 share one padded size
    bkey = np.ceil(np.log2(np.maximum(size, 1))).astype(np.int64)
    buckets = []
    pan_bucket = np.empty(n_pan, dtype=np.int64)
    pan_index = np.empty(n_pan, dtype=np.int64)
    slot0 = flat0 = 0
    for bi, kv in enumerate(np.unique(bkey)):
        members = np.flatnonzero(bkey == kv)
        P = int(size[members].max())
        pan_bucket[members] = bi
        pan_index[members] = np.arange(len(members))
        buckets.append(Bucket(n=len(members), P=P, slot0=slot0, flat0=flat0))
        slot0 += len(members) * P
        flat0 += len(members) * P * P
    n_slots, n_flat = slot0, flat0
    if 8 * n_flat > MAX_PANEL_BYTES:
        raise ModelError(
            f"the crossed random effects need a dense Schur complement of {n_flat:,} entries "
            f"(largest panel {max(b.P for b in buckets):,} columns), more than this engine holds "
            f"({MAX_PANEL_BYTES // 2**30} GiB); put the factor with most levels first or use fewer crossed levels")
    bP = np.array([b.P for b in buckets])
    bslot0 = np.array([b.slot0 for b in buckets])
    # slot of each natural column (factor k, level j, component a)
    slot_of_nat = np.empty(sum(f.n_levels * f.q for f in rest), dtype=np.int64)
    off = 0
    for k, f in enumerate(rest):
        nodes = noff[k] + np.arange(f.n_levels)
        pb = panel[nodes]
        base = bslot0[pan_bucket[pb]] + pan_index[pb] * bP[pan_bucket[pb]] + pos[nodes]
        slot_of_nat[off:off + f.n_levels * f.q] = (base[:, None] + np.arange(f.q)[None, :]).ravel()
        off += f.n_levels * f.q
    pat.panel_of_node, pat.pos_of_node, pat.slot_of_nat = panel, pos, slot_of_nat
    qmax = max(f.q for f in rest)
    flops = sum(b.n * b.P ** 3 / 3.0 for b in buckets)
    pat.layout = Layout(buckets=tuple(buckets), n_slots=n_slots, n_flat=n_flat, qmax=qmax,
                        scalar_rest=(qmax == 1), quasi_newton=flops > QUASI_NEWTON_FLOPS,
                        n_entries=int(sum(len(lv) * f.q for lv, f in zip(pat.blk_lev, rest))),
                        n_pairs=int(pat.pair_count))


def choose_engine(design, engine: str = "auto") -> str:
    """'dense' (A₂₁ dense, one dense Schur block) or 'sparse' (this module), from the design.

    The dense engine is kept where it is cheap (small models compile faster with it); the
    sparse one is used once the dense A₂₁ or its WᵀW product gets large, or when the rest
    factors split into several panels of which the dense engine would ignore the structure."""
    if engine not in ("auto", "dense", "sparse"):
        raise ModelError(f"engine must be 'auto', 'dense' or 'sparse', not {engine!r}")
    if len(design.factors) < 2:
        return "dense"
    if engine != "auto":
        return engine
    f1 = design.factors[0]
    m2 = sum(f.n_levels * f.q for f in design.factors[1:])
    dense_entries = f1.n_levels * f1.q * m2
    if dense_entries <= 50_000 and m2 <= 200:
        return "dense"
    pat = pattern_of(design)
    # a scattered pair costs about as much as 20 flops of a dense (BLAS) WᵀW; the dense A₂₁
    # must also fit in memory comfortably
    sparse_cost = 20.0 * pat.pair_count * f1.q ** 2
    return "sparse" if sparse_cost < pat.dense_cost or dense_entries > 2e7 else "dense"


# ---------------------------------------------------------------------------------------------
# building the arrays (numpy)


def sparse_arrays(design, pat: Pattern, blockvals: list, xvals: dict, diagvals: list):
    """Sparse21 and the flat lower-triangular panel storage of A₂₂ from accumulated block values.

    blockvals[k]: (n_blocks_k, q₁, q_k) values of the A₂₁ blocks of rest factor k;
    xvals[(a, b)]: (n_cross, q_a, q_b) blocks of Z_aᵀZ_b; diagvals[k]: (L_k, q_k, q_k)."""
    f1, rest = design.factors[0], design.factors[1:]
    lay = pat.layout
    q1, L1 = f1.q, f1.n_levels
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
    ea = np.concatenate(ea_l)
    eb = np.concatenate(eb_l)
    tgt = row_start[slot[ea]] + slot_local[slot[eb]]  # = flat(...): slot[ea] ≥ slot[eb] here
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
    return sx, f64(A22)


# ---------------------------------------------------------------------------------------------
# differentiable primitives with hand-written derivatives


def _lapack(L) -> bool:
    """LAPACK (fast for one large matrix) only for a single panel larger than the unrolled size;
    batches of small blocks use plain XLA ops (jaxlib's batched CPU LAPACK calls can wedge
    their thread pool: see :mod:`jaxmixed.xla_linalg`)."""
    from jaxmixed.functional import UNROLL_MAX

    return L.ndim == 3 and L.shape[0] == 1 and L.shape[-1] > UNROLL_MAX


def _chol(S):
    if _lapack(S):
        return lax.linalg.cholesky(S, symmetrize_input=False)
    return xla.cholesky(S)


def _solve(L, B, transpose=False):
    """L⁻¹B (or L⁻ᵀB) for lower-triangular L, batched."""
    if _lapack(L):
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


def _inv_from_chol(L):
    """S⁻¹ = L⁻ᵀL⁻¹ from the Cholesky factor(s) L. One large panel (InstEval's 1,142 columns)
    goes through the block recursions above, ~3× faster than a solve with the identity and a
    full product; batches of small blocks through plain XLA ops."""
    if _lapack(L):
        return _gram_lower(_tri_inv(L[0]))[None]
    n = L.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(n, dtype=L.dtype), L.shape)
    Li = _solve(L, eye)
    return jnp.einsum("...ki,...kj->...ij", Li, Li)


@jax.custom_jvp
def spd_inverse(S, L):
    """S⁻¹ for S = LLᵀ (L its Cholesky factor, passed so it is not recomputed).

    d(S⁻¹) = −S⁻¹ dS S⁻¹ (L's tangent is ignored: L is a function of S)."""
    return _inv_from_chol(L)


@spd_inverse.defjvp
def _spd_inverse_jvp(primals, tangents):
    S, L = primals
    dS, _ = tangents
    Si = spd_inverse(S, L)
    return Si, -(Si @ dS @ Si)


@jax.custom_jvp
def logdet_spd(S, L):
    """Σ_b log|S_b| from the Cholesky factors L; d log|S| = tr(S⁻¹ dS) (L's tangent ignored)."""
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)))


@logdet_spd.defjvp
def _logdet_spd_jvp(primals, tangents):
    S, L = primals
    dS, _ = tangents
    return logdet_spd(S, L), jnp.sum(spd_inverse(S, L) * dS)


@jax.custom_jvp
def logdet_quad(S, C):
    """(Σ_b log|S_b|, Σ_b C_bᵀ S_b⁻¹ C_b) over a batch of SPD panels S (n, P, P), C (n, P, r)."""
    L = _chol(S)
    z = _solve(L, C)
    ld = 2.0 * jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)))
    return ld, jnp.einsum("bpi,bpj->ij", z, z)


@logdet_quad.defjvp
def _logdet_quad_jvp(primals, tangents):
    """d log|S| = tr(S⁻¹dS), d(CᵀS⁻¹C) = dCᵀX + XᵀdC − XᵀdS X with X = S⁻¹C.

    Everything here is written through S⁻¹ (``spd_inverse``) and ``logdet_spd``, whose own
    derivatives are the textbook ones, and L is a constant for differentiation: a second
    derivative (Newton, the η-Hessian of inference) then costs two matrix products per
    direction (−S⁻¹ dS S⁻¹), not the Cholesky's own derivative (two triangular solves more)."""
    S, C = primals
    dS, dC = tangents
    L = lax.stop_gradient(_chol(S))
    Si = spd_inverse(S, L)
    X = Si @ C
    ld = logdet_spd(S, L)
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
    """Lower-triangular panels → symmetric."""
    d = jnp.diagonal(A, axis1=-2, axis2=-1)
    return A + jnp.swapaxes(A, -1, -2) - d[..., :, None] * jnp.eye(A.shape[-1], dtype=A.dtype)


class Prepared(NamedTuple):
    L1: jnp.ndarray  # (L₁, q₁, q₁)
    K: jnp.ndarray  # (L₁, q₁, q₁) = L₁⁻¹ Λ₁ᵀ
    ld1: jnp.ndarray  # Σ log|C₁ℓ|
    M1: jnp.ndarray  # WᵀW − r₁ᵀr₁
    S: tuple  # per bucket (n, P, P)
    C: tuple  # per bucket (n, P, p+1)


def prepare(theta, stats, struct, lams) -> Prepared:
    """First-factor elimination and the panel systems S, C at θ (see the module docstring)."""
    lay = struct.engine
    sx: Sparse21 = stats.A21
    lam1 = lams[0]
    q1 = struct.q[0]
    C1 = jnp.einsum("ji,ljk,kh->lih", lam1, stats.D11, lam1) + jnp.eye(q1)
    L1 = xla.cholesky(C1)
    K = xla.solve_lower(L1, jnp.broadcast_to(lam1.T, C1.shape))
    G = jnp.einsum("lki,lkj->lij", K, K)  # Λ₁ C₁⁻¹ Λ₁ᵀ
    H = G @ stats.Z1W  # (L₁, q₁, p+1)
    ld1 = 2.0 * jnp.sum(jnp.log(jnp.diagonal(L1, axis1=1, axis2=2)))
    M1 = stats.WW - jnp.einsum("lir,lis->rs", stats.Z1W, H)
    if q1 == 1:
        vals = G[sx.pair_lev, 0, 0] * sx.pair_coef[:, 0, 0]
        upd = (sx.V[:, 0][:, None]) * H[sx.lev, 0, :]
    else:
        vals = jnp.einsum("pij,pij->p", G[sx.pair_lev], sx.pair_coef)
        upd = jnp.einsum("ei,eir->er", sx.V, H[sx.lev])
    A = stats.A22 - jax.ops.segment_sum(vals, sx.pair_tgt, lay.n_flat, indices_are_sorted=True)
    Z2W = jnp.concatenate([stats.Z2W, jnp.zeros((1, stats.Z2W.shape[1]), stats.Z2W.dtype)])
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


def deviance_parts(theta, stats, struct, lams):
    """(log|L|², log|R_X|², r²) at θ through the blocked engine."""
    pr = prepare(theta, stats, struct, lams)
    ld, M = pr.ld1, pr.M1
    for S, C in zip(pr.S, pr.C):
        l2, Q = logdet_quad(S, C)
        ld = ld + l2
        M = M - Q
    LM = xla.cholesky(M)
    p = struct.p
    d = jnp.diagonal(LM)
    logdet_RX = 2.0 * jnp.sum(jnp.log(jnp.maximum(d[:p], 1e-300)))
    return ld, logdet_RX, LM[p, p] ** 2


def solve_parts(theta, stats, struct, lams, beta_of):
    """Back-substitution: returns (LM, u1, u2 natural order) given ``beta_of(LM) -> β``."""
    lay = struct.engine
    sx: Sparse21 = stats.A21
    pr = prepare(theta, stats, struct, lams)
    Ls = [_chol(S) for S in pr.S]
    zs = [_solve(L, C) for L, C in zip(Ls, pr.C)]
    M = pr.M1
    for z in zs:
        M = M - jnp.einsum("bpi,bpj->ij", z, z)
    LM = xla.cholesky(M)
    beta = beta_of(LM)
    p = struct.p
    u_slots = []
    for L, z in zip(Ls, zs):
        rhs = z[..., p] - z[..., :p] @ beta
        u = _solve(L, rhs[..., None], transpose=True)
        u_slots.append(u[..., 0].reshape(-1))
    u2 = jnp.concatenate(u_slots)[sx.nat_slot]
    # b₂ = Λ₂u₂ (natural order), then Wᵀu₂ per first-factor level
    parts, off = [], 0
    for lam, L, q in zip(lams[1:], struct.L[1:], struct.q[1:]):
        parts.append((u2[off:off + L * q].reshape(L, q) @ lam.T).reshape(-1))
        off += L * q
    b2 = jnp.concatenate(parts)
    Bu = jax.ops.segment_sum(sx.V * b2[sx.nat][:, None], sx.lev, struct.L[0], indices_are_sorted=True)
    lam1 = lams[0]
    c1 = jnp.einsum("ji,ljr->lir", lam1, stats.Z1W)
    r1 = xla.solve_lower(pr.L1, c1)
    rhs1 = r1[..., p] - r1[..., :p] @ beta
    Wu = xla.solve_lower(pr.L1, (Bu @ lam1)[..., None])[..., 0]
    u1 = xla.solve_lower_t(pr.L1, (rhs1 - Wu)[..., None])[..., 0]
    return LM, beta, u1, u2


def conditional_blocks(theta, stats, struct, lams):
    """Diagonal blocks of (LLᵀ)⁻¹ (spherical u): first factor (L₁, q₁, q₁), then per rest factor."""
    lay = struct.engine
    sx: Sparse21 = stats.A21
    pr = prepare(theta, stats, struct, lams)
    coef_t = _lam_table(lams)[sx.lam_idx_t]
    Rflat = []
    for S, b in zip(pr.S, lay.buckets):
        Si = _inv_from_chol(_chol(S))
        sl = slice(b.slot0, b.slot0 + b.n * b.P)
        R = _scale_panels(Si, coef_t[sl].reshape(b.n, b.P, -1), sx.sib[sl].reshape(b.n, b.P, -1),
                          lay.scalar_rest)  # Λ₂ S⁻¹ Λ₂ᵀ
        Rflat.append(Si.reshape(-1))
        Rflat.append(R.reshape(-1))
    Si_flat = jnp.concatenate(Rflat[0::2])
    R_flat = jnp.concatenate(Rflat[1::2])
    q1 = struct.q[0]
    # Σ_{e,e' ∈ ℓ} V[e] R[c_e, c_e'] V[e']ᵀ from the lower-triangular pairs
    Rp = R_flat[sx.pair_tgt]
    sym = sx.pair_coef + jnp.swapaxes(sx.pair_coef, 1, 2)
    contrib = Rp[:, None, None] * jnp.where(sx.pair_diag[:, None, None], 0.5 * sym, sym)
    BSB = jax.ops.segment_sum(contrib, sx.pair_lev, struct.L[0])  # A₂₁ℓ R A₂₁ℓᵀ
    C1inv = jnp.einsum("lki,lkj->lij", *(2 * [xla.solve_lower(pr.L1, jnp.broadcast_to(jnp.eye(q1), pr.L1.shape))]))
    lam1 = lams[0]
    T = C1inv @ (lam1.T @ BSB @ lam1) @ C1inv
    out = [C1inv + T]
    off = 0
    for L, q in zip(struct.L[1:], struct.q[1:]):
        s = sx.nat_slot[off:off + L * q].reshape(L, q)
        idx = sx.slot_base[s[:, :, None]] + sx.slot_local[s[:, :, None]] * sx.slot_P[s[:, :, None]] \
            + sx.slot_local[s[:, None, :]]
        out.append(Si_flat[idx])
        off += L * q
    return out
