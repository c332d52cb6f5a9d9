"""A functional, differentiable core for JAX users: arrays in, estimates (a PyTree) out.

Everything here is a pure function of arrays, usable under ``jax.jit``, ``jax.grad`` and
``jax.vmap``:

``stats_from_arrays(y, X, groups, Z=None, weights=None, *, n_groups=None, cov="unstructured")``
    sufficient statistics (a :class:`ModelStats` PyTree) of the model
    y = Xβ + Σ_f Z_f b_f + ε, b_f ~ N(0, σ²ΛΛᵀ) per level, ε_i ~ N(0, σ²/w_i)
    for one grouping factor (``groups`` an integer code array) or several (a tuple of them).
``deviance(theta, stats, reml=True)``
    the profiled deviance −2ℓ(θ) (restricted for REML), β and σ profiled out.
``solve(theta, stats, reml=True)``
    β̂(θ), σ̂(θ), Var(β̂), conditional modes u and b (a ``Solution``: β, σ, Var(β̂), b).
``fit_stats(stats, reml=True)`` / ``fit_arrays(y, X, groups, ...)``
    the fit: :class:`Estimates` (θ̂, β̂, σ̂, Var(β̂), b, deviance, converged, iterations).
    θ̂ is differentiable with respect to the statistics, hence to y, X and the weights, by
    implicit differentiation (a ``jax.custom_vjp`` on the map stats ↦ θ̂: at the optimum
    ∇_θD(θ̂, s) = 0, so dθ̂/ds = −H⁻¹ ∂²D/∂θ∂s with H the Hessian of the deviance; θ entries held
    at their bound get zero derivative). β̂, σ̂ and the deviance follow by ordinary autodiff.
``nll(eta, y, groups, params, Z=None, *, n_groups, scale=1.0)``
    the marginal negative log likelihood of a one-factor Gaussian mixed model whose fixed part
    η is any differentiable prediction (a network's output), group by group through the
    Woodbury identity (:mod:`jaxmixed.engine.grouped`): a sum over groups, so a mini-batch of
    whole groups times ``scale`` = groups / groups in the batch estimates it without bias.
    ``params`` a :class:`VarianceParams` (log σ and an unconstrained Cholesky factor of Σ_b;
    ``init_params(q)``, ``variance_report(params)`` in the report's metric); ``blups`` and
    ``predict_conditional`` give η + BLUPs for seen groups and η for new ones (code −1).
``nll_laplace(eta, y, groups, params, Z=None, *, n_groups, family="bernoulli"|"poisson")``
    the same for a binary or count response, by the Laplace approximation per group (modes by
    Newton steps, exact gradients from one differentiable step at the mode); ``laplace_modes``.
``nll_factors(eta, y, groups, theta, Z=None, *, n_groups, cov="unstructured")``
    several grouping factors (crossed or nested), full batch: ½ the ML deviance of y − η through
    the engine, σ profiled out in closed form, θ as in :func:`deviance`.
Every Cholesky factorisation and triangular solve here runs in plain XLA operations (the
engine's "xla" kernel policy, :mod:`jaxmixed.engine.kernels`: fast for the many tiny blocks of a
mixed model, and free of the LAPACK thread-pool deadlock jaxlib 0.10 can hit with large vmapped
batches on machines with few cores); ``cholesky_xla`` and ``triangular_solve_xla`` are usable
directly.

Prior weights: row i has residual variance σ²/w_i (w_i > 0). The statistics are the weighted
cross-products and the deviance includes −Σ log w_i, as lme4's ``weights=`` does.

The fit is jm.fit's projected Newton from jm.fit's start, followed by two plain Newton steps
that take θ̂ to rounding level (derivatives through the optimum need it); it does not try the
other starts jm.fit falls back on, so check ``converged``.

Example::

    import jax, jax.numpy as jnp
    from jaxmixed import functional as F

    def slope(y, X, w):                      # β̂₀ as a function of the data
        return F.fit_arrays(y, X, groups, Z, w, n_groups=48, cov="independent").beta[0]

    dslope_dw = jax.jit(jax.grad(slope, argnums=2))(y, X, jnp.ones(len(y)))
    fits = jax.jit(jax.vmap(lambda y: F.fit_arrays(y, X, groups, n_groups=48)))(Y)   # Y: (k, n)
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from jaxmixed.data.crossprod import accumulate
from jaxmixed.data.pattern import dense_block_index
from jaxmixed.engine import pls
from jaxmixed.engine.kernels import cholesky_xla, spd_solve_xla, triangular_solve_xla  # noqa: F401 (public)
from jaxmixed.engine import grouped
from jaxmixed.engine.grouped import VarianceParams, blups, init_params, nll, nll_terms  # noqa: F401 (public)
from jaxmixed.engine.grouped import laplace_modes, nll_laplace  # noqa: F401 (public)
from jaxmixed.engine.grouped import predict as predict_conditional  # noqa: F401 (public)
from jaxmixed.engine.grouped import report as variance_report  # noqa: F401 (public)
from jaxmixed.engine.pls import ModelShape, PLSArrays, TermShape
from jaxmixed.errors import DataError, ModelError
from jaxmixed.fit.optimizers import minimize_scaled
from jaxmixed.model import covariance

__all__ = ["ModelStats", "Estimates", "stats_from_arrays", "deviance", "solve", "fit_stats", "fit_arrays",
           "structure", "cholesky_xla", "triangular_solve_xla",
           "nll", "nll_terms", "blups", "predict_conditional", "init_params", "VarianceParams", "variance_report",
           "nll_laplace", "laplace_modes", "nll_factors", "grouped"]

#: the kernel policy of the functional core: every factorisation in plain XLA operations, so
#: that no LAPACK call lands inside a user's (possibly vmapped) program
KERNELS = "xla"


# --------------------------------------------------------------------------------------------
# statistics from arrays


@jax.tree_util.register_pytree_node_class
class ModelStats:
    """Sufficient statistics of a model (a PyTree: ``stats`` and ``log_det_w`` are its
    leaves, the static :class:`~jaxmixed.engine.pls.ModelShape` ``struct`` its auxiliary data)."""

    def __init__(self, stats: PLSArrays, log_det_w, struct: ModelShape):
        self.stats = stats
        self.log_det_w = log_det_w
        self.struct = struct

    def tree_flatten(self):
        return (self.stats, self.log_det_w), self.struct

    @classmethod
    def tree_unflatten(cls, struct, children):
        return cls(children[0], children[1], struct)

    @property
    def lower(self) -> np.ndarray:
        """Lower bounds of θ (0 for sds and Cholesky diagonals, -inf otherwise)."""
        return np.concatenate([np.asarray(t.structure.lower, dtype=float) for t in self.struct.terms])

    @property
    def theta0(self) -> np.ndarray:
        """Λ = I: the default start in the optimiser's units (θ₀ = this × ``theta_scale``)."""
        return np.concatenate([np.asarray(t.structure.theta0, dtype=float) for t in self.struct.terms])

    @property
    def theta_scale(self):
        """The optimiser's unit of each θ entry (as ``Design.theta_scale``: 1 / the root mean
        square of each random-effects column, rounded to a power of 2), from the diagonals of
        ZᵀZ / n (weighted, with prior weights). A jax array, traceable; no gradient flows."""
        st, struct = self.stats, self.struct
        ms = [jnp.sum(jnp.diagonal(st.D11, axis1=1, axis2=2), axis=0) / st.n]
        d22 = jnp.diagonal(st.A22)
        for off, L, q in zip(struct.offsets, struct.L[1:], struct.q[1:]):
            ms.append(jnp.sum(d22[off:off + L * q].reshape(L, q), axis=0) / st.n)
        parts = [t.structure.theta_scale(ms[t.factor][t.cols[0]:t.cols[1]], jnp) for t in struct.terms]
        return lax.stop_gradient(jnp.concatenate(parts).astype(st.WW.dtype))

    def __repr__(self):
        return f"ModelStats(L={self.struct.L}, q={self.struct.q}, p={self.struct.p}, n={self.stats.n})"


def structure(n_groups, q, p: int, cov="unstructured") -> ModelShape:
    """The static shape of a model with factors of ``n_groups`` levels and ``q`` columns
    each (ints or tuples, one entry per factor) and ``p`` fixed effects; ``cov`` one of
    unstructured, independent, exchangeable, identity (or a tuple, one per factor)."""
    n_groups = (n_groups,) if np.ndim(n_groups) == 0 else tuple(n_groups)
    q = (q,) * len(n_groups) if np.ndim(q) == 0 else tuple(q)
    cov = (cov,) * len(n_groups) if isinstance(cov, str) else tuple(cov)
    if not (len(n_groups) == len(q) == len(cov)):
        raise ModelError("n_groups, q and cov must have one entry per grouping factor")
    terms, pos = [], 0
    for f, (qf, c) in enumerate(zip(q, cov)):
        if c not in covariance.STRUCTURES:
            raise ModelError(f"cov must be one of {', '.join(covariance.STRUCTURES)}, not {c!r}")
        s = covariance.make(c, int(qf))
        terms.append(TermShape(s, f, (0, int(qf)), (pos, pos + s.n_theta)))
        pos += s.n_theta
    return ModelShape(L=tuple(int(x) for x in n_groups), q=tuple(int(x) for x in q), terms=tuple(terms),
                      p=int(p), n_theta=pos, kernels=KERNELS)


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def stats_from_arrays(y, X, groups, Z=None, weights=None, *, n_groups=None, cov="unstructured") -> ModelStats:
    """Sufficient statistics from arrays (jit-, grad- and vmap-compatible).

    y        (n,) response
    X        (n, p) fixed-effects design (include a column of ones for an intercept)
    groups   (n,) integer level codes 0..L-1 of the grouping factor, or a tuple of such arrays
             for several factors (put the one with most levels first: its block of ZᵀZ is kept
             block-diagonal; the others form a dense part)
    Z        (n, q) random-effects covariates of the factor (default: a column of ones, a
             random intercept), or a tuple matching ``groups`` (entries None for intercepts)
    weights  (n,) prior weights w_i > 0 (residual variance σ²/w_i); default all 1
    n_groups number of levels per factor (int or tuple); required under jit/vmap where the
             codes are traced, else taken as max(code) + 1
    cov      covariance structure of each factor's random effects: "unstructured",
             "independent", "exchangeable" or "identity" (or a tuple)
    """
    y = jnp.asarray(y)
    X = jnp.asarray(X)
    if y.ndim != 1:
        raise DataError(f"y must be 1-d, not of shape {y.shape}")
    n = y.shape[0]
    if X.ndim != 2 or X.shape[0] != n:
        raise DataError(f"X must be (n, p) = ({n}, p), not of shape {X.shape}")
    groups = _as_tuple(groups)
    Zs = _as_tuple(Z) if Z is not None else (None,) * len(groups)
    if len(Zs) != len(groups):
        raise DataError("Z must have one entry per grouping factor")
    Zs = tuple(jnp.ones((n, 1), dtype=y.dtype) if z is None else jnp.asarray(z, dtype=y.dtype) for z in Zs)
    Zs = tuple(z[:, None] if z.ndim == 1 else z for z in Zs)
    for z in Zs:
        if z.shape[0] != n:
            raise DataError(f"Z has {z.shape[0]} rows but y has {n}")
    if n_groups is None:
        try:
            n_groups = tuple(int(np.max(np.asarray(g))) + 1 for g in groups)
        except jax.errors.TracerArrayConversionError:
            raise ModelError("stats_from_arrays under jit/vmap needs n_groups= (the codes are traced)") from None
    n_groups = _as_tuple(n_groups)
    if len(n_groups) != len(groups):
        raise DataError("n_groups must have one entry per grouping factor")
    codes = tuple(jnp.asarray(g).astype(jnp.int32) for g in groups)
    struct = structure(n_groups, tuple(z.shape[1] for z in Zs), X.shape[1], cov)

    if weights is None:
        w = None
        log_det_w = jnp.zeros((), dtype=y.dtype)
    else:
        w = jnp.asarray(weights, dtype=y.dtype)
        if w.shape != (n,):
            raise DataError(f"weights must have shape ({n},), not {w.shape}")
        log_det_w = jnp.sum(jnp.log(w))
    W = jnp.concatenate([X, y[:, None]], axis=1)
    # the cross-products of the full pattern (every pair of levels a block: the codes may be
    # traced), by the same accumulation as jm.fit's, in JAX; then the dense layout
    cp = accumulate(W, codes, Zs, struct.L, dense_block_index(codes, struct.L, jnp), w, xp=jnp)
    stats = pls.arrange(cp._replace(n=jnp.asarray(float(n), dtype=y.dtype)), struct, None, xp=jnp)
    return ModelStats(stats, log_det_w, struct)


# --------------------------------------------------------------------------------------------
# deviance, solve, fit


@jax.jit
def deviance(theta, stats: ModelStats, reml=True):
    """Profiled deviance −2ℓ(θ) (restricted when ``reml``), β and σ profiled out; includes
    −Σ log w_i for prior weights. Differentiable in θ and in the statistics."""
    return pls.deviance(jnp.asarray(theta), stats.stats, stats.struct, reml) - stats.log_det_w


@jax.jit
def solve(theta, stats: ModelStats, reml=True) -> pls.Solution:
    """β̂, σ̂ (σ at unit weight), Var(β̂) and the conditional modes b = Λu at θ."""
    return pls.solve(jnp.asarray(theta), stats.stats, stats.struct, reml)


class Estimates(NamedTuple):
    """A fit (a PyTree of arrays)."""

    theta: jnp.ndarray  # θ̂ (relative Cholesky factors, lme4's parameterisation)
    beta: jnp.ndarray  # (p,)
    sigma: jnp.ndarray  # residual sd (at unit weight)
    cov_beta: jnp.ndarray  # (p, p)
    b: tuple  # per factor (L_f, q_f): predicted random effects
    deviance: jnp.ndarray  # −2ℓ at the optimum (restricted for REML)
    converged: jnp.ndarray  # the optimiser's first- and second-order conditions held
    iterations: jnp.ndarray


def _dev_grad_theta(theta, stats: ModelStats, reml):
    return jax.grad(deviance)(theta, stats, reml)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _argmin(theta0, stats: ModelStats, reml, max_iter):
    """(θ̂, converged, iterations): the optimiser from θ₀ (``reml`` a float flag), working on
    θ / ``stats.theta_scale`` as jm.fit does."""
    lower = jnp.asarray(stats.lower)
    unit = stats.theta_scale
    r = reml > 0.5
    opt = minimize_scaled(deviance, theta0, lower, unit, (stats, r), max_iter=max_iter)
    return _polish(opt.x, stats, r, lower), opt.converged, opt.n_iter


POLISH_STEPS = 2


def _polish(x, stats, reml, lower):
    """A few plain Newton steps on the free coordinates after the optimiser has stopped (its
    tolerance leaves θ̂ up to ~1e-7 off; Newton's quadratic convergence takes it to rounding
    level, which derivatives through the optimum need). A step is kept only if the deviance
    does not rise beyond its rounding noise. Steps are taken in the optimiser's units
    (θ / ``stats.theta_scale``)."""
    bounded = jnp.isfinite(lower)
    unit = stats.theta_scale

    def step(_, x):
        g = _dev_grad_theta(x, stats, reml) * unit
        H = jax.jacfwd(_dev_grad_theta)(x, stats, reml) * unit[:, None] * unit[None, :]
        free = ~(bounded & (x / unit <= lower + 1e-10))
        Hm = jnp.where(free[:, None] & free[None, :], H, 0.0) + jnp.diag(jnp.where(free, 0.0, 1.0))
        d = spd_solve_xla(Hm, jnp.where(free, g, 0.0)) * unit
        xn = jnp.where(bounded, jnp.maximum(x - d, lower), x - d)
        f0, f1 = deviance(x, stats, reml), deviance(xn, stats, reml)
        keep = jnp.isfinite(f1) & jnp.all(jnp.isfinite(xn)) & (f1 <= f0 + 1e-12 * (1.0 + jnp.abs(f0)))
        return jnp.where(keep, xn, x)

    return lax.fori_loop(0, POLISH_STEPS, step, x)


def _argmin_fwd(theta0, stats, reml, max_iter):
    out = _argmin(theta0, stats, reml, max_iter)
    return out, (out[0], stats, reml, theta0)


def _argmin_bwd(max_iter, res, cts):
    """Implicit function theorem: θ̂(s) solves g(θ, s) = ∇_θD = 0 on the free coordinates, so
    s̄ = −(∂g/∂s)ᵀ H⁻¹ θ̄ with H = ∂g/∂θ restricted to them (active bounds: zero derivative)."""
    x, stats, reml, theta0 = res
    ct = cts[0]
    r = reml > 0.5
    lower = jnp.asarray(stats.lower)
    unit = stats.theta_scale  # H⁻¹ = D (D H D)⁻¹ D, solved in the optimiser's units (D = diag(unit))
    free = ~(jnp.isfinite(lower) & (x / unit <= lower + 1e-10))
    H = jax.jacfwd(_dev_grad_theta)(x, stats, r) * unit[:, None] * unit[None, :]
    Hm = jnp.where(free[:, None] & free[None, :], H, 0.0) + jnp.diag(jnp.where(free, 0.0, 1.0))
    w = spd_solve_xla(Hm, jnp.where(free, ct * unit, 0.0)) * unit
    _, vjp = jax.vjp(lambda s: _dev_grad_theta(x, s, r), stats)
    (s_bar,) = vjp(-w)
    return jnp.zeros_like(theta0), s_bar, jnp.zeros_like(reml)


_argmin.defvjp(_argmin_fwd, _argmin_bwd)


def fit_stats(stats: ModelStats, reml=True, theta0=None, max_iter: int = 200) -> Estimates:
    """Fit the model given its statistics: the projected Newton of ``jm.fit`` from ``theta0``
    (θ in the data's units; default jm.fit's start, Λ = I in ``stats.theta_scale`` units; no
    restarts from other starts). Differentiable with respect to
    ``stats`` (implicit differentiation through θ̂). ``reml`` may be a traced bool."""
    dtype = stats.stats.WW.dtype
    theta0 = jnp.asarray(stats.theta0 * stats.theta_scale if theta0 is None else theta0, dtype=dtype)
    reml_f = jnp.asarray(reml, dtype=dtype)
    theta, converged, n_iter = _argmin(theta0, stats, reml_f, max_iter)
    r = reml_f > 0.5
    sol = solve(theta, stats, r)
    return Estimates(theta=theta, beta=sol.beta, sigma=sol.sigma, cov_beta=sol.cov_beta, b=sol.b,
                     deviance=deviance(theta, stats, r), converged=converged, iterations=n_iter)


def fit_arrays(y, X, groups, Z=None, weights=None, *, n_groups=None, cov="unstructured", reml=True,
               theta0=None, max_iter: int = 200) -> Estimates:
    """``fit_stats(stats_from_arrays(y, X, groups, Z, weights, ...), reml)``: the fit of
    y = Xβ + Zb + ε from arrays, differentiable with respect to y, X and weights."""
    st = stats_from_arrays(y, X, groups, Z, weights, n_groups=n_groups, cov=cov)
    return fit_stats(st, reml, theta0, max_iter)


def nll_factors(eta, y, groups, theta, Z=None, *, n_groups, cov="unstructured"):
    """The marginal negative log likelihood of y − η for one or several grouping factors
    (``groups`` a code array or a tuple of them, crossed or nested; ``n_groups`` likewise),
    σ profiled out: ½ × the ML deviance of the statistics of y − η with no fixed-effects
    columns (:func:`stats_from_arrays`, :func:`deviance`). Full batch only (the profiled σ couples
    the groups); differentiable in η and θ."""
    y = jnp.asarray(y, dtype=float)
    r = y - jnp.asarray(eta, dtype=float)
    stats = stats_from_arrays(r, jnp.zeros((r.shape[0], 0)), groups, Z, n_groups=n_groups, cov=cov)
    return 0.5 * deviance(theta, stats, reml=False)
