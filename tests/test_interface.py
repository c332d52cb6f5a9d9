"""The engine interface: a fit's result holds its engine, data and parameters, and everything
after the fit asks the engine (issue #11)."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmixed as jm
from jaxmixed.engine import pls, pls_sparse


def _quiet(*a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jm.JaxmixedWarning)
        return jm.fit(*a, **kw)


@pytest.mark.parametrize("residuals", [jm.ar(1, time="week"), jm.independent(by="week")])
def test_residual_structure_fit_reports_its_own_theta(residuals):
    """r.theta of a residual-structure fit is the fitted θ (relative to r.sigma), not the
    independent-errors start, and the engine reproduces r.loglik from r.params."""
    pig = jm.datasets.load("pig")
    start = jm.fit("weight ~ week + (1 + week | id)", pig)
    r = _quiet("weight ~ week + (1 + week | id)", pig, residuals=residuals)
    assert r.engine.name == "marginal"
    n_theta = r.design.n_theta
    np.testing.assert_allclose(r.theta * r.sigma, np.asarray(r.params)[:n_theta], rtol=1e-12)
    assert not np.allclose(r.theta, start.theta, rtol=1e-3)
    dev = float(r.engine.deviance(jnp.asarray(r.params), r.data, r.method == "reml"))
    assert -0.5 * dev == pytest.approx(r.loglik, rel=1e-12)
    # Σ_k from θ and σ, the lme4 way, is the engine's covariance of the effects
    lam = np.asarray(r.design.terms[0].structure.lam(jnp.asarray(r.theta)))
    np.testing.assert_allclose(r.sigma**2 * lam @ lam.T, r.recovariance()["id"].to_numpy(), rtol=1e-10)


def test_independent_errors_fit_reproduces_loglik_through_its_engine():
    r = jm.fit("weight ~ week + (1|id) + (1|week)", jm.datasets.load("pig"), engine="sparse")
    assert r.engine.name == "pls" and r.engine.shape.kind == "sparse"
    np.testing.assert_array_equal(r.theta, r.params)
    dev = float(r.engine.deviance(jnp.asarray(r.params), r.data, True))
    assert -0.5 * dev == pytest.approx(r.loglik, rel=1e-12)


def test_unknown_engine_is_a_clear_error():
    with pytest.raises(jm.ModelError, match="engine must be 'auto', 'dense' or 'sparse'"):
        jm.fit("weight ~ week + (1|id) + (1|week)", jm.datasets.load("pig"), engine="fast")


def _crossed_arrays(kernels):
    d = jm.datasets.load("pig")
    des = jm.fit("weight ~ week + (1|id) + (1|week)", d).design
    return pls.from_design(des, "sparse", kernels=kernels)


@pytest.mark.parametrize("kernels", ["lapack", "unrolled", "xla"])
def test_custom_jvp_rule_survives_the_kernel_choice(kernels, monkeypatch):
    """The blocked engine's hand-written derivative of (log|S|, CᵀS⁻¹C) is used under every
    kernel policy (the old jaxpr re-interpreter dropped custom_jvp rules). A deliberately
    distinctive rule, the true one times 3, is observed in the gradient."""
    st, shape = _crossed_arrays(kernels)
    th = jnp.array([0.9, 0.4])
    true = np.asarray(jax.grad(pls.deviance.__wrapped__)(th, st, shape, False))
    original = pls_sparse.logdet_quad

    @functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
    def tripled(S, C, policy="lapack"):
        return original(S, C, policy)

    @tripled.defjvp
    def _tripled_jvp(policy, primals, tangents):
        out, dout = jax.jvp(lambda S, C: original(S, C, policy), primals, tangents)
        return out, jax.tree_util.tree_map(lambda t: 3.0 * t, dout)

    monkeypatch.setattr(pls_sparse, "logdet_quad", tripled)
    got = np.asarray(jax.grad(pls.deviance.__wrapped__)(th, st, shape, False))
    assert not np.allclose(got, true, rtol=1e-3)
    # the panel part's share of the gradient, tripled: got − true = 2 × (that share)
    share = (got - true) / 2.0
    monkeypatch.setattr(pls_sparse, "logdet_quad", original)
    again = np.asarray(jax.grad(pls.deviance.__wrapped__)(th, st, shape, False))
    np.testing.assert_allclose(again, true, rtol=1e-12)
    assert np.all(np.isfinite(share)) and np.abs(share).max() > 1e-6


def test_kernel_policies_agree():
    """The three kernel policies give the same deviance, gradient and solve."""
    th = jnp.array([0.9, 0.4])
    out = {}
    for k in ("lapack", "unrolled", "xla"):
        st, shape = _crossed_arrays(k)
        out[k] = (float(pls.deviance(th, st, shape, True)), np.asarray(jax.grad(pls.deviance)(th, st, shape, True)),
                  np.asarray(pls.solve(th, st, shape, True).beta))
    for k in ("unrolled", "xla"):
        assert out[k][0] == pytest.approx(out["lapack"][0], rel=1e-12)
        np.testing.assert_allclose(out[k][1], out["lapack"][1], rtol=1e-9)
        np.testing.assert_allclose(out[k][2], out["lapack"][2], rtol=1e-10)
