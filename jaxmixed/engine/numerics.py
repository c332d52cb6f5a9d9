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


def hessian_through(x_of, eta, grad_x, hess_x):
    """∇²_η of −½ D(x(η)) at η from D's gradient and Hessian in x at x(η), by the chain rule
    −½ (Jᵀ ∇²_x D J + Σᵢ ∂D/∂xᵢ ∇²_η xᵢ), J = ∂x/∂η: the Hessian of −½ D's second-order
    expansion about x(η), composed with ``x_of``. A program over η alone (a few entries), for
    standard errors in the report's metric from the Hessian an optimiser already formed in its
    own parameters, without differentiating the objective twice again."""
    x_hat = jax.lax.stop_gradient(x_of(eta))

    def model(e):
        d = x_of(e) - x_hat
        return -0.5 * (grad_x @ d + 0.5 * d @ hess_x @ d)

    return hessian(model)(eta)


def jacobian(f):
    """Jacobian of ``f(x, *args)`` in x, one forward-mode column at a time (``lax.map``, for the
    reason :func:`hessian` gives): an array (k, *f's shape), the derivative along each x_k first."""
    def J(x, *args):
        def column(v):
            return jax.jvp(lambda z: f(z, *args), (x,), (v,))[1]

        return jax.lax.map(column, jnp.eye(x.shape[0], dtype=x.dtype))

    return J


def second_order(f):
    """(f(x), ∂f (k, m), ∂²f (k, k, m)) of a vector-valued ``f(x, *args)`` (m entries), forward
    over forward, one direction pair (i ≤ j) at a time through ``lax.map``: the memory of one
    tangent and no batched LAPACK calls (see :func:`hessian`). One traced body gives all three:
    the nested jvp along (e_i, e_j) returns f, ∂_j f, ∂_i f and ∂_i∂_j f, so the program holds
    f's operations about four times, not seven (a value, a jvp body and a jvp-of-jvp body)."""
    def parts(x, *args):
        k = x.shape[0]

        def pair(uv):
            u, v = uv
            inner = lambda z: jax.jvp(lambda w: f(w, *args), (z,), (v,))
            (value, dv), (du, duv) = jax.jvp(inner, (x,), (u,))
            return value, dv, duv

        eye = jnp.eye(k, dtype=x.dtype)
        pairs = [(i, j) for i in range(k) for j in range(i, k)]
        U = jnp.stack([eye[i] for i, _ in pairs])
        V = jnp.stack([eye[j] for _, j in pairs])
        values, Dv, Hp = jax.lax.map(pair, (U, V))
        value = values[0]
        J = jnp.stack([Dv[pairs.index((i, i))] for i in range(k)])
        H = jnp.zeros((k, k, value.shape[0]), dtype=value.dtype)
        for n, (i, j) in enumerate(pairs):
            H = H.at[i, j].set(Hp[n]).at[j, i].set(Hp[n])
        return value, J, H

    return parts
