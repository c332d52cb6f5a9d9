"""Gradient-safe numerics shared by the objective, the optimiser and inference."""

from __future__ import annotations

import jax.numpy as jnp

LOG_2PI = float(jnp.log(2.0 * jnp.pi))


def safe_log(x, tiny: float = 1e-300):
    """log(x) that stays finite (and has a finite gradient) at x = 0."""
    return jnp.log(jnp.maximum(x, tiny))


def logdet_from_chol_diag(diag):
    """log|A| = 2 Σ log L_ii for A = L Lᵀ, given the diagonal of L (any batch shape)."""
    return 2.0 * jnp.sum(safe_log(diag))
