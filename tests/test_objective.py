"""The objective's autodiff derivatives against finite differences, and no recompilation on refit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmixed as jm
from jaxmixed.data import design
from jaxmixed.engine import pls as objective
from jaxmixed.engine.pls import loglik_eta


def _model(text, data_name, transform=None):
    d = jm.datasets.load(data_name)
    if transform:
        transform(d)
    spec = jm.parse_formula(text)
    des = design.build_design(spec, d)
    return (des, *objective.from_design(des))


MODELS = [
    ("weight ~ week + (1|id) + (1|week)", "pig", None),
    ("gsp ~ private + emp + hwy + water + other + unemp + (1 + hwy + unemp | region) + (1|region:state)",
     "productivity", None),
    ("math5 ~ math3 + homcs(1 + math3 | school)", "jsp", None),
]


def _central_diff(f, x, h):
    """Five-point central differences: truncation error O(h⁴), so h can stay well above round-off."""
    g = np.zeros_like(x)
    for i in range(len(x)):
        e = np.zeros_like(x)
        e[i] = h
        g[i] = (-f(x + 2 * e) + 8 * f(x + e) - 8 * f(x - e) + f(x - 2 * e)) / (12 * h)
    return g


@pytest.mark.parametrize("text,data_name,transform", MODELS)
@pytest.mark.parametrize("reml", [True, False])
def test_gradient_matches_finite_differences(text, data_name, transform, reml):
    des, st, struct = _model(text, data_name, transform)
    rng = np.random.default_rng(1)
    theta = des.theta0 * rng.uniform(0.3, 1.5, size=des.n_theta) + np.where(des.theta_lower == 0, 0, 0.2)
    f = lambda th: float(objective.deviance(jnp.asarray(th), st, struct, reml))  # noqa: E731
    g = np.asarray(jax.grad(objective.deviance)(jnp.asarray(theta), st, struct, reml))
    fd = _central_diff(f, theta, 1e-3)
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-5 * (1 + np.abs(fd).max()))


def test_hessian_in_stata_metric_matches_finite_differences():
    des, st, struct = _model(MODELS[0][0], "pig")
    eta = jnp.array([1.3, -1.1, 0.7])
    def f(e):
        return loglik_eta(e, st, struct, True)

    H = np.asarray(jax.jit(jax.hessian(f))(eta))
    grad = jax.jit(jax.grad(f))  # compiled once, not dispatched op by op twelve times

    def g(e):
        return np.asarray(grad(jnp.asarray(e)))

    # five-point central differences of the exact gradient (truncation O(h⁴), far above round-off)
    h = 1e-3
    fd = np.column_stack([(-g(eta + 2 * e) + 8 * g(eta + e) - 8 * g(eta - e) + g(eta - 2 * e)) / (12 * h)
                          for e in np.eye(3) * h])
    np.testing.assert_allclose(H, fd, rtol=1e-5, atol=1e-6)


def test_new_response_of_same_shape_does_not_recompile(traces):
    d = jm.datasets.load("pig")
    r1 = jm.fit("weight ~ week + (1|id) + (1|week)", d)
    d2 = d.copy()
    d2["weight"] = d.weight * 1.1 + np.random.default_rng(0).normal(size=len(d))
    with traces as t:
        r2 = jm.fit("weight ~ week + (1|id) + (1|week)", d2)
    assert t.names == [], f"refit with a new y traced {t.names}"
    assert r2.loglik != r1.loglik and r2.converged
