"""Starts and the restart search: where the optimiser begins, and what it tries when a run fails.

One search serves a single fit (``jm.fit``: one lane) and batched fits (``fit_many``, the
bootstrap: many lanes, each run a vmapped program):

1. every lane from its start (θ₀);
2. while a lane's best run has not converged or sits on the boundary (which can be a local
   optimum), again from θ₀ × 0.1, × 10, × 0.01 (:data:`START_SCALES`), keeping the better run;
3. up to three times, from the mirror image of a boundary optimum (:func:`mirrored`).

"Better" is :func:`better`: a lower deviance, and at a tie a run that met its tolerance.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from jaxmixed.model.covariance import SINGULAR_TOL, Unstructured, _tril_indices, is_singular
from jaxmixed.model.spec import CONS

START_SCALES = (1.0, 0.1, 10.0, 0.01)  # θ₀ × scale until the optimiser converges to an interior point
MIRROR_ROUNDS = 3


def better(fun, converged, best_fun, best_converged):
    """A lower deviance wins; at a tie (the same optimum) a run that met the tolerance wins.
    Elementwise on arrays (one entry per lane); a bool for scalars."""
    fun, best_fun = np.asarray(fun, dtype=float), np.asarray(best_fun, dtype=float)
    converged, best_converged = np.asarray(converged, dtype=bool), np.asarray(best_converged, dtype=bool)
    with np.errstate(invalid="ignore"):
        tie = np.abs(fun - best_fun) <= 1e-9 * (1.0 + np.abs(fun))
        wins = (fun < best_fun - 1e-9) | (tie & converged & ~best_converged)
    out = np.where(~np.isfinite(best_fun), True, np.where(~np.isfinite(fun), False, wins))
    return bool(out) if out.ndim == 0 else out


def mirrored(theta: np.ndarray, terms, scale=None):
    """θ with the entries below each zero diagonal entry of an unstructured Λ negated, or None.

    A column of Λ whose diagonal entry is 0 may take either sign (same Σ), but the bound θ_jj ≥ 0
    lets the optimiser see only one side: a boundary point where the gradient pushes θ_jj
    outward can be a trap whose mirror image has a descent direction into the interior.
    "Zero" is tested in the optimiser's units, θ / ``scale`` (``Design.theta_scale``).
    ``terms``: each term's (structure, (start, stop) of its θ).
    """
    th = np.array(theta, dtype=float)
    rel = th if scale is None else th / np.asarray(scale, dtype=float)
    changed = False
    for structure, (a, b) in terms:
        if not isinstance(structure, Unstructured):
            continue
        rows, cols = _tril_indices(structure.q)
        block = th[a:b]  # a view: edits land in th
        unit = rel[a:b]
        for j in range(structure.q):
            below = (cols == j) & (rows > j)
            if unit[(cols == j) & (rows == j)][0] < SINGULAR_TOL and np.any(block[below] != 0):
                block[below] = -block[below]
                changed = True
    return th if changed else None


def restart_search(run: Callable, starts: np.ndarray, theta0: np.ndarray, terms, scale, *,
                   scales=START_SCALES[1:], x_key: str = "x", converged_key: str = "converged") -> dict:
    """The search of the module docstring over k lanes.

    ``run(lanes, starts)``: fits lanes ``lanes`` (an index array) from ``starts`` (one row each)
    and returns a dict of arrays with one row per lane, holding at least ``x_key`` (θ),
    ``"fun"`` (the deviance) and ``converged_key``. ``starts`` (k × n_theta): the first runs'
    starts; ``theta0``: the start that ``scales`` multiply; ``terms`` and ``scale`` as for
    :func:`mirrored` and the singularity test. Returns the best run of each lane, with
    ``"tried"``: the scales tried (a list per lane)."""
    k = starts.shape[0]
    structures = [s for s, _ in terms]
    slices = [sl for _, sl in terms]
    best = run(np.arange(k), starts)
    best = {key: np.array(v) for key, v in best.items()}
    tried = [[1.0] for _ in range(k)]

    def keep_better(lanes, new) -> np.ndarray:
        kept = better(new["fun"], new[converged_key], best["fun"][lanes], best[converged_key][lanes])
        for key in best:
            best[key][lanes[kept]] = np.asarray(new[key])[kept]
        return kept

    def needs_more() -> np.ndarray:
        return ~(best[converged_key].astype(bool) & ~is_singular(best[x_key], structures, slices, scale))

    for s in scales:
        lanes = np.flatnonzero(needs_more())
        if lanes.size == 0:
            break
        for lane in lanes:
            tried[lane].append(s)
        keep_better(lanes, run(lanes, np.broadcast_to(theta0 * s, (lanes.size, theta0.shape[0]))))
    if any(isinstance(st, Unstructured) for st in structures):
        lanes = np.arange(k)
        for _ in range(MIRROR_ROUNDS):
            mirrors = [mirrored(best[x_key][lane], terms, scale) for lane in lanes]
            lanes = lanes[np.array([m is not None for m in mirrors], dtype=bool)]
            if lanes.size == 0:
                break
            starts_m = np.stack([m for m in mirrors if m is not None])
            lanes = lanes[keep_better(lanes, run(lanes, starts_m))]
    best["tried"] = tried
    return best


def moment_start(design, cp) -> np.ndarray:
    """A starting θ from one-way ANOVA moments (numpy, from the cross-products ``cp``).

    For each random intercept (q = 1 term on the constant), the variance ratio of its factor
    alone, σ_b²/σ² ≈ (MSB − MSW)/(n₀ MSW), computed on the OLS residuals (Z_fᵀr and the level
    counts come from the cross-products); θ = its square root, at least 0.01. Crossed and
    nested factors bias these one-way moments, but they land near the optimum where θ = 1 may
    be far; other terms keep the default start."""
    theta0 = np.array(design.theta0, dtype=float)
    WW = np.asarray(cp.WW)
    p, n = design.p, design.nobs
    try:
        beta = np.linalg.solve(WW[:p, :p], WW[:p, p]) if p else np.zeros(0)
    except np.linalg.LinAlgError:
        return theta0
    rss = WW[p, p] - WW[p, :p] @ beta
    for t in design.terms:
        f = design.factors[t.factor]
        if t.theta[1] - t.theta[0] != 1 or f.q != 1 or f.colnames[0] != CONS:
            continue
        zr = np.asarray(cp.Z1W if t.factor == 0 else cp.Z2W[t.factor - 1])[:, 0, :]
        cnt = np.asarray(f.counts, dtype=float)
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
