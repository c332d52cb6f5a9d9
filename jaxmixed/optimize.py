"""A bound-constrained Newton method that runs under ``jit`` and ``vmap``.

Minimises f(x) subject to x ≥ lower (lower may be -inf). Each iteration uses the exact gradient
and Hessian from JAX autodiff (θ has only a handful of entries, so the Hessian is cheap):

- coordinates at their bound whose gradient pushes outward are held fixed (projected Newton,
  Bertsekas 1982); the rest take a Newton step with the Hessian's eigenvalues replaced by their
  absolute values (so saddles and concave regions are escaped, not approached);
- where the gradient vanishes but the curvature is negative (a variance at 0 that should grow),
  the step follows the most negative curvature direction into the feasible set;
- a backtracking (Armijo) line search on the projected path keeps every step a descent step.

Returns an OptResult record; a fit never produces a half-filled object.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class OptResult(NamedTuple):
    x: jnp.ndarray
    fun: jnp.ndarray
    grad: jnp.ndarray
    n_iter: jnp.ndarray
    converged: jnp.ndarray  # first- and second-order conditions met
    history: jnp.ndarray  # f at iterations 0..n_iter, NaN after


def minimize_bounded(fun, x0, lower, args=(), max_iter: int = 200, gtol: float = 1e-7,
                     ftol: float = 1e-13, max_halvings: int = 50) -> OptResult:
    """Minimise ``fun(x, *args)`` over x ≥ lower (see the module docstring)."""
    value_and_grad = jax.value_and_grad(fun)
    hess = jax.hessian(fun)
    n = x0.shape[0]
    bounded = jnp.isfinite(lower)

    def proj(x):
        return jnp.where(bounded, jnp.maximum(x, lower), x)

    def pgrad(x, g):
        return x - proj(x - g)

    def body(state):
        k, x, f, g, _, _, history = state
        H = hess(x, *args)
        at_bound = bounded & (x <= lower + 1e-12)
        active = at_bound & (g > 0)
        free = ~active
        mask = free[:, None] & free[None, :]
        Hf = jnp.where(mask, H, 0.0) + jnp.diag(jnp.where(free, 0.0, 1.0))
        gf = jnp.where(free, g, 0.0)
        w, V = jnp.linalg.eigh(Hf)
        scale = jnp.max(jnp.abs(w))
        wabs = jnp.maximum(jnp.abs(w), 1e-10 * scale + 1e-14)
        d = -V @ ((V.T @ gf) / wabs)
        # Negative curvature: move along it, into the feasible set (or downhill).
        v = V[:, 0]
        inward = jnp.sum(jnp.where(at_bound, v, 0.0))
        s = jnp.where(jnp.abs(inward) > 1e-12, jnp.sign(inward), -jnp.sign(v @ g + 1e-300))
        neg = w[0] < -1e-8 * (scale + 1.0)
        d = d + jnp.where(neg, s * v, 0.0)
        d = jnp.where(free, d, 0.0)

        def ls_cond(ls):
            j, alpha, fn, _ = ls
            x_new = proj(x + alpha * d)
            ok = fn <= f + 1e-4 * jnp.dot(g, x_new - x)
            return (~ok) & (j < max_halvings)

        def ls_body(ls):
            j, alpha, _, _ = ls
            alpha = alpha * 0.5
            x_new = proj(x + alpha * d)
            fn = fun(x_new, *args)
            fn = jnp.where(jnp.isfinite(fn), fn, jnp.inf)
            return j + 1, alpha, fn, x_new

        x1 = proj(x + d)
        f1 = fun(x1, *args)
        f1 = jnp.where(jnp.isfinite(f1), f1, jnp.inf)
        j, _, f_new, x_new = jax.lax.while_loop(ls_cond, ls_body, (0, 1.0, f1, x1))
        improved = (j < max_halvings) & (f_new <= f)
        x_new = jnp.where(improved, x_new, x)
        f_new = jnp.where(improved, f_new, f)
        f_next, g_next = value_and_grad(x_new, *args)
        small_change = jnp.abs(f - f_new) <= ftol * (1.0 + jnp.abs(f))
        first_order = jnp.max(jnp.abs(pgrad(x_new, g_next)), initial=0.0) <= gtol * (1.0 + jnp.abs(f_next))
        stop = (~improved) | (first_order & small_change & ~neg)
        history = history.at[k + 1].set(f_next)
        return k + 1, x_new, f_next, g_next, stop, neg, history

    def cond(state):
        k, _, _, _, stop, _, _ = state
        return (~stop) & (k < max_iter)

    f0, g0 = value_and_grad(x0, *args)
    history = jnp.full((max_iter + 1,), jnp.nan).at[0].set(f0)
    init = (0, proj(x0), f0, g0, False, False, history)
    k, x, f, g, _, neg, history = jax.lax.while_loop(cond, body, init)

    # Final check of first- and second-order optimality on the free coordinates.
    H = hess(x, *args)
    free = ~(bounded & (x <= lower + 1e-12) & (g > 0))
    Hf = jnp.where(free[:, None] & free[None, :], H, 0.0) + jnp.diag(jnp.where(free, 0.0, 1.0))
    w = jnp.linalg.eigvalsh(Hf)
    pg = jnp.max(jnp.abs(pgrad(x, g)), initial=0.0)
    converged = (pg <= 1e-4 * (1.0 + jnp.abs(f))) & (w[0] >= -1e-6 * (jnp.max(jnp.abs(w)) + 1.0)) & jnp.isfinite(f)
    del n, neg
    return OptResult(x, f, g, k, converged, history)
