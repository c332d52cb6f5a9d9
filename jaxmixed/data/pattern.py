"""The sparsity pattern of ZᵀZ: which levels of the grouping factors meet, and the panels.

Part of a design's *schema*: computed once from the level codes (numpy), before any
cross-product is formed, and passed explicitly to what needs it (the engine choice, the
cross-products, the blocked engine's static layout). Notation as in :mod:`jaxmixed.engine.pls_sparse`:
the first factor (most levels) stays block-diagonal; the other ("rest") factors' columns split
into independent *panels*, the connected components of the graph in which two rest levels are
joined when they share a level of the first factor or occur in the same row. Panels are padded
to a common size within size buckets (sizes within a factor 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxmixed.errors import ModelError

# ---------------------------------------------------------------------------------------------
# static layout (hashable, part of the engine's shape)


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


# ---------------------------------------------------------------------------------------------
# the pattern: computed once per design (numpy), from the level codes only


@dataclass
class Pattern:
    """Where the non-zero blocks of ZᵀZ are, and the panel layout they imply.

    A block of Z₁ᵀZ_k is a pair (ℓ, j) of a first-factor level and a level of rest factor k
    that occur together in some row; its key is ℓ L_k + j. Likewise for two rest factors."""

    n_levels: tuple  # levels of each factor, engine order
    blk_key: list  # per rest factor: sorted keys ℓ L_k + j of the A₂₁ blocks
    blk_lev: list  # block -> first-factor level
    blk_j: list  # block -> level of the rest factor
    x_key: dict  # (a, b) -> sorted keys j_a L_b + j_b of the cross blocks (rest factors a < b)
    x_j: dict  # (a, b) -> (levels of a, levels of b) per cross block
    panel_of_node: np.ndarray | None = None
    pos_of_node: np.ndarray | None = None
    layout: Layout | None = None
    slot_of_nat: np.ndarray | None = None
    dense_cost: float = 0.0
    pair_count: float = 0.0

    def _find(self, name, keys: np.ndarray, space: int, query: np.ndarray) -> np.ndarray:
        """The block of each pair key in ``query`` (all present in the sorted ``keys``): a gather
        from a dense table of the key space when it has at most DENSE_LOOKUP entries (built once
        per pattern; a binary search costs ~150 ns a row in random order), else ``searchsorted``."""
        if space > DENSE_LOOKUP:
            return np.searchsorted(keys, query)
        tables = self.__dict__.setdefault("_lookup", {})
        if name not in tables:
            table = np.full(space, -1, dtype=np.int32)
            table[keys] = np.arange(len(keys), dtype=np.int32)
            tables[name] = table
        return tables[name][query].astype(np.int64)

    def block_index(self, codes):
        """The :class:`~jaxmixed.data.crossprod.BlockIndex` of rows with level codes ``codes``
        (one array per factor, engine order): each row's A₂₁ and cross blocks (numpy)."""
        from jaxmixed.data.crossprod import BlockIndex

        L = self.n_levels
        a21 = tuple(self._find(("a21", k), key, L[0] * L[k + 1], codes[0].astype(np.int64) * L[k + 1] + codes[k + 1])
                    for k, key in enumerate(self.blk_key))
        pairs = cross_pairs(len(L) - 1)
        x22 = tuple(self._find(("x22", a, b), self.x_key[(a, b)], L[a + 1] * L[b + 1],
                               codes[a + 1].astype(np.int64) * L[b + 1] + codes[b + 1]) for a, b in pairs)
        return BlockIndex(a21=a21, x22=x22, n_a21=tuple(len(k) for k in self.blk_key),
                          n_x22=tuple(len(self.x_key[ab]) for ab in pairs))


DENSE_LOOKUP = 1 << 24  # pair-key spaces up to this size are looked up in a dense table (64 MB)
QUASI_NEWTON_FLOPS = 2e7  # panels costlier than this (Σ P³/3) are optimised without Hessians
MAX_PANEL_BYTES = 4 * 2**30


def size_buckets(sizes: np.ndarray):
    """(bucket of each item, padded size of each bucket): items whose sizes are within a factor
    2 (the same ⌈log₂ size⌉) share one bucket, padded to its largest size. The one bucketing
    rule of the package (the blocked engine's panels, the marginal engine's panels)."""
    sizes = np.asarray(sizes)
    key = np.ceil(np.log2(np.maximum(sizes, 1))).astype(np.int64)
    uniq, bucket_of = np.unique(key, return_inverse=True)
    padded = np.zeros(len(uniq), dtype=np.int64)
    np.maximum.at(padded, bucket_of, sizes.astype(np.int64))
    return bucket_of.reshape(sizes.shape), padded


def cross_pairs(n_rest: int) -> list[tuple[int, int]]:
    """The pairs (a, b), a < b, of rest factors, in the order of CrossProducts.X22."""
    return [(a, b) for a in range(n_rest) for b in range(a + 1, n_rest)]


def dense_block_index(codes, n_levels, xp=np):
    """The BlockIndex of the *full* pattern, in which every pair of levels is a block (key
    ℓ L_k + j itself): for codes that are traced under ``jit`` (:mod:`jaxmixed.functional`),
    where the pattern cannot be computed. A₂₁ then comes out dense, (L₁ L_k, q₁, q_k)."""
    from jaxmixed.data.crossprod import BlockIndex

    L = tuple(int(x) for x in n_levels)
    pairs = cross_pairs(len(L) - 1)
    return BlockIndex(a21=tuple(codes[0] * L[k] + codes[k] for k in range(1, len(L))),
                      x22=tuple(codes[a + 1] * L[b + 1] + codes[b + 1] for a, b in pairs),
                      n_a21=tuple(L[0] * L[k] for k in range(1, len(L))),
                      n_x22=tuple(L[a + 1] * L[b + 1] for a, b in pairs))


def build_pattern(design) -> Pattern:
    """The sparsity pattern of a design's ZᵀZ and the panel layout it implies, from the level
    codes only. Computed once per design by the caller and passed on explicitly (to
    :func:`choose_engine`, the cross-products and the engine's shape)."""
    f1, rest = design.factors[0], design.factors[1:]
    L1, q1 = f1.n_levels, f1.q
    blk_key, blk_lev, blk_j = [], [], []
    for f in rest:
        uniq = np.unique(f1.codes.astype(np.int64) * f.n_levels + f.codes)
        blk_key.append(uniq)
        blk_lev.append(uniq // f.n_levels)
        blk_j.append(uniq % f.n_levels)
    x_key, x_j = {}, {}
    for a, b in cross_pairs(len(rest)):
        fa, fb = rest[a], rest[b]
        uniq = np.unique(fa.codes.astype(np.int64) * fb.n_levels + fb.codes)
        x_key[(a, b)] = uniq
        x_j[(a, b)] = (uniq // fb.n_levels, uniq % fb.n_levels)
    pat = Pattern(tuple(f.n_levels for f in design.factors), blk_key, blk_lev, blk_j, x_key, x_j)
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
    bucket_of, padded = size_buckets(size)
    buckets = []
    pan_bucket = np.empty(n_pan, dtype=np.int64)
    pan_index = np.empty(n_pan, dtype=np.int64)
    slot0 = flat0 = 0
    for bi, P in enumerate(padded):
        members = np.flatnonzero(bucket_of == bi)
        P = int(P)
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


def choose_engine(design, pattern: Pattern, engine: str = "auto") -> str:
    """'dense' (A₂₁ dense, one dense Schur block) or 'sparse' (the blocked engine), from the design.

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
    pat = pattern
    # a scattered pair costs about as much as 20 flops of a dense (BLAS) WᵀW; the dense A₂₁
    # must also fit in memory comfortably
    sparse_cost = 20.0 * pat.pair_count * f1.q ** 2
    return "sparse" if sparse_cost < pat.dense_cost or dense_entries > 2e7 else "dense"


