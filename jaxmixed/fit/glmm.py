"""Fitting GLMMs: the optimiser program of one fit, and many fits that share a design in one
vmapped program (``jm.fit_many(..., family=...)`` and the parametric bootstrap of a GLMM).

The objective is :func:`jaxmixed.engine.laplace.deviance` (Laplace or adaptive quadrature), its
gradient exact by implicit differentiation; the optimiser is projected BFGS
(:func:`jaxmixed.fit.optimizers.minimize_scaled`), which runs under ``vmap`` (every lane until
the last stops). Many responses differ only in ``GLMMArrays.y``: the trials, prior weights,
offset, X and Z are shared, so one compiled program serves every chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmixed.engine import laplace
from jaxmixed.fit.optimizers import minimize_scaled
from jaxmixed.model.family import family_of
from jaxmixed.runtime import programs


def _minimize(x0, lower, unit, data, shape):
    """Projected BFGS; each evaluation's conditional modes start the next one's PIRLS. With
    ``shape.nagq`` 0 (lme4's nAGQ = 0) over (θ, s) alone, β̂ found with the modes by the joint
    PIRLS; the result's x is then (β̂, θ̂, ŝ) and its gradient's β part 0."""
    u0 = jnp.zeros((shape.n_u,), x0.dtype)
    if shape.nagq == 0:
        p = shape.p
        opt = minimize_scaled(lambda y, c: laplace.nagq0_deviance_and_modes(y, c, data, shape), x0[p:],
                              lower[p:], unit[p:], max_iter=300, quasi_newton=True, carry=(u0, x0[:p]))
        _, beta, _ = laplace.pirls_joint(jnp.concatenate([x0[:p], opt.x]), data, shape, u0, x0[:p])
        return opt._replace(x=jnp.concatenate([beta, opt.x]),
                            grad=jnp.concatenate([jnp.zeros_like(beta), opt.grad]))
    data = laplace.panel_view(data)  # once: every evaluation then runs on the view
    return minimize_scaled(lambda x, u: laplace.deviance_and_mode(x, u, data, shape), x0, lower, unit,
                           max_iter=300, quasi_newton=True, carry=u0)


@programs.cached(static_argnames=("shape",))
def optimize(x0, lower, unit, data, shape):
    """One GLMM fit: projected BFGS on exact gradients (the exact Hessian comes once, after the
    fit: a Newton loop holding the Hessian of the implicit mode compiles three times longer, for
    no fewer seconds of running on the reference models)."""
    return _minimize(x0, lower, unit, data, shape)


@programs.cached(static_argnames=("shape",))
def optimize_responses(x0, lower, unit, Y, data, shape):
    """Fits of the responses Y (k × n) sharing everything else in ``data``, vmapped: (x̂ (k × m),
    −2ℓ (k,), converged (k,))."""
    fam = family_of(shape.family)

    def one(y):
        opt = _minimize(x0, lower, unit, data._replace(y=y, const=fam.constant(y, data.m, data.pw, jnp)), shape)
        return opt.x, opt.fun, opt.converged

    return jax.vmap(one)(Y)


def fit_responses(Y, x0, lower, unit, data, shape, chunk_size: int = 32, progress: bool = False,
                  label: str = "fit_many"):
    """All columns of Y (n × k), ``chunk_size`` at a time (the last chunk padded with copies of
    its first response, so every chunk runs the same program): dict of x (k × m), fun (k,),
    converged (k,)."""
    from tqdm.auto import tqdm

    Y = np.asarray(Y, dtype=float)
    n, k = Y.shape
    chunk = max(1, min(int(chunk_size), k))
    xs, funs, convs = [], [], []
    args = tuple(jnp.asarray(a) for a in (x0, lower, unit))
    bar = tqdm(total=k, desc=label, disable=not progress, leave=False)
    for a in range(0, k, chunk):
        block = Y[:, a:a + chunk].T
        m = block.shape[0]
        if m < chunk:
            block = np.concatenate([block, np.repeat(block[:1], chunk - m, axis=0)])
        x, f, c = optimize_responses(*args, jnp.asarray(block), data, shape)
        xs.append(np.asarray(x)[:m])
        funs.append(np.asarray(f)[:m])
        convs.append(np.asarray(c)[:m])
        bar.update(m)
    bar.close()
    return dict(x=np.concatenate(xs), fun=np.concatenate(funs), converged=np.concatenate(convs))


@programs.cached(static_argnames=("shape", "nagq0"))
def hessians_responses(XI, masks, Y, data, shape, B, nagq0: bool = False):
    """Per response (vmapped): the Hessian of its log likelihood in the reporting metric at ξ
    (:func:`jaxmixed.engine.laplace.hessian_of_report`, the columns where its mask is 0 held),
    and, with ``nagq0``, the joint PIRLS information on β̃ (lme4's nAGQ = 0 Var(β̃)⁻¹) at x."""
    fam = family_of(shape.family)

    def one(xi, mask, y):
        d = data._replace(y=y, const=fam.constant(y, data.m, data.pw, jnp))
        H = laplace.hessian_of_report(xi, laplace.panel_view(d), shape, B, mask)
        if not nagq0:
            return H, jnp.zeros((shape.p, shape.p), xi.dtype)
        x = laplace.params_of_report(xi, shape, B)
        return H, laplace.nagq0_beta_information(x, laplace.mode(x, d, shape), d, shape)

    return jax.vmap(one)(XI, masks, Y)
