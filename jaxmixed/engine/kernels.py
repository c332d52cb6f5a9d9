"""Cholesky factors and triangular solves in plain XLA ops, for the likelihood engines.

jaxlib 0.10's CPU LAPACK kernels run batched factorisations on a small shared thread pool and
can wedge it when several run at once (a fit then never returns; seen here on 2 cores, in the
batched per-level and per-panel blocks and in the batched tangents of ``jax.hessian``). The
engines therefore factorise with these routines (unrolled for small orders, a column loop
otherwise; see :func:`jaxmixed.functional.cholesky_xla`), which XLA compiles into the program.
"""

from __future__ import annotations


def cholesky(a):
    """Lower Cholesky factor of (..., n, n) ``a``."""
    from jaxmixed.functional import cholesky_xla

    return cholesky_xla(a)


def solve_lower(L, B):
    """L⁻¹B for lower-triangular L (..., n, n) and B (..., n, k)."""
    from jaxmixed.functional import triangular_solve_xla

    return triangular_solve_xla(L, B, left_side=True, lower=True)


def solve_lower_t(L, B):
    """L⁻ᵀB for lower-triangular L (..., n, n) and B (..., n, k)."""
    from jaxmixed.functional import triangular_solve_xla

    return triangular_solve_xla(L, B, left_side=True, lower=True, transpose_a=True)
