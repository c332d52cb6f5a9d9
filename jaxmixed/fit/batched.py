"""Many responses, one design: fit them all in one vmapped, jitted program.

In mass-univariate work (voxels, genes, items, simulated data sets) the same model is fitted to
many responses that share X and Z. The sufficient statistics of :mod:`jaxmixed.stats` depend on
y only through the last column of W = [X y]: Z₁ᵀy, Z₂ᵀy, Xᵀy and yᵀy. ``fit_many`` forms those
for a whole block of responses at once (sparse and dense matrix products, no loop over
responses), and runs the projected-Newton optimiser of ``jm.fit`` under ``jax.vmap`` over them,
together with the solve for β, σ and the Hessian that gives the variance components' standard
errors. Every response is fitted as ``jm.fit`` would fit it alone: the same projected Newton
(run to convergence lane by lane), the same restarts from scaled and mirrored starts when a run
does not converge or stops on the boundary, the same convergence and singularity rules. Later
chunks start from the typical θ̂ of the first (see ``fit_responses``), which changes the path,
not the optimum; estimates agree with ``jm.fit``'s to its optimiser's tolerance (≤ 1e-6).

Memory stays bounded by fitting the responses in chunks of ``chunk_size`` lanes (the last chunk
is padded with copies, so every chunk reuses one compiled program). Inside the program the
small Cholesky factorisations and triangular solves run as plain XLA operations
(``functional.without_lapack``), far faster than one LAPACK call per tiny block, and on CPU the
program is compiled without XLA's YNNPACK/XNNPACK library fusions (2× faster here).

Missing values: the design must be the same for every response, so the rows used are those
complete in every variable the model reads *and in every response*; the others are dropped and
counted (``ManyResult.n_dropped``, and a note). To use each response's own complete rows, call
``jm.fit`` per response instead.

Device: ``device=`` (a ``jax.Device`` or a string such as ``"cpu"``, ``"gpu"``, ``"cuda:1"``)
places the statistics there with ``jax.device_put``, so the programs run there; by default JAX's
default device is used.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp

from jaxmixed.model import covariance
from jaxmixed.inference import tables as inference
from jaxmixed.inference import distributions as sps
from jaxmixed.data.design import Design, build_design
from jaxmixed.runtime.devices import put, resolve_device  # noqa: F401 (part of this module's interface)
from jaxmixed.errors import DataError, ModelError, integer_argument
from jaxmixed.inference.tables import SINGULAR_TOL, _pair_of, loglik_eta
from jaxmixed.functional import deviance_free, solve_free, without_lapack
from jaxmixed.fit.optimizers import minimize_bounded, minimize_quasi_newton
from jaxmixed.data.crossprod import Stats, Structure, _sparse_z, cross_products, structure_of

__all__ = ["ManyResult", "fit_many", "resolve_device"]

START_SCALES = (1.0, 0.1, 10.0, 0.01)  # as jm.fit: θ₀ × scale until the optimiser converges
MEMORY_BUDGET = 256 * 2**20  # bytes per chunk used to choose a default chunk size
MAX_CHUNK = 4096
CPU_CHUNK = 32
# Blocks of order > functional.UNROLL_MAX: LAPACK (False; safe from jaxlib 0.10's LAPACK
# thread-pool deadlock because jaxmixed runs XLA with --xla_cpu_multi_thread_eigen=false, and
# far quicker to compile) or a plain-XLA column loop (True).
LARGE_WITHOUT_LAPACK = False


# --------------------------------------------------------------------------------------------
# the batched program


def _term_eta(structure, S):
    """Stata's η (ln sd, atanh corr) of one term from its covariance matrix S, in jnp
    (mirrors ``covariance.*.eta_from_sigma``, which is numpy-only)."""
    q = S.shape[0]
    d = jnp.diagonal(S)
    if isinstance(structure, covariance.Identity):
        return 0.5 * jnp.log(jnp.mean(d))[None]
    if isinstance(structure, covariance.Independent):
        return 0.5 * jnp.log(d)
    if isinstance(structure, covariance.Exchangeable):
        var = jnp.mean(d)
        cov = (jnp.sum(S) - jnp.trace(S)) / (q * (q - 1))
        rho = jnp.clip(cov / var, -1 + 1e-15, 1 - 1e-15)
        return jnp.stack([0.5 * jnp.log(var), jnp.arctanh(rho)])
    if isinstance(structure, covariance.Unstructured):
        sd = jnp.sqrt(d)
        R = S / jnp.outer(sd, sd)
        pairs = covariance._pairs(q)
        rho = jnp.clip(jnp.stack([R[i, j] for i, j in pairs]), -1 + 1e-15, 1 - 1e-15)
        return jnp.concatenate([jnp.log(sd), jnp.arctanh(rho)])
    raise ModelError(f"fit_many does not support the covariance structure {type(structure).__name__}")


def eta_of(theta, sigma, struct: Structure):
    """η = (each term's ln sd / atanh corr, ln σ) at θ, σ (jit- and vmap-compatible)."""
    parts = []
    for t in struct.terms:
        lam = t.structure.lam(theta[t.theta[0]:t.theta[1]])
        parts.append(_term_eta(t.structure, sigma**2 * lam @ lam.T))
    parts.append(jnp.log(sigma)[None])
    return jnp.concatenate(parts)


def with_response(base: Stats, z1y, z2y, xy, yy) -> Stats:
    """``base`` with the y-dependent entries (last column of Z₁ᵀW, Z₂ᵀW, last row/column of
    WᵀW) replaced by those of another response."""
    WW = base.WW.at[-1, :-1].set(xy).at[:-1, -1].set(xy).at[-1, -1].set(yy)
    return base._replace(Z1W=base.Z1W.at[..., -1].set(z1y), Z2W=base.Z2W.at[:, -1].set(z2y), WW=WW)


# XLA:CPU options for the batched programs: its YNNPACK/XNNPACK library fusions are slow on
# the many small tensors of a batch of mixed-model fits (2x here); plain XLA fusions are used.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_experimental_xnn_fusion_type": ""}


def _fit_lanes(theta0, lower, base: Stats, z1y, z2y, xy, yy, reml, scale=None, *, struct: Structure,
               max_iter: int = 200, hessian: bool = True):
    """Fit a batch of responses (leading axis of theta0, z1y, z2y, xy, yy) in one program:
    the optimiser of ``fitting.optimize_theta`` (projected Newton, or projected BFGS where the
    Structure asks for it), the solve at θ̂ and, with ``hessian``, the Hessian of the log
    likelihood in Stata's metric η. Cholesky factors and triangular solves of order ≤
    ``functional.UNROLL_MAX`` (the per-level blocks) run as unrolled XLA operations
    (``functional.without_lapack``), larger ones with LAPACK unless LARGE_WITHOUT_LAPACK.
    As in ``optimize_theta``, the optimiser works on θ / ``scale`` (``Design.theta_scale``);
    starts, bounds and results are θ in the data's units."""
    dev = partial(deviance_free, struct=struct, large=LARGE_WITHOUT_LAPACK)
    loglik = without_lapack(lambda e, s, r: loglik_eta(e, s, struct, r), LARGE_WITHOUT_LAPACK)
    unit = jnp.ones_like(lower) if scale is None else scale

    def one(th0, a, b, c, d):
        st = with_response(base, a, b, c, d)
        if getattr(struct, "quasi_newton", False):
            opt = minimize_quasi_newton(lambda t, s, r: dev(t * unit, s, reml=r), th0 / unit, lower / unit,
                                        (st, reml), max_iter=max_iter)
        else:
            opt = minimize_bounded(lambda t, s, r: dev(t * unit, s, reml=r), th0 / unit, lower / unit,
                                   (st, reml), max_iter=max_iter, hessian="forward")
        theta = opt.x * unit
        sol = solve_free(theta, st, struct, reml, LARGE_WITHOUT_LAPACK)
        eta = eta_of(theta, sol.sigma, struct)
        out = dict(theta=theta, fun=opt.fun, n_iter=opt.n_iter, opt_converged=opt.converged,
                   beta=sol.beta, sigma=sol.sigma, cov_beta=sol.cov_beta, eta=eta)
        if hessian:
            out["H"] = jax.jacfwd(jax.jacfwd(loglik))(eta, st, reml)
        return out

    return jax.vmap(one)(theta0, z1y, z2y, xy, yy)


@lru_cache(maxsize=64)
def _program(struct: Structure, max_iter: int, hessian: bool, platform: str):
    """The jitted batch program for one model shape (static arguments bound, so a call passes
    arrays only: the fast dispatch path)."""
    fn = partial(_fit_lanes, struct=struct, max_iter=max_iter, hessian=hessian)
    if platform == "cpu":
        try:
            return jax.jit(fn, compiler_options=CPU_COMPILER_OPTIONS)
        except TypeError:  # a jax without per-jit compiler options
            pass
    return jax.jit(fn)


def fit_lanes(theta0, lower, base: Stats, z1y, z2y, xy, yy, struct: Structure, reml,
              max_iter: int = 200, hessian: bool = True, platform: str | None = None, scale=None):
    """``_fit_lanes`` compiled for ``platform`` (default: JAX's default backend)."""
    program = _program(struct, int(max_iter), bool(hessian), platform or jax.default_backend())
    return program(theta0, lower, base, z1y, z2y, xy, yy, reml=reml, scale=scale)


# --------------------------------------------------------------------------------------------
# driving it: chunks, restarts, progress


class _Progress:
    """A one-line text progress bar on stderr (only when asked for)."""

    def __init__(self, total: int, enabled: bool, label: str = "fit_many"):
        self.total, self.enabled, self.label, self.done = total, enabled, label, 0

    def update(self, k: int):
        self.done += k
        if self.enabled:
            frac = self.done / max(self.total, 1)
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r{self.label}: [{bar:<30}] {self.done}/{self.total}")
            sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _next_pow2(k: int) -> int:
    return 1 << max(0, int(k - 1).bit_length())


def default_chunk_size(struct: Structure, platform: str = "cpu") -> int:
    """Lanes per chunk: on CPU 32 (the batch's working set then stays in cache; larger batches
    are slower per response), elsewhere as many as keep one chunk's working memory near
    MEMORY_BUDGET (at most MAX_CHUNK)."""
    L1, q1, m2, p, nt = struct.L[0], struct.q[0], struct.m2, struct.p, struct.n_theta
    per_lane = 8 * (3 * m2 * m2 + 3 * L1 * q1 * (m2 + p + 1 + q1) + (p + 1) ** 2) * (nt + 2) ** 2
    lanes = max(1, MEMORY_BUDGET // max(per_lane, 1))
    cap = CPU_CHUNK if platform == "cpu" else MAX_CHUNK
    return int(min(cap, 1 << (int(lanes).bit_length() - 1)))


class _YParts:
    """Z₁ᵀY, Z₂ᵀY, XᵀY and the column sums of squares for a block of responses Y (n × b)."""

    def __init__(self, design: Design):
        f1 = design.factors[0]
        self.L1, self.q1 = f1.n_levels, f1.q
        self.Z1t = _sparse_z(f1.codes, f1.Z, f1.n_levels).T.tocsr()
        rest = design.factors[1:]
        self.Z2t = sp.hstack([_sparse_z(f.codes, f.Z, f.n_levels) for f in rest]).T.tocsr() if rest else None
        self.Xt = np.ascontiguousarray(design.X.T)

    def __call__(self, Y: np.ndarray):
        b = Y.shape[1]
        z1y = np.asarray(self.Z1t @ Y).reshape(self.L1, self.q1, b).transpose(2, 0, 1)
        z2y = np.asarray(self.Z2t @ Y).T if self.Z2t is not None else np.zeros((b, 0))
        xy = (self.Xt @ Y).T
        yy = np.einsum("ij,ij->j", Y, Y)
        return z1y, z2y, xy, yy


def _take(parts, idx):
    return tuple(a[idx] for a in parts)


class _Opt(NamedTuple):
    fun: float
    converged: bool
    x: np.ndarray


def fit_responses(design: Design, get_y: Callable[[int, int], np.ndarray], k: int, reml: bool, *,
                  chunk_size: int | None = None, progress: bool = False, device=None, start=None,
                  hessian: bool = True, label: str = "fit_many", warm_start="auto") -> dict:
    """Fit ``k`` responses sharing ``design``; ``get_y(i, j)`` returns responses i..j-1 as an
    (nobs × (j-i)) array. Returns numpy arrays with a leading axis of length k.

    Each response gets jm.fit's search (``fitting._best_fit``): θ₀ × 1, then × 0.1, 10, 0.01
    while the best run has not converged or sits on the boundary, then up to three mirror
    images of a boundary optimum; the same ``fitting._better`` rule picks the best run. The
    later runs are batched too, over the responses that need them.

    ``warm_start``: "auto" (with no ``start``) fits the first chunk exactly so, then starts
    later chunks from the median θ̂ of the first chunk's interior fits (responses sharing a
    design have similar θ̂, so Newton needs far fewer iterations); a response whose warm run
    does not converge to an interior point then gets all of jm.fit's starts, θ₀ × 1 included,
    so its estimate is jm.fit's whenever the optimum is unique (and never a worse optimum).
    A θ vector: that warm start from the first chunk on. False: jm.fit's starts only.
    """
    from jaxmixed.api import fit as fitting

    dev = resolve_device(device)
    struct = structure_of(design)
    base = put(cross_products(design), dev)
    lower = put(jnp.asarray(design.theta_lower), dev)
    unit = put(jnp.asarray(design.theta_scale), dev)
    theta0 = design.theta0 if start is None else np.asarray(start, dtype=float)
    if theta0.shape != (design.n_theta,):
        raise ModelError(f"start must have {design.n_theta} entries (θ), not {theta0.shape}")
    platform = dev.platform if dev is not None else jax.default_backend()
    chunk = (default_chunk_size(struct, platform) if chunk_size is None
             else integer_argument(chunk_size, "chunk_size"))
    lanes = min(chunk, _next_pow2(k))
    yparts = _YParts(design)
    reml_arr = jnp.asarray(bool(reml))

    def run(parts, th0):
        """Fit len(parts[0]) ≤ lanes responses from starts th0 ((b, n_theta) or (n_theta,)),
        padded to ``lanes`` with copies of the first."""
        b = parts[0].shape[0]
        pad = np.concatenate([np.arange(b), np.zeros(lanes - b, dtype=int)])
        # (contiguous copies: jaxlib 0.10 can hang on zero-stride numpy inputs)
        args = put(tuple(jnp.asarray(np.ascontiguousarray(a[pad])) for a in parts), dev)
        th = np.array(np.broadcast_to(th0, (b, design.n_theta)), dtype=float)[pad]
        out = fit_lanes(put(jnp.asarray(th), dev), lower, base, *args, struct, reml_arr, hessian=hessian,
                        platform=platform, scale=unit)
        return {key: np.array(v)[:b] for key, v in out.items()}

    def rerun(best, parts, idx, starts):
        """Run lanes ``idx`` from ``starts``; keep the better runs (fitting._better); return
        the mask (over idx) of the lanes whose run was kept."""
        kept = np.zeros(idx.size, dtype=bool)
        for s in range(0, idx.size, lanes):
            sub = idx[s:s + lanes]
            new = run(_take(parts, sub), starts[s:s + lanes])
            for j, lane in enumerate(sub):
                a = _Opt(new["fun"][j], bool(new["opt_converged"][j]), new["theta"][j])
                b = _Opt(best["fun"][lane], bool(best["opt_converged"][lane]), best["theta"][lane])
                if fitting._better(a, b):
                    kept[s + j] = True
                    for key in best:
                        best[key][lane] = new[key][j]
        return kept

    def needs_more(best, lane):
        return not (bool(best["opt_converged"][lane]) and
                    not inference.is_singular(best["theta"][lane], struct, design.theta_scale))

    has_mirror = any(isinstance(t.structure, covariance.Unstructured) for t in struct.terms)
    named = isinstance(warm_start, (bool, str))
    if named and warm_start not in (True, False, "auto"):
        raise ModelError(f"warm_start must be 'auto', True, False or a θ vector, not {warm_start!r}")
    warm = named and (warm_start is True or (warm_start == "auto" and start is None))
    warm_theta = None
    if not named:
        warm_theta = np.asarray(warm_start, dtype=float)
        if warm_theta.shape != (design.n_theta,):
            raise ModelError(f"warm_start must have {design.n_theta} entries (θ), not {warm_theta.shape}")
    results = []
    bar = _Progress(k, progress, label)
    for i in range(0, k, lanes):
        j = min(i + lanes, k)
        Y = np.asarray(get_y(i, j), dtype=float)
        if Y.shape != (design.nobs, j - i):
            raise DataError(f"responses {i}..{j - 1}: expected shape {(design.nobs, j - i)}, got {Y.shape}")
        parts = yparts(Y)
        if warm_theta is None:
            best = run(parts, theta0)
            scales = START_SCALES[1:]
        else:  # a warm start first; then jm.fit's own starts wherever it would have gone on
            best = run(parts, warm_theta)
            scales = START_SCALES
        for scale in scales:
            todo = np.array([lane for lane in range(j - i) if needs_more(best, lane)], dtype=int)
            if todo.size == 0:
                break
            rerun(best, parts, todo, np.broadcast_to(theta0 * scale, (todo.size, design.n_theta)))
        if warm and warm_theta is None:
            interior = np.array([not needs_more(best, lane) for lane in range(j - i)])
            if interior.sum() >= min(8, j - i):
                warm_theta = np.median(best["theta"][interior], axis=0)
        if has_mirror:
            todo = np.arange(j - i)
            for _ in range(3):
                mirrors = [fitting._mirrored(best["theta"][lane], struct, design.theta_scale) for lane in todo]
                keep = np.array([m is not None for m in mirrors], dtype=bool)
                todo = todo[keep]
                if todo.size == 0:
                    break
                starts = np.stack([m for m in mirrors if m is not None])
                todo = todo[rerun(best, parts, todo, starts)]
        results.append(best)
        bar.update(j - i)
    bar.close()
    return {key: np.concatenate([r[key] for r in results]) for key in results[0]}


# --------------------------------------------------------------------------------------------
# from raw arrays to tables


@dataclass(frozen=True)
class VCRow:
    group: str
    name: str
    kind: str  # sd, var, corr, cov
    idx: tuple  # η indices: (i,) or (sd_i, sd_j, corr) for cov


def vc_layout(design: Design, struct: Structure, variance: bool) -> list[VCRow]:
    """The rows of FitResult.random, in its order and metric, with the η entries each uses."""
    rows = []
    pos = 0
    for k, t in enumerate(struct.terms):
        spec_term = design.terms[k].term
        s = t.structure
        names = list(spec_term.display)
        labels, kinds = s.eta_names(names), s.eta_kinds
        idx_sd = [pos + i for i, kd in enumerate(kinds) if kd == "sd"]
        for i, (lab, kd) in enumerate(zip(labels, kinds)):
            if kd == "sd":
                rows.append(VCRow(spec_term.label, ("var" + lab[2:]) if variance else lab,
                                  "var" if variance else "sd", (pos + i,)))
            elif not variance:
                rows.append(VCRow(spec_term.label, lab, "corr", (pos + i,)))
            elif len(idx_sd) == 1:
                rows.append(VCRow(spec_term.label, "cov" + lab[4:], "cov", (idx_sd[0], idx_sd[0], pos + i)))
            else:
                a, b = _pair_of(lab, names)
                rows.append(VCRow(spec_term.label, "cov" + lab[4:], "cov", (idx_sd[a], idx_sd[b], pos + i)))
        pos += s.n_eta
    rows.append(VCRow("", "var(Residual)" if variance else "sd(Residual)", "var" if variance else "sd", (pos,)))
    return rows


def vc_values(eta: np.ndarray, layout: list[VCRow], cov_eta: np.ndarray | None = None, z: float = 1.96):
    """Estimates (k × rows) of the layout's rows from η (k × n_eta); with ``cov_eta``
    (k × n_eta × n_eta, NaN where undefined) also delta-method se and CIs (as FitResult.random:
    built on the ln/atanh scale and transformed back, symmetric for covariances)."""
    eta = np.atleast_2d(eta)
    k = eta.shape[0]
    est = np.empty((k, len(layout)))
    se = np.full((k, len(layout)), np.nan)
    lo, hi = se.copy(), se.copy()
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for r, row in enumerate(layout):
            if row.kind in ("sd", "var", "corr"):
                e = eta[:, row.idx[0]]
                if row.kind == "sd":
                    f, df = np.exp, np.exp
                elif row.kind == "var":
                    f, df = (lambda x: np.exp(2 * x)), (lambda x: 2 * np.exp(2 * x))
                else:
                    f, df = np.tanh, (lambda x: 1 - np.tanh(x) ** 2)
                est[:, r] = f(e)
                if cov_eta is not None:
                    se_e = np.sqrt(cov_eta[:, row.idx[0], row.idx[0]])
                    se[:, r] = np.abs(df(e)) * se_e
                    lo[:, r], hi[:, r] = f(e - z * se_e), f(e + z * se_e)
            else:
                i, j, c = row.idx
                rho = np.tanh(eta[:, c])
                sdij = np.exp(eta[:, i] + eta[:, j])
                est[:, r] = rho * sdij
                if cov_eta is not None:
                    g = np.zeros((k, eta.shape[1]))
                    g[:, i] += est[:, r]
                    g[:, j] += est[:, r]
                    g[:, c] = sdij * (1 - rho**2)
                    se[:, r] = np.sqrt(np.einsum("ki,kij,kj->k", g, cov_eta, g))
                    lo[:, r], hi[:, r] = est[:, r] - z * se[:, r], est[:, r] + z * se[:, r]
    # as inference._transform: a bound or se beyond double precision is not available, not inf
    se, lo, hi = (np.where(np.isfinite(v), v, np.nan) for v in (se, lo, hi))
    return est, se, lo, hi


def singular_mask(theta: np.ndarray, design: Design) -> np.ndarray:
    """Per row of θ (k × n_theta): a bounded θ entry within SINGULAR_TOL of 0 in the optimiser's
    units θ / ``design.theta_scale`` (lme4's rule, as ``inference.is_singular`` for every
    covariance structure)."""
    bounded = design.theta_lower == 0
    return np.any((np.atleast_2d(theta) / design.theta_scale < SINGULAR_TOL) & bounded, axis=1)


def hessian_covariance(H: np.ndarray, singular: np.ndarray):
    """cov(η) = (-H)⁻¹ per lane where the fit is not singular and -H is positive definite
    (NaN elsewhere), and the mask of lanes where it is."""
    k, m, _ = H.shape
    cov = np.full_like(H, np.nan)
    finite = np.all(np.isfinite(H), axis=(1, 2)) & ~singular
    ok = np.zeros(k, dtype=bool)
    if finite.any():
        negH = -H[finite]
        w = np.linalg.eigvalsh(negH)
        good = w[:, 0] > 1e-10 * np.maximum(w[:, -1], 1.0)
        idx = np.flatnonzero(finite)[good]
        if idx.size:
            inv = np.linalg.inv(-H[idx])
            cov[idx] = 0.5 * (inv + np.swapaxes(inv, 1, 2))
        ok[idx] = True
    return cov, ok


@dataclass(frozen=True)
class ManyResult:
    """Fits of one model to many responses (``jm.fit_many``).

    summary  DataFrame indexed by response: loglik, converged, singular, iterations
    fixed    tidy DataFrame: response, term, coef, se, z, p, ci_lower, ci_upper
    random   tidy DataFrame: response, group, name, estimate, se, ci_lower, ci_upper
             (the rows and metric of FitResult.random, e.g. sd(_cons), sd(Residual))
    responses  response names, in order
    theta, beta, sigma, loglik   arrays with one row per response
    nobs, n_dropped   observations used (the same for every response) and rows dropped
    converged and singular follow jm.fit's rules exactly.
    """

    responses: tuple
    method: str
    nobs: int
    n_dropped: int
    level: float
    variance: bool
    summary: pd.DataFrame
    fixed: pd.DataFrame
    random: pd.DataFrame
    theta: np.ndarray
    beta: np.ndarray
    sigma: np.ndarray
    loglik: np.ndarray
    notes: tuple
    design: Any = field(repr=False)

    def __len__(self) -> int:
        return len(self.responses)

    def wide(self) -> pd.DataFrame:
        """One row per response: loglik, converged, singular, then coef[term], se[term] for each
        fixed effect and one column per variance-component row ("school: sd(_cons)")."""
        out = self.summary[["loglik", "converged", "singular"]].copy()
        for col in ("coef", "se"):
            w = self.fixed.pivot(index="response", columns="term", values=col)
            for term in self.design.xnames:
                out[f"{col}[{term}]"] = w[term].reindex(out.index).to_numpy()
        labels = [f"{g}: {n}" if g else n for g, n in zip(self.random.group, self.random.name)]
        per = len(self.random) // max(len(self), 1)
        vals = self.random.estimate.to_numpy().reshape(len(self), per)
        for c, lab in enumerate(labels[:per]):
            out[lab] = vals[:, c]
        return out

    def __str__(self) -> str:
        s = self.summary
        lines = [f"fit_many: {len(self)} responses, {self.nobs} observations, {self.method.upper()}",
                 f"  converged {int(s.converged.sum())}/{len(self)}, singular {int(s.singular.sum())}"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def summarise(design: Design, raw: dict, names: Sequence, reml: bool, level: float, variance: bool,
              n_dropped: int = 0, notes: tuple = ()) -> ManyResult:
    """ManyResult from the arrays of ``fit_responses``."""
    struct = structure_of(design)
    k = len(names)
    z = sps.norm.ppf(0.5 + level / 200.0)
    theta = raw["theta"]
    singular = singular_mask(theta, design)
    cov_eta, hess_ok = hessian_covariance(raw["H"], singular)
    converged = raw["opt_converged"] & (singular | hess_ok)
    loglik = -0.5 * raw["fun"]
    names = list(names)
    summary = pd.DataFrame({"loglik": loglik, "converged": converged, "singular": singular,
                            "iterations": raw["n_iter"].astype(int)}, index=pd.Index(names, name="response"))
    beta = raw["beta"]
    se = np.sqrt(np.diagonal(raw["cov_beta"], axis1=1, axis2=2))
    p = design.p
    with np.errstate(invalid="ignore", divide="ignore"):
        zs = beta / se
    fixed = pd.DataFrame({
        "response": np.repeat(names, p), "term": np.tile(design.xnames, k),
        "coef": beta.ravel(), "se": se.ravel(), "z": zs.ravel(), "p": (2 * sps.norm.sf(np.abs(zs))).ravel(),
        "ci_lower": (beta - z * se).ravel(), "ci_upper": (beta + z * se).ravel()})
    layout = vc_layout(design, struct, variance)
    est, vse, lo, hi = vc_values(raw["eta"], layout, cov_eta, z)
    nr = len(layout)
    random = pd.DataFrame({
        "response": np.repeat(names, nr), "group": [r.group for r in layout] * k,
        "name": [r.name for r in layout] * k, "estimate": est.ravel(), "se": vse.ravel(),
        "ci_lower": lo.ravel(), "ci_upper": hi.ravel()})
    notes = list(notes)
    if (~converged).any():
        notes.append(f"{int((~converged).sum())} response(s) did not converge (see summary.converged)")
    return ManyResult(responses=tuple(names), method="reml" if reml else "ml", nobs=design.nobs,
                      n_dropped=n_dropped, level=float(level), variance=bool(variance), summary=summary,
                      fixed=fixed, random=random, theta=theta, beta=beta, sigma=raw["sigma"], loglik=loglik,
                      notes=tuple(notes), design=design)


# --------------------------------------------------------------------------------------------
# the public entry point


def _response_matrix(spec, data: pd.DataFrame, responses):
    """(Y as an n × k float array with NaN for missing, names) from ``responses``."""
    if responses is None:
        responses = [spec.response]
    if isinstance(responses, str):
        responses = [responses]
    if isinstance(responses, pd.DataFrame):
        names = [str(c) for c in responses.columns]
        Y = responses.to_numpy(dtype=float)
    elif isinstance(responses, (list, tuple, pd.Index)) and all(isinstance(r, str) for r in responses):
        names = list(responses)
        if not names:
            raise DataError("responses is empty")
        missing = [r for r in names if r not in data.columns]
        if missing:
            raise DataError(f"response column(s) {', '.join(map(repr, missing))} not in the data")
        if len(set(names)) != len(names):
            raise DataError("responses lists a column more than once")
        for r in names:
            if not pd.api.types.is_numeric_dtype(data[r]) or pd.api.types.is_bool_dtype(data[r]):
                raise DataError(f"response {r!r} is not numeric (dtype {data[r].dtype})")
        Y = data[names].to_numpy(dtype=float)
    else:
        try:
            Y = np.asarray(responses, dtype=float)
        except (TypeError, ValueError):
            raise DataError("responses must be a list of column names or a numeric (n × k) array") from None
        if Y.ndim == 1:
            Y = Y[:, None]
        if Y.ndim != 2:
            raise DataError(f"responses must be a 2-d (n × k) array, not {Y.ndim}-d")
        names = [f"y{j}" for j in range(Y.shape[1])]
    if Y.shape[0] != len(data):
        raise DataError(f"responses have {Y.shape[0]} rows but the data have {len(data)}")
    if Y.shape[1] == 0:
        raise DataError("responses is empty")
    if np.isinf(Y).any():
        bad = int(np.isinf(Y).any(axis=0).sum())
        raise DataError(f"{bad} response(s) have infinite values")
    return Y, names


def _check_responses(Y: np.ndarray, design: Design, names) -> None:
    """Responses the likelihood cannot handle (as jm.fit's checks, vectorised): constant,
    fitted exactly by the fixed effects, or of extreme magnitude."""
    from jaxmixed.data import design as _design

    def fail(mask, what):
        bad = [names[j] for j in np.flatnonzero(mask)]
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise DataError(f"response(s) {', '.join(map(repr, bad[:5]))}{more} {what}")

    big = np.max(np.abs(Y), axis=0)
    fail(~(big <= getattr(_design, "MAX_ABS", np.inf)), "have values too large for double-precision "
         "cross-products; rescale them")
    fail(np.ptp(Y, axis=0) == 0, "are constant: there is no variation to model")
    rms = np.sqrt(np.mean(Y**2, axis=0))
    fail(rms < getattr(_design, "MIN_RESPONSE_RMS", 0.0), "are on too small a scale for double precision; "
         "rescale them")
    X = design.X
    if 0 < X.shape[1] < X.shape[0]:
        Q = np.linalg.qr(X)[0]  # X has full column rank (collinear columns were dropped)
        resid = np.sqrt(np.mean((Y - Q @ (Q.T @ Y)) ** 2, axis=0))
        fail(resid <= 1e-10 * np.std(Y, axis=0) + 1e-13 * big,
             f"are fitted exactly by the fixed effects: the residual variance would be zero")


def fit_many(formula: str, data: pd.DataFrame, responses=None, method: str = "reml", *,
             chunk_size: int | None = None, progress: bool = False, device=None, level: float = 95.0,
             variance: bool = False, start=None, warm_start="auto") -> ManyResult:
    """Fit one mixed model to many responses that share its design, in one batched program.

    formula     lme4-style formula (``"y ~ x + (1 + x || g)"``) or a Stata ``mixed`` command
                (``"y x || g: x"``); its response names a placeholder when ``responses`` is given
                (it need not be a column).
    responses   column names of ``data``, a DataFrame, or an (n × k) array with n = len(data),
                rows in the order of ``data`` (array columns are named y0, y1, …); default the
                formula's response.
    method      "reml" or "ml".
    chunk_size  responses per compiled batch (default on CPU 32, on accelerators as many as
                keep a chunk's working memory near 256 MB, at most 4096). Each distinct chunk
                size compiles once (and a batch smaller than the chunk is padded to a power of
                two).
    progress    print a text progress bar on stderr.
    device      where to run: a ``jax.Device`` or a string ("cpu", "gpu", "cuda:1", …); default
                JAX's default device. The statistics are placed there with ``jax.device_put``.
    level, variance, start   as for ``jm.fit``.
    warm_start  "auto" (default): later chunks start from the median θ̂ of the first chunk's
                interior fits, with jm.fit's own starts as the fallback (see
                ``fit_responses``); False: jm.fit's starts only; or a θ vector.

    Rows used: those complete in every model variable and in every response (the design must be
    the same for all responses); ``n_dropped`` counts the others.

    Returns a ManyResult with tidy DataFrames ``summary``, ``fixed`` and ``random`` (the last in
    FitResult.random's names and metric) and ``wide()`` for one row per response.
    """
    from jaxmixed.api.fit import _method
    from jaxmixed.syntax.formula import parse_formula
    from jaxmixed.syntax.stata import parse_stata

    reml = _method(method)
    if not (10.0 <= float(level) <= 99.99):
        raise ModelError(f"level must be between 10 and 99.99, not {level}")
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame, not {type(data).__name__}")
    resolve_device(device)  # fail early on a bad device
    if not isinstance(formula, str):
        raise ModelError(f"formula must be a string, not {type(formula).__name__}")
    spec = parse_formula(formula) if "~" in formula else parse_stata(formula)
    res = spec.options.get("residuals")
    if res is not None and not getattr(res, "is_default", False):
        raise ModelError("fit_many supports independent, homoskedastic residuals only; "
                         "fit models with a residuals() structure with jm.fit")
    Y, names = _response_matrix(spec, data, responses)
    complete_y = ~np.isnan(Y).any(axis=1)
    # The formula's response is a placeholder: a complete column, so that only covariates,
    # groups and the responses decide which rows are used.
    cols = [v for v in spec.variables if v != spec.response and v in data.columns]
    frame = data[cols].reset_index(drop=True)
    frame[spec.response] = np.random.default_rng(0).standard_normal(len(frame))
    frame = frame.loc[complete_y].reset_index(drop=True)
    if len(frame) == 0:
        raise DataError("no observations left: every row has a missing value in some response")
    design = build_design(spec, frame)
    rows = np.flatnonzero(complete_y)[design.rows]
    n_dropped = len(data) - len(rows)
    if reml and design.nobs <= design.p:
        raise ModelError(f"REML needs more observations ({design.nobs}) than fixed effects ({design.p})")
    Yu = np.ascontiguousarray(Y[rows])
    _check_responses(Yu, design, names)
    notes = []
    if n_dropped:
        notes.append(f"{n_dropped} observation(s) dropped: missing in a model variable or in at least one response")
    for name in design.omitted:
        notes.append(f"{name} omitted because of collinearity")
    raw = fit_responses(design, lambda i, j: Yu[:, i:j], len(names), reml, chunk_size=chunk_size,
                        progress=progress, device=device, start=start, warm_start=warm_start)
    return summarise(design, raw, names, reml, level, variance, n_dropped, tuple(notes))
