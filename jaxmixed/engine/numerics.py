"""Gradient-safe numerics shared by the objective, the optimiser and inference."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOG_2PI = math.log(2.0 * math.pi)  # the same double as jnp.log(2π), without running a program at import


def safe_log(x, tiny: float = 1e-300):
    """log(x) that stays finite (and has a finite gradient) at x = 0."""
    return jnp.log(jnp.maximum(x, tiny))


def logdet_from_chol_diag(diag):
    """log|A| = 2 Σ log L_ii for A = L Lᵀ, given the diagonal of L (any batch shape)."""
    return 2.0 * jnp.sum(safe_log(diag))


def hessian(f):
    """Hessian of scalar ``f(x, *args)`` in x, one forward-over-reverse column at a time.

    ``jax.hessian`` vmaps the columns, which turns every LAPACK factorisation inside f into a
    batched call; jaxlib 0.10's batched CPU kernels can wedge their thread pool (see
    :mod:`jaxmixed.engine.kernels`). ``lax.map`` runs the columns in sequence and traces the column
    once, which also keeps the compiled program small.
    """
    def H(x, *args):
        g = jax.grad(f)

        def column(v):
            return jax.jvp(lambda z: g(z, *args), (x,), (v,))[1]

        return jax.lax.map(column, jnp.eye(x.shape[0], dtype=x.dtype))

    return H
