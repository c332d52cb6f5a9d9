"""Batched fits: many responses that share one design, one vmapped, jitted program per chunk.

:func:`fit_responses` forms the y-dependent cross-products (Z₁ᵀy, Z₂ᵀy, Xᵀy, yᵀy) for a block of
responses with sparse and dense matrix products, and runs jm.fit's optimiser under ``jax.vmap``
over them (:func:`fit_lanes`), together with the solve for β, σ and the Hessian in the reporting
metric. Each response gets jm.fit's restart search (:mod:`jaxmixed.fit.search`), batched over the
responses that need another start. Later chunks start from the typical θ̂ of the first, which
changes the path, not the optimum.

Memory stays bounded by fitting the responses in chunks of ``chunk_size`` lanes (the last chunk
is padded with copies, so every chunk reuses one compiled program). The programs use the
"unrolled" kernel policy (:mod:`jaxmixed.engine.kernels`: small factorisations as plain XLA
operations, far faster than one LAPACK call per tiny block) and on CPU are compiled without
XLA's YNNPACK/XNNPACK library fusions (2× faster here). Used by ``jm.fit_many``
(:mod:`jaxmixed.api.many`) and the parametric bootstrap.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmixed.data.design import Design
from jaxmixed.engine import pls
from jaxmixed.errors import DataError, ModelError, integer_argument
from jaxmixed.fit.optimizers import minimize_scaled
from jaxmixed.fit.search import START_SCALES, restart_search
from jaxmixed.model.covariance import is_singular
from jaxmixed.runtime.devices import put, resolve_device

__all__ = ["fit_responses", "fit_lanes"]

MEMORY_BUDGET = 256 * 2**20  # bytes per chunk used to choose a default chunk size
MAX_CHUNK = 4096
CPU_CHUNK = 32
MAX_WORKERS = 8  # chunks run at once on the CPU (one core each), at most
READ_BLOCK = 1024  # responses read and reduced to their cross-products at once (a multiple of the chunk)
# The kernel policy of the batched programs (jaxmixed.engine.kernels): single matrices of order
# ≤ UNROLL_MAX as unrolled XLA operations, larger ones with LAPACK (safe from jaxlib 0.10's LAPACK
# thread-pool deadlock with --xla_cpu_multi_thread_eigen=false, and far quicker to compile).
KERNELS = "unrolled"


# --------------------------------------------------------------------------------------------
# the batched program


def with_response(base, z1y, z2y, xy, yy):
    """``base`` with the y-dependent entries (last column of Z₁ᵀW, Z₂ᵀW, last row/column of
    WᵀW) replaced by those of another response."""
    WW = base.WW.at[-1, :-1].set(xy).at[:-1, -1].set(xy).at[-1, -1].set(yy)
    return base._replace(Z1W=base.Z1W.at[..., -1].set(z1y), Z2W=base.Z2W.at[:, -1].set(z2y), WW=WW)


# XLA:CPU options for the batched programs: its YNNPACK/XNNPACK library fusions are slow on
# the many small tensors of a batch of mixed-model fits (2x here); plain XLA fusions are used.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_experimental_xnn_fusion_type": ""}


def _fit_lanes(theta0, lower, base, z1y, z2y, xy, yy, reml, scale=None, *, shape,
               max_iter: int = 200, hessian: bool = True):
    """Fit a batch of responses (leading axis of theta0, z1y, z2y, xy, yy) in one program:
    jm.fit's optimiser (projected Newton, or projected BFGS where the shape asks for it), the
    solve at θ̂ and, with ``hessian``, the Hessian of the log likelihood in Stata's metric η.
    ``shape.kernels`` is KERNELS (set by :func:`fit_lanes`). As in jm.fit the optimiser works on
    θ / ``scale`` (``Design.theta_scale``); starts, bounds and results are θ in the data's
    units."""
    unit = jnp.ones_like(lower) if scale is None else scale

    def one(th0, a, b, c, d):
        st = with_response(base, a, b, c, d)
        opt = minimize_scaled(lambda t, s_, r_: pls.deviance(t, s_, shape, r_), th0, lower, unit, (st, reml),
                              quasi_newton=shape.quasi_newton, max_iter=max_iter, hessian="forward")
        theta = opt.x
        sol = pls.solve(theta, st, shape, reml)
        eta = pls.eta_of(theta, sol.sigma, shape)
        out = dict(theta=theta, fun=opt.fun, n_iter=opt.n_iter, opt_converged=opt.converged,
                   beta=sol.beta, sigma=sol.sigma, cov_beta=sol.cov_beta, eta=eta)
        if hessian:
            out["H"] = jax.jacfwd(jax.jacfwd(lambda e: pls.loglik_eta(e, st, shape, reml)))(eta)
        return out

    return jax.vmap(one)(theta0, z1y, z2y, xy, yy)


#: primitives that JAX lowers to LAPACK calls on the CPU
LAPACK_PRIMITIVES = frozenset({"cholesky", "triangular_solve", "eigh", "eig", "lu", "geqrf", "geqp3",
                               "householder_product", "svd", "schur", "hessenberg", "tridiagonal",
                               "tridiagonal_solve", "qr"})


def _calls_lapack(jaxpr) -> bool:
    """Whether ``jaxpr`` (a Jaxpr or ClosedJaxpr) or any jaxpr inside it (loops, branches,
    custom derivatives) applies one of :data:`LAPACK_PRIMITIVES`."""
    seen, todo = set(), [jaxpr]
    while todo:
        j = todo.pop()
        j = getattr(j, "jaxpr", j)  # ClosedJaxpr -> Jaxpr
        if id(j) in seen or not hasattr(j, "eqns"):
            continue
        seen.add(id(j))
        for eqn in j.eqns:
            if eqn.primitive.name in LAPACK_PRIMITIVES:
                return True
            for v in eqn.params.values():
                for w in (v if isinstance(v, (tuple, list)) else (v,)):
                    if hasattr(w, "eqns") or hasattr(getattr(w, "jaxpr", None), "eqns"):
                        todo.append(w)
    return False


class _BatchProgram:
    """``jax.jit`` of a batch function, compiled ahead of time once per argument signature so
    that each executable's program can be inspected: :attr:`uses_lapack` tells whether any
    compiled so far calls LAPACK (then chunks are never run concurrently, see
    :func:`fit_responses`)."""

    def __init__(self, fn, options: dict | None):
        self.jitted = None
        if options:
            try:
                self.jitted = jax.jit(fn, compiler_options=options)
            except TypeError:  # a jax without per-jit compiler options
                pass
        if self.jitted is None:
            self.jitted = jax.jit(fn)
        self._compiled: dict = {}
        self._lock = threading.Lock()
        self.uses_lapack = False

    def __call__(self, *args, **kwargs):
        leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
        key = (tree, tuple((tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False))) for x in leaves))
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is None:  # compiled under the lock: concurrent chunks wait for one compile
                traced = self.jitted.trace(*args, **kwargs)
                self.uses_lapack = self.uses_lapack or _calls_lapack(traced.jaxpr)
                compiled = self._compiled[key] = traced.lower().compile()
        return compiled(*args, **kwargs)


@lru_cache(maxsize=64)
def _program(shape, max_iter: int, hessian: bool, platform: str) -> _BatchProgram:
    """The batch program for one model shape (static arguments bound, so a call passes arrays
    only: the fast dispatch path)."""
    fn = partial(_fit_lanes, shape=shape, max_iter=max_iter, hessian=hessian)
    return _BatchProgram(fn, CPU_COMPILER_OPTIONS if platform == "cpu" else None)


def _batch_program(shape, max_iter: int, hessian: bool, platform: str | None) -> _BatchProgram:
    from dataclasses import replace

    return _program(replace(shape, kernels=KERNELS), int(max_iter), bool(hessian), platform or jax.default_backend())


def fit_lanes(theta0, lower, base, z1y, z2y, xy, yy, shape, reml,
              max_iter: int = 200, hessian: bool = True, platform: str | None = None, scale=None):
    """``_fit_lanes`` compiled for ``platform`` (default: JAX's default backend), with the
    batched programs' kernel policy."""
    program = _batch_program(shape, max_iter, hessian, platform)
    return program(theta0, lower, base, z1y, z2y, xy, yy, reml=reml, scale=scale)


def default_workers(platform: str) -> int:
    """Chunks run at once on ``platform``: on the CPU one per core this process may use (at
    most :data:`MAX_WORKERS`; each chunk's program runs on one core), elsewhere 1."""
    if platform != "cpu":
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


# --------------------------------------------------------------------------------------------
# driving it: chunks, restarts, progress


class _Progress:
    """A progress bar (``tqdm``: a text bar on stderr, a widget in notebooks) when asked for;
    nothing otherwise (tqdm is then not even imported)."""

    def __init__(self, total: int, enabled: bool, label: str = "fit_many"):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=label, unit="fit")

    def update(self, k: int):
        if self.bar is not None:
            self.bar.update(k)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _next_pow2(k: int) -> int:
    return 1 << max(0, int(k - 1).bit_length())


def default_chunk_size(struct, platform: str = "cpu") -> int:
    """Lanes per chunk: on CPU 32 (the batch's working set then stays in cache; larger batches
    are slower per response), elsewhere as many as keep one chunk's working memory near
    MEMORY_BUDGET (at most MAX_CHUNK)."""
    L1, q1, m2, p, nt = struct.L[0], struct.q[0], struct.m2, struct.p, struct.n_theta
    per_lane = 8 * (3 * m2 * m2 + 3 * L1 * q1 * (m2 + p + 1 + q1) + (p + 1) ** 2) * (nt + 2) ** 2
    lanes = max(1, MEMORY_BUDGET // max(per_lane, 1))
    cap = CPU_CHUNK if platform == "cpu" else MAX_CHUNK
    return int(min(cap, 1 << (int(lanes).bit_length() - 1)))


def _sparse_z(codes: np.ndarray, Z: np.ndarray, n_levels: int):
    """The n × (L q) indicator-times-covariate matrix of one factor, level-major columns."""
    import scipy.sparse as sp  # lazily: not needed for a fit (≈ 0.1 s of import)

    n, q = Z.shape
    rows = np.repeat(np.arange(n), q)
    cols = (codes[:, None] * q + np.arange(q)[None, :]).ravel()
    return sp.csr_matrix((Z.ravel(), (rows, cols)), shape=(n, n_levels * q))


class _YParts:
    """Z₁ᵀY, Z₂ᵀY, XᵀY and the column sums of squares for a block of responses Y (n × b)."""

    def __init__(self, design: Design):
        f1 = design.factors[0]
        self.L1, self.q1 = f1.n_levels, f1.q
        self.Z1t = _sparse_z(f1.codes, f1.Z, f1.n_levels).T.tocsr()
        rest = design.factors[1:]
        import scipy.sparse as sp

        self.Z2t = sp.hstack([_sparse_z(f.codes, f.Z, f.n_levels) for f in rest]).T.tocsr() if rest else None
        self.Xt = np.ascontiguousarray(design.fixed_basis[0].T)  # X̃ᵀ, as the cross-products

    def __call__(self, Y: np.ndarray):
        Y = np.ascontiguousarray(Y)
        b = Y.shape[1]
        z1y = np.asarray(self.Z1t @ Y).reshape(self.L1, self.q1, b).transpose(2, 0, 1)
        z2y = np.asarray(self.Z2t @ Y).T if self.Z2t is not None else np.zeros((b, 0))
        xy = (self.Xt @ Y).T
        yy = np.einsum("ij,ij->j", Y, Y)
        return z1y, z2y, xy, yy


def fit_responses(design: Design, get_y: Callable[[int, int], np.ndarray], k: int, reml: bool, *,
                  chunk_size: int | None = None, progress: bool = False, device=None, start=None,
                  hessian: bool = True, label: str = "fit_many", warm_start="auto", engine: str = "auto",
                  workers: int | None = None) -> dict:
    """Fit ``k`` responses sharing ``design``; ``get_y(i, j)`` returns responses i..j-1 as an
    (nobs × (j-i)) array. Returns numpy arrays with a leading axis of length k.

    Each response gets jm.fit's search (:func:`jaxmixed.fit.search.restart_search`): θ₀ × 1,
    then × 0.1, 10, 0.01 while the best run has not converged or sits on the boundary, then up
    to three mirror images of a boundary optimum; the same rule picks the best run. The later
    runs are batched too, over the responses that need them.

    ``warm_start``: "auto" (with no ``start``) fits the first chunk exactly so, then starts
    later chunks from the median θ̂ of the first chunk's interior fits (responses sharing a
    design have similar θ̂, so Newton needs far fewer iterations); a response whose warm run
    does not converge to an interior point then gets all of jm.fit's starts, θ₀ × 1 included,
    so its estimate is jm.fit's whenever the optimum is unique (and never a worse optimum).
    A θ vector: that warm start from the first chunk on. False: jm.fit's starts only.

    ``workers``: chunks fitted at once after the first, each on its own thread (XLA runs a
    program on the thread that calls it, so on the CPU each uses one core); default
    :func:`default_workers`. Only where the batch program calls no LAPACK (with the "unrolled"
    kernels: every factorised block of order ≤ ``UNROLL_MAX``), because jaxlib 0.10's batched
    LAPACK kernels can wedge when several run at once; otherwise one chunk at a time. The
    responses (``get_y``) are read on the calling thread in order, and every chunk's result
    depends on its responses and the warm start only, so the answer does not depend on
    ``workers``.
    """
    dev = resolve_device(device)
    arrays, shape = pls.from_design(design, engine)
    base = put(arrays, dev)
    lower = put(jnp.asarray(design.theta_lower), dev)
    unit = put(jnp.asarray(design.theta_scale), dev)
    theta0 = design.theta0 if start is None else np.asarray(start, dtype=float)
    if theta0.shape != (design.n_theta,):
        raise ModelError(f"start must have {design.n_theta} entries (θ), not {theta0.shape}")
    platform = dev.platform if dev is not None else jax.default_backend()
    chunk = (default_chunk_size(shape, platform) if chunk_size is None
             else integer_argument(chunk_size, "chunk_size"))
    lanes = min(chunk, _next_pow2(k))
    yparts = _YParts(design)
    n_workers = default_workers(platform) if workers is None else integer_argument(workers, "workers")
    reml_arr = jnp.asarray(bool(reml))
    terms = [(t.structure, t.theta) for t in shape.terms]
    structures, slices = [s for s, _ in terms], [sl for _, sl in terms]

    def run_chunk(parts):
        def run(idx, th0):
            """Fit responses ``idx`` of the chunk from starts th0 (one row each), ``lanes`` at a
            time, the last batch padded with copies of its first."""
            outs = []
            for s in range(0, len(idx), lanes):
                sub = idx[s:s + lanes]
                b = len(sub)
                pad = np.concatenate([sub, np.full(lanes - b, sub[0], dtype=int)])
                # (contiguous copies: jaxlib 0.10 can hang on zero-stride numpy inputs)
                args = put(tuple(jnp.asarray(np.ascontiguousarray(a[pad])) for a in parts), dev)
                th = np.array(th0[s:s + lanes], dtype=float)
                th = np.concatenate([th, np.repeat(th[:1], lanes - b, axis=0)])
                out = fit_lanes(put(jnp.asarray(th), dev), lower, base, *args, shape, reml_arr, hessian=hessian,
                                platform=platform, scale=unit)
                outs.append({key: np.array(v)[:b] for key, v in out.items()})
            return {key: np.concatenate([o[key] for o in outs]) for key in outs[0]}
        return run

    named = isinstance(warm_start, (bool, str))
    if named and warm_start not in (True, False, "auto"):
        raise ModelError(f"warm_start must be 'auto', True, False or a θ vector, not {warm_start!r}")
    warm = named and (warm_start is True or (warm_start == "auto" and start is None))
    warm_theta = None
    if not named:
        warm_theta = np.asarray(warm_start, dtype=float)
        if warm_theta.shape != (design.n_theta,):
            raise ModelError(f"warm_start must have {design.n_theta} entries (θ), not {warm_theta.shape}")

    def fit_chunk(i, j, parts, first, scales):
        best = restart_search(run_chunk(parts), np.broadcast_to(first, (j - i, design.n_theta)), theta0, terms,
                              design.theta_scale, scales=scales, x_key="theta", converged_key="opt_converged")
        best.pop("tried")
        return best

    results = []
    bar = _Progress(k, progress, label)
    pool, pending = None, []
    try:
        block = lanes * max(1, READ_BLOCK // lanes)  # responses read (and their cross-products formed) at once
        for i in range(0, k, lanes):
            j = min(i + lanes, k)
            if i % block == 0:
                jb = min(i + block, k)
                Y = np.asarray(get_y(i, jb), dtype=float)  # the caller's function: on this thread, in order
                if Y.shape != (design.nobs, jb - i):
                    raise DataError(f"responses {i}..{jb - 1}: expected shape {(design.nobs, jb - i)}, got {Y.shape}")
                block_parts = yparts(Y)
            parts = tuple(a[i % block:i % block + (j - i)] for a in block_parts)
            # a warm start first, then jm.fit's own starts
            first, scales = (theta0, START_SCALES[1:]) if warm_theta is None else (warm_theta, START_SCALES)
            settled = not (warm and warm_theta is None)  # no later chunk changes the warm start
            if (pool is None and i > 0 and settled and n_workers > 1
                    and not _batch_program(shape, 200, hessian, platform).uses_lapack):
                pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="jaxmixed-many")
            if pool is None:
                best = fit_chunk(i, j, parts, first, scales)
                if warm and warm_theta is None:
                    interior = best["opt_converged"] & ~is_singular(best["theta"], structures, slices,
                                                                    design.theta_scale)
                    if interior.sum() >= min(8, j - i):
                        warm_theta = np.median(best["theta"][interior], axis=0)
                results.append(best)
                bar.update(j - i)
                continue
            pending.append((j - i, pool.submit(fit_chunk, i, j, parts, first, scales)))
            while len(pending) > 2 * n_workers or (pending and pending[0][1].done()):
                size, future = pending.pop(0)
                results.append(future.result())
                bar.update(size)
        for size, future in pending:
            results.append(future.result())
            bar.update(size)
    finally:
        if pool is not None:
            for _, future in pending:
                future.cancel()
            pool.shutdown(wait=True)
        bar.close()
    return {key: np.concatenate([r[key] for r in results]) for key in results[0]}


