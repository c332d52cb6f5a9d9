"""Adaptive quadrature with vector-valued random effects (which no R package fits: lme4 and
MixedModels.jl refuse nAGQ > 1 beyond one scalar term), shown right three ways: nagq = 1 is the
Laplace value, the value converges as nagq grows, and it equals brute-force non-adaptive
integration on a tiny data set. Then the exact derivatives of the GLMM objectives against
finite differences (implicit differentiation through the conditional modes)."""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import jaxmixed as jm
from conftest import fd_gradient
from jaxmixed.engine import laplace


def _tiny(seed=11, groups=10, per=8):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), per)
    x = rng.normal(size=g.size)
    b0 = rng.normal(scale=0.9, size=groups)
    b1 = 0.5 * b0 + rng.normal(scale=0.5, size=groups)
    eta = -0.2 + 0.8 * x + b0[g] + b1[g] * x
    y = (rng.uniform(size=g.size) < 1 / (1 + np.exp(-eta))).astype(float)
    return pd.DataFrame({"y": y, "x": x, "g": [f"g{k}" for k in g]})


@pytest.fixture(scope="module")
def tiny_fit():
    return jm.fit("y ~ x + (1 + x | g)", _tiny(), family="binomial")


def _value(x, r, nagq):
    shape = replace(r.engine.shape, nagq=nagq)
    return float(jax.jit(laplace.agq_deviance, static_argnames=("shape",))(jnp.asarray(x), r.data, shape))


def test_one_point_quadrature_is_the_laplace_value(tiny_fit):
    r = tiny_fit
    x = np.asarray(r.params) + 0.05  # anywhere, not only at the optimum
    lap = float(jax.jit(laplace.laplace_deviance, static_argnames=("shape",))(jnp.asarray(x), r.data, r.engine.shape))
    assert _value(x, r, 1) == pytest.approx(lap, abs=1e-10)
    assert -0.5 * lap != pytest.approx(-0.5 * _value(x, r, 9), abs=1e-3)  # (the quadrature does move it)


def test_quadrature_converges_as_points_grow(tiny_fit):
    r = tiny_fit
    x = np.asarray(r.params)
    ll = {k: -0.5 * _value(x, r, k) for k in (3, 5, 9, 15, 25)}
    gaps = [abs(ll[a] - ll[b]) for a, b in ((3, 25), (5, 25), (9, 25), (15, 25))]
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3]
    assert gaps[3] < 1e-8


def _brute_force_loglik(x, r, half_width=9.0, m=601):
    """Σ_g log ∫ Π_i p(y_i | u) φ₂(u) du by a dense, non-adaptive tensor grid (numpy)."""
    des = r.design
    shape = r.engine.shape
    beta_t, theta, _ = laplace.split(np.asarray(x), shape)
    lam = np.asarray(shape.re.terms[0].structure.lam(theta))
    eta0 = np.asarray(r.data.X) @ np.asarray(beta_t)
    fac = des.factors[0]
    t = np.linspace(-half_width, half_width, m)
    U1, U2 = np.meshgrid(t, t, indexing="ij")
    U = np.stack([U1.ravel(), U2.ravel()], axis=1)  # (M, 2)
    logphi = -0.5 * np.sum(U**2, axis=1) - np.log(2 * np.pi)
    dA = (t[1] - t[0]) ** 2
    B = U @ lam.T  # b = Λu
    y = np.asarray(r.data.y)
    total = 0.0
    for lev in range(fac.n_levels):
        rows = np.flatnonzero(fac.codes == lev)
        eta = eta0[rows][:, None] + fac.Z[rows] @ B.T  # (n_g, M)
        ll = np.sum(y[rows][:, None] * eta - np.logaddexp(0.0, eta), axis=0) + logphi
        mx = ll.max()
        total += mx + np.log(np.sum(np.exp(ll - mx)) * dA)
    return total


def test_quadrature_equals_brute_force_integration(tiny_fit):
    r = tiny_fit
    for shift in (0.0, 0.1):
        x = np.asarray(r.params) + shift
        assert -0.5 * _value(x, r, 25) == pytest.approx(_brute_force_loglik(x, r), abs=1e-7)


def test_vector_effect_quadrature_fit(tiny_fit):
    d = _tiny()
    r7 = jm.fit("y ~ x + (1 + x | g)", d, family="binomial", nagq=7)
    assert r7.converged and r7.method == "agq" and r7.nagq == 7
    assert not r7.singular and not tiny_fit.singular  # an interior optimum: corr strictly inside (−1, 1)
    # its optimum: no better point nearby, and the brute-force integral agrees there
    assert r7.loglik == pytest.approx(_brute_force_loglik(r7.params, r7), abs=5e-5)
    assert r7.loglik != pytest.approx(tiny_fit.loglik, abs=1e-3)
    assert list(r7.random.name) == ["sd(x)", "sd(_cons)", "corr(x,_cons)"]


@pytest.mark.parametrize("nagq", [1, 5])
def test_gradient_and_hessian_against_finite_differences(tiny_fit, nagq):
    r = tiny_fit
    shape = replace(r.engine.shape, nagq=nagq)
    dev = jax.jit(laplace.deviance, static_argnames=("shape",))
    grad = jax.jit(jax.grad(laplace.deviance), static_argnames=("shape",))
    x = np.asarray(r.params) + np.array([0.05, -0.1, 0.1, 0.05, -0.05])
    f = lambda z: float(dev(jnp.asarray(z), r.data, shape))  # noqa: E731
    g = np.asarray(grad(jnp.asarray(x), r.data, shape))
    np.testing.assert_allclose(g, fd_gradient(f, x), rtol=1e-6, atol=1e-6)
    # the Hessian in the reporting metric, against differences of the exact gradient
    B = jnp.asarray(r.engine.B)
    xi = laplace.report_of_params(x, shape, r.engine.B)
    H = np.asarray(laplace.hessian_report(jnp.asarray(xi), r.data, shape, B, jnp.ones(xi.size)))
    gll = jax.jit(jax.grad(lambda z, d: -0.5 * laplace.deviance(laplace.params_of_report(z, shape, B), d, shape)))
    Hfd = np.stack([fd_gradient(lambda z: float(np.asarray(gll(jnp.asarray(z), r.data))[i]), xi, 1e-5)
                    for i in range(xi.size)])
    np.testing.assert_allclose(H, Hfd, rtol=1e-5, atol=1e-5)


def _crossed(seed, n_a, n_b, reps, intercept, sd_a, sd_b):
    """(rng, a, b, x, η) of a fully crossed a × b design with ``reps`` rows per cell."""
    rng = np.random.default_rng(seed)
    a, b = np.meshgrid(np.arange(n_a), np.arange(n_b), indexing="ij")
    a, b = np.repeat(a.ravel(), reps), np.repeat(b.ravel(), reps)
    x = rng.normal(size=a.size)
    eta = intercept + 0.5 * x + rng.normal(scale=sd_a, size=n_a)[a] + rng.normal(scale=sd_b, size=n_b)[b]
    return rng, a, b, x, eta


def test_crossed_gradient_against_finite_differences():
    rng, a, b, x, eta = _crossed(7, 9, 6, 2, 0.3, 0.7, 0.4)
    y = rng.poisson(np.exp(eta))
    d = pd.DataFrame({"y": y, "x": x, "a": [f"a{k}" for k in a], "b": [f"b{k}" for k in b]})
    r = jm.fit("y ~ x + (1 | a) + (1 | b)", d, family="poisson")
    assert r.converged
    shape = r.engine.shape
    dev = jax.jit(laplace.deviance, static_argnames=("shape",))
    z0 = np.asarray(r.params) + 0.05
    g = np.asarray(jax.jit(jax.grad(laplace.deviance), static_argnames=("shape",))(jnp.asarray(z0), r.data, shape))
    np.testing.assert_allclose(g, fd_gradient(lambda z: float(dev(jnp.asarray(z), r.data, shape)), z0),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(jm.ModelError, match="are crossed"):
        jm.fit("y ~ x + (1 | a) + (1 | b)", d, family="poisson", nagq=5)


# ---------------------------------------------------------------------------------------------
# two nested grouping factors (classes within schools), integrated level by level


def _nested(seed=5, schools=5, classes=3, per=5, slope=False):
    rng = np.random.default_rng(seed)
    a = np.repeat(np.arange(schools), classes * per)
    j = np.repeat(np.arange(schools * classes), per)
    x = rng.normal(size=a.size)
    eta = -0.3 + 0.7 * x + rng.normal(scale=1.0, size=schools)[a] + rng.normal(scale=0.8, size=j.max() + 1)[j]
    if slope:
        eta = eta + rng.normal(scale=0.6, size=j.max() + 1)[j] * x
    y = (rng.uniform(size=a.size) < 1 / (1 + np.exp(-eta))).astype(float)
    return pd.DataFrame({"y": y, "x": x, "school": [f"s{k}" for k in a], "cls": [f"c{k % classes}" for k in j]})


NESTED = {"intercepts": ("y ~ x + (1 | school/cls)", {}),
          "inner slope": ("y ~ x + (1 | school) + (1 + x | school:cls)", {"seed": 11, "per": 8, "slope": True})}


@pytest.fixture(scope="module", params=list(NESTED))
def nested_fit(request):
    formula, kw = NESTED[request.param]
    return jm.fit(formula, _nested(**kw), family="binomial")


def _nested_value(x, r, nagq, adaptive=True):
    shape = replace(r.engine.shape, nagq=nagq, adaptive=adaptive)
    return float(jax.jit(laplace.deviance, static_argnames=("shape",))(jnp.asarray(x), r.data, shape))


def _nested_brute_force(x, r, half_width=7.0, m_outer=201, m_inner=(301, 81)):
    """Σ_a log ∫ φ(t) Π_{j∈a} [∫ Π_{i∈j} p(y_i | t, v) φ(v) dv] dt on dense grids (numpy): one
    dimension for the schools' intercept, one or two for the classes' effects."""
    des, shape = r.design, r.engine.shape
    beta_t, theta, _ = laplace.split(np.asarray(x), shape)
    lam_i, lam_o = (np.asarray(v) for v in laplace.pls.factor_lambdas(jnp.asarray(theta), shape.re))
    inner, outer = des.factors
    qi = inner.Z.shape[1]
    eta0 = np.asarray(r.data.X) @ np.asarray(beta_t)
    y = np.asarray(r.data.y)
    t = np.linspace(-half_width, half_width, m_outer)
    log_dt = np.log(t[1] - t[0]) - 0.5 * np.log(2 * np.pi) - 0.5 * t**2  # log φ(t) dt
    s = np.linspace(-half_width, half_width, m_inner[qi - 1])
    V = np.stack([g.ravel() for g in np.meshgrid(*([s] * qi), indexing="ij")], axis=1)  # (M, qi)
    log_dv = qi * np.log(s[1] - s[0]) - 0.5 * qi * np.log(2 * np.pi) - 0.5 * np.sum(V**2, axis=1)
    Bv = V @ lam_i.T  # inner b per node
    total = 0.0
    for a in range(outer.n_levels):
        acc = log_dt.copy()
        for j in np.unique(inner.codes[outer.codes == a]):
            rows = np.flatnonzero(inner.codes == j)
            ll = np.broadcast_to(log_dv, (t.size, V.shape[0])).copy()  # (m_outer, M)
            for i in rows:
                eta = eta0[i] + (outer.Z[i] @ lam_o)[0] * t[:, None] + (Bv @ inner.Z[i])[None, :]
                ll += y[i] * eta - np.logaddexp(0.0, eta)
            mx = ll.max(axis=1, keepdims=True)
            acc = acc + (mx[:, 0] + np.log(np.sum(np.exp(ll - mx), axis=1)))
        mx = acc.max()
        total += mx + np.log(np.sum(np.exp(acc - mx)))
    return total


def test_nested_one_point_is_laplace_and_points_converge(nested_fit):
    r = nested_fit
    assert [f.group for f in r.design.factors] in ([("school", "cls"), ("school",)],
                                                   [("school:cls",), ("school",)])
    x = np.asarray(r.params) + 0.05
    lap = float(jax.jit(laplace.laplace_deviance, static_argnames=("shape",))(jnp.asarray(x), r.data,
                                                                              r.engine.shape))
    assert _nested_value(x, r, 1) == pytest.approx(lap, abs=1e-10)
    ll = {k: -0.5 * _nested_value(x, r, k) for k in (3, 5, 9, 15, 25)}
    gaps = [abs(ll[k] - ll[25]) for k in (3, 5, 9, 15)]
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3] and gaps[3] < 1e-8
    assert abs(ll[25] + 0.5 * lap) > 1e-3  # the quadrature does move it


def test_nested_quadrature_equals_brute_force(nested_fit):
    r = nested_fit
    for shift in (0.0, 0.1):
        x = np.asarray(r.params) + shift
        bf = _nested_brute_force(x, r)
        assert -0.5 * _nested_value(x, r, 25) == pytest.approx(bf, abs=1e-9)
        # plain (non-adaptive) Gauss-Hermite on the prior gets there too, with many points
        assert -0.5 * _nested_value(x, r, 60, adaptive=False) == pytest.approx(bf, abs=1e-3)


def test_nested_gradient_and_hessian_against_finite_differences(nested_fit):
    r = nested_fit
    shape = replace(r.engine.shape, nagq=5)
    dev = jax.jit(laplace.deviance, static_argnames=("shape",))
    x = np.asarray(r.params) + 0.05 * np.cos(np.arange(r.params.size))
    g = np.asarray(jax.jit(jax.grad(laplace.deviance), static_argnames=("shape",))(jnp.asarray(x), r.data, shape))
    np.testing.assert_allclose(g, fd_gradient(lambda z: float(dev(jnp.asarray(z), r.data, shape)), x),
                               rtol=1e-6, atol=1e-6)
    hess = jax.jit(jax.hessian(laplace.deviance), static_argnames=("shape",))
    grad = jax.jit(jax.grad(laplace.deviance), static_argnames=("shape",))
    H = np.asarray(hess(jnp.asarray(x), r.data, shape))
    Hfd = np.stack([fd_gradient(lambda z: float(np.asarray(grad(jnp.asarray(z), r.data, shape))[i]), x, 1e-5)
                    for i in range(x.size)])
    np.testing.assert_allclose(H, Hfd, rtol=1e-5, atol=1e-5)


def test_nested_quadrature_fit_and_stata_default():
    d = _nested()
    r7 = jm.fit("y ~ x + (1 | school/cls)", d, family="binomial", nagq=7)
    lap = jm.fit("y ~ x + (1 | school/cls)", d, family="binomial")
    assert r7.converged and r7.method == "agq" and r7.nagq == 7
    assert r7.loglik != pytest.approx(lap.loglik, abs=1e-3)
    assert r7.loglik == pytest.approx(_nested_brute_force(r7.params, r7), abs=1e-4)
    # Stata's melogit integrates nested levels by mvaghermite with 7 points by default
    st = jm.melogit("melogit y x || school: || cls:", d)
    assert st.nagq == 7 and st.loglik == pytest.approx(r7.loglik, abs=1e-8)
    assert "Integration method: mvaghermite" in str(st)
    # jm.mixed given an me* command fits the GLMM, not a linear model of the 0/1 response
    assert jm.mixed("melogit y x || school: || cls:", d).loglik == pytest.approx(r7.loglik, abs=1e-8)
    np.testing.assert_allclose(st.fixed["coef"], r7.fixed["coef"], rtol=1e-6)


def test_crossed_factors_take_laplace_by_stata_default_and_refuse_points():
    rng, a, b, x, eta = _crossed(2, 8, 5, 3, 0.2, 0.8, 0.5)
    d = pd.DataFrame({"y": (rng.uniform(size=a.size) < 1 / (1 + np.exp(-eta))).astype(float), "x": x,
                      "a": a, "b": b})
    lap = jm.fit("y ~ x + (1 | a) + (1 | b)", d, family="binomial")
    st = jm.melogit("melogit y x || _all: R.b || a:", d)
    assert st.nagq == 1 and st.loglik == pytest.approx(lap.loglik, abs=1e-8)
    with pytest.raises(jm.ModelError, match="are crossed"):
        jm.melogit("melogit y x || _all: R.b || a:, intpoints(7)", d)
    with pytest.raises(jm.ModelError, match="are crossed"):
        jm.fit("y ~ x + (1 | a) + (1 | b)", d, family="binomial", nagq=7)


# --- three nested levels -----------------------------------------------------------------------

def _three_levels(seed=6, districts=4, schools=3, classes=3, per=6, slope=False):
    rng = np.random.default_rng(seed)
    n_s, n_c = districts * schools, districts * schools * classes
    dist = np.repeat(np.arange(districts), schools * classes * per)
    sch = np.repeat(np.arange(n_s), classes * per)
    cls = np.repeat(np.arange(n_c), per)
    x = rng.normal(size=dist.size)
    eta = (-0.2 + 0.6 * x + rng.normal(scale=0.9, size=districts)[dist] + rng.normal(scale=0.7, size=n_s)[sch]
           + rng.normal(scale=0.6, size=n_c)[cls])
    if slope:
        eta = eta + rng.normal(scale=0.5, size=n_s)[sch] * x
    y = (rng.uniform(size=dist.size) < 1 / (1 + np.exp(-eta))).astype(float)
    return pd.DataFrame({"y": y, "x": x, "district": [f"d{k}" for k in dist],
                         "school": [f"s{k % schools}" for k in sch], "cls": [f"c{k % classes}" for k in cls]})


@pytest.fixture(scope="module")
def three_level_fit():
    return jm.fit("y ~ x + (1 | district/school/cls)", _three_levels(), family="binomial")


def _three_level_brute_force(x, r, half_width=7.0, m=71):
    """Σ_d log ∫ φ(t) Π_{s∈d} ∫ φ(v) Π_{c∈s} ∫ φ(w) Π_{i∈c} p(y_i | t, v, w) dw dv dt for scalar
    intercepts at three nested levels, each integral a trapezoid rule on m points (numpy)."""
    des, shape = r.design, r.engine.shape
    beta_t, theta, _ = laplace.split(np.asarray(x), shape)
    lams = [float(np.asarray(v)[0, 0]) for v in laplace.pls.factor_lambdas(jnp.asarray(theta), shape.re)]
    inner, middle, outer = des.factors  # engine order: most levels first
    eta0 = np.asarray(r.data.X) @ np.asarray(beta_t)
    y = np.asarray(r.data.y)
    g = np.linspace(-half_width, half_width, m)
    log_w = np.log(g[1] - g[0]) - 0.5 * np.log(2 * np.pi) - 0.5 * g**2  # log φ(g) dg
    T, V, W = np.meshgrid(g, g, g, indexing="ij")
    total = 0.0
    for a in range(outer.n_levels):
        acc_a = log_w.copy()  # (t,)
        for s in np.unique(middle.codes[outer.codes == a]):
            acc_s = np.broadcast_to(log_w, (m, m)).copy()  # (t, v)
            for c in np.unique(inner.codes[middle.codes == s]):
                ll = np.broadcast_to(log_w, (m, m, m)).copy()  # (t, v, w)
                for i in np.flatnonzero(inner.codes == c):
                    eta = eta0[i] + lams[2] * T + lams[1] * V + lams[0] * W
                    ll += y[i] * eta - np.logaddexp(0.0, eta)
                mx = ll.max(axis=2, keepdims=True)
                acc_s += mx[..., 0] + np.log(np.sum(np.exp(ll - mx), axis=2))
            mx = acc_s.max(axis=1, keepdims=True)
            acc_a += mx[:, 0] + np.log(np.sum(np.exp(acc_s - mx), axis=1))
        mx = acc_a.max()
        total += mx + np.log(np.sum(np.exp(acc_a - mx)))
    return total


def test_three_levels_one_point_is_laplace_points_converge_and_equal_brute_force(three_level_fit):
    """Three nested levels (district / school / class, scalar intercepts), which lme4 and
    MixedModels.jl do not integrate beyond Laplace: nagq = 1 is the Laplace value, the value
    converges as the points grow, and it equals brute-force integration on grids."""
    r = three_level_fit
    assert [len(f.group) for f in r.design.factors] == [3, 2, 1]  # class in school in district
    assert not r.singular
    for shift in (0.0, 0.1):
        x = np.asarray(r.params) + shift
        lap = float(jax.jit(laplace.laplace_deviance, static_argnames=("shape",))(jnp.asarray(x), r.data,
                                                                                  r.engine.shape))
        assert _nested_value(x, r, 1) == pytest.approx(lap, abs=1e-10)
        ll = {k: -0.5 * _nested_value(x, r, k) for k in (3, 5, 9, 15)}
        gaps = [abs(ll[k] - ll[15]) for k in (3, 5, 9)]
        assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-6
        bf = _three_level_brute_force(x, r)
        assert ll[15] == pytest.approx(bf, abs=1e-7)
        assert abs(bf + 0.5 * lap) > 1e-3  # the quadrature does move it
        # plain Gauss-Hermite on the prior, with many points
        assert -0.5 * _nested_value(x, r, 30, adaptive=False) == pytest.approx(bf, abs=2e-2)


def test_three_levels_vector_effect_derivatives_against_finite_differences():
    """A random slope at the middle level (q = 2 there), 3 points per dimension: the exact
    gradient and Hessian of the quadrature objective against central differences."""
    d = _three_levels(seed=8, districts=3, schools=3, classes=2, per=5, slope=True)
    r = jm.fit("y ~ x + (1 | district) + (1 + x | district:school) + (1 | district:school:cls)", d,
               family="binomial")
    shape = replace(r.engine.shape, nagq=3)
    assert shape.re.q == (1, 2, 1)
    x = np.asarray(r.params) + 0.05 * np.cos(np.arange(r.params.size))
    lap = float(jax.jit(laplace.laplace_deviance, static_argnames=("shape",))(jnp.asarray(x), r.data,
                                                                              r.engine.shape))
    assert _nested_value(x, r, 1) == pytest.approx(lap, abs=1e-10)
    dev = jax.jit(laplace.deviance, static_argnames=("shape",))
    grad = jax.jit(jax.grad(laplace.deviance), static_argnames=("shape",))
    g = np.asarray(grad(jnp.asarray(x), r.data, shape))
    np.testing.assert_allclose(g, fd_gradient(lambda z: float(dev(jnp.asarray(z), r.data, shape)), x),
                               rtol=1e-6, atol=1e-6)
    H = np.asarray(jax.jit(jax.hessian(laplace.deviance), static_argnames=("shape",))(jnp.asarray(x), r.data, shape))
    Hfd = np.stack([fd_gradient(lambda z: float(np.asarray(grad(jnp.asarray(z), r.data, shape))[i]), x, 1e-5)
                    for i in range(x.size)])
    np.testing.assert_allclose(H, Hfd, rtol=1e-5, atol=1e-5)


def test_three_levels_fit_and_stata_default():
    """melogit with three nested levels integrates them by mvaghermite, 7 points, as Stata does
    by default; jm.fit(nagq=7) gives the same fit, at the brute-force log likelihood."""
    d = _three_levels()
    r7 = jm.fit("y ~ x + (1 | district/school/cls)", d, family="binomial", nagq=7)
    assert r7.converged and not r7.singular and r7.method == "agq" and r7.nagq == 7
    assert r7.loglik == pytest.approx(_three_level_brute_force(r7.params, r7), abs=1e-4)
    st = jm.melogit("melogit y x || district: || school: || cls:", d)
    assert st.nagq == 7 and st.loglik == pytest.approx(r7.loglik, abs=1e-8)
    np.testing.assert_allclose(st.fixed["coef"], r7.fixed["coef"], rtol=1e-6)
    report = " ".join(str(st).split())
    assert "Integration method: mvaghermite Integration pts. = 7" in report
    assert "school | 12 18 18.0 18" in report and "cls | 36 6 6.0 6" in report
