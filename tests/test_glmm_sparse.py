"""GLMMs on the blocked sparse layout (the linear engine's panels, weighted afresh in every PIRLS
step: :func:`jaxmixed.engine.pls_sparse.weighted_system`): the VerbAgg optimum of
tests/reference/glmm_public.json (glmmTMB's exact Laplace optimum, as tests/test_glmm.py checks
for the dense layout), the same objective, derivatives and conditional variances as the dense
layout on a model with random slopes on three crossed factors, exact derivatives against
finite differences, and nested designs (many panels) that ``engine="auto"`` puts there, with
adaptive quadrature."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import jaxmixed as jm
from conftest import fd_gradient
from jaxmixed.engine import laplace

REF = json.loads((Path(__file__).parent / "reference" / "glmm_public.json").read_text())["cases"]

_value_and_grad = jax.jit(jax.value_and_grad(laplace.deviance), static_argnames=("shape",))


def test_verbagg_on_the_sparse_layout_matches_the_exact_laplace_optimum():
    r = jm.fit("r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)", jm.datasets.load("verbagg"),
               family="binomial", engine="sparse")
    assert r.engine.shape.re.layout is not None
    ref = REF["verbagg"]["laplace"]
    assert r.converged and abs(r.loglik - ref["logLik"]) < 1e-6
    names = {k: ("_cons" if v == "Intercept" else v) for k, v in REF["verbagg"]["fixef_names_patsy"].items()}
    for k, v in ref["fixef"].items():
        assert r.fixed.loc[names[k], "coef"] == pytest.approx(v, rel=1e-4, abs=1e-7), k
    for k, v in ref["se"].items():
        assert r.fixed.loc[names[k], "se"] == pytest.approx(v, rel=1e-4), k
    for vc in ref["varcomp"]:
        row = r.random[r.random.group == vc["group"]].iloc[0]
        assert row.estimate == pytest.approx(vc["sd"]["(Intercept)"], rel=1e-4)


def _three_crossed(seed=3, n_a=24, n_b=10, n_c=4, rows=700):
    """Incomplete three-way crossing (each row a random cell), random slopes on a and b."""
    rng = np.random.default_rng(seed)
    a, b, c = rng.integers(0, n_a, rows), rng.integers(0, n_b, rows), rng.integers(0, n_c, rows)
    x = rng.normal(size=rows)
    eta = (0.2 + 0.5 * x + rng.normal(scale=0.6, size=n_a)[a] + rng.normal(scale=0.3, size=n_a)[a] * x
           + rng.normal(scale=0.5, size=n_b)[b] + rng.normal(scale=0.3, size=n_b)[b] * x
           + rng.normal(scale=0.4, size=n_c)[c])
    y = rng.poisson(np.exp(eta))
    return pd.DataFrame({"y": y, "x": x, "a": [f"a{k}" for k in a], "b": [f"b{k}" for k in b],
                         "c": [f"c{k}" for k in c]})


@pytest.fixture(scope="module")
def three_way():
    d = _three_crossed()
    f = "y ~ x + (1 + x | a) + (1 + x | b) + (1 | c)"
    return {eng: jm.fit(f, d, family="poisson", engine=eng) for eng in ("dense", "sparse")}


def test_sparse_layout_equals_dense_with_slopes_on_three_crossed_factors(three_way):
    dn, sp = three_way["dense"], three_way["sparse"]
    assert dn.engine.shape.re.layout is None and sp.engine.shape.re.layout is not None
    assert dn.converged and sp.converged
    assert sp.loglik == pytest.approx(dn.loglik, rel=1e-10)
    np.testing.assert_allclose(sp.fixed[["coef", "se"]].to_numpy(), dn.fixed[["coef", "se"]].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(sp.random["estimate"].to_numpy(), dn.random["estimate"].to_numpy(), rtol=1e-6)
    # the objective and its gradient at a point away from the optimum: the same function (the
    # exact Hessians at the optimum agree through the standard errors above)
    x = jnp.asarray(np.asarray(dn.params) + 0.03)
    s_d, s_s = dn.engine.shape, sp.engine.shape
    (v_s, g_s), (v_d, g_d) = _value_and_grad(x, sp.data, s_s), _value_and_grad(x, dn.data, s_d)
    assert float(v_s) == pytest.approx(float(v_d), rel=1e-11)
    np.testing.assert_allclose(g_s, g_d, rtol=1e-8, atol=1e-8)
    # conditional modes and their variances per factor
    for vd, vs in zip(dn.solution.V, sp.solution.V):
        np.testing.assert_allclose(vs, vd, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(sp.solution.u, dn.solution.u, rtol=1e-7, atol=1e-9)


def test_sparse_gradient_against_finite_differences(three_way):
    sp = three_way["sparse"]
    shape = sp.engine.shape
    z0 = np.asarray(sp.params) + 0.05
    g = np.asarray(_value_and_grad(jnp.asarray(z0), sp.data, shape)[1])
    fd = fd_gradient(lambda z: float(_value_and_grad(jnp.asarray(z), sp.data, shape)[0]), z0)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-6)


def _many_schools(seed=8, schools=150, classes=3, per=4):
    rng = np.random.default_rng(seed)
    s = np.repeat(np.arange(schools), classes * per)
    k = np.repeat(np.arange(schools * classes), per)
    x = rng.normal(size=s.size)
    eta = -0.4 + 0.6 * x + rng.normal(scale=0.9, size=schools)[s] + rng.normal(scale=0.6, size=k.max() + 1)[k]
    y = (rng.uniform(size=s.size) < 1 / (1 + np.exp(-eta))).astype(float)
    return pd.DataFrame({"y": y, "x": x, "school": [f"s{v}" for v in s], "cls": [f"c{v % classes}" for v in k]})


def test_many_panels_go_sparse_and_agree_with_dense_under_quadrature():
    """Nested factors, adaptive quadrature level by level (5 points) on the sparse layout."""
    nagq = 5
    d = _many_schools()
    f = "y ~ x + (1 | school/cls)"
    auto = jm.fit(f, d, family="binomial", nagq=nagq)
    dense = jm.fit(f, d, family="binomial", nagq=nagq, engine="dense")
    assert auto.engine.shape.re.layout is not None and dense.engine.shape.re.layout is None
    assert sum(b.n for b in auto.engine.shape.re.layout.buckets) == 150  # a panel per school
    assert auto.converged and dense.converged
    assert auto.loglik == pytest.approx(dense.loglik, rel=1e-10)
    np.testing.assert_allclose(auto.fixed[["coef", "se"]].to_numpy(), dense.fixed[["coef", "se"]].to_numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(auto.random[["estimate", "se"]].to_numpy(), dense.random[["estimate", "se"]].to_numpy(),
                               rtol=1e-6)
