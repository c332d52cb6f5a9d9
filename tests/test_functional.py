"""jaxmixed.functional: statistics from arrays, the deviance, fits as PyTrees, implicit gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmixed as jm
from jaxmixed import functional as F
from jaxmixed.engine import pls

from conftest import cached_fit

JSP = "math5 ~ math3c + (1 + math3c || school)"


@pytest.fixture(scope="module")
def jsp_arrays():
    fit = cached_fit("fit", JSP, "jsp")
    des = fit.design
    f = des.factors[0]
    return fit, dict(y=jnp.asarray(des.y), X=jnp.asarray(des.X), groups=jnp.asarray(f.codes), Z=jnp.asarray(f.Z),
                     n_groups=f.n_levels)


def _fit(y, X, groups, Z, n_groups, w):
    return F.fit_arrays(y, X, groups, Z, w, n_groups=n_groups, cov="independent")


fit_jit = jax.jit(_fit, static_argnames="n_groups")  # one compiled fit, shared by the tests


def _summary(e):
    return e.beta[0] - 0.2 * e.beta[1] + 0.5 * e.sigma + 3.0 * jnp.sum(e.theta)


def test_stats_from_arrays_match_cross_products(jsp_arrays):
    fit, a = jsp_arrays
    st = F.stats_from_arrays(a["y"], a["X"], a["groups"], a["Z"], cov="independent")
    assert st.struct.L == (48,) and st.struct.q == (2,) and st.struct.p == 2
    for got, ref in zip(st.stats, pls.from_design(fit.design, orthonormal=False)[0]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-12, atol=1e-9)
    # two crossed factors (pig: id, then week), as the engine orders them
    pig = cached_fit("fit", "weight ~ week + (1|id) + (1|week)", "pig")
    des = pig.design
    st2 = F.stats_from_arrays(des.y, des.X, tuple(f.codes for f in des.factors))
    assert st2.struct.L == (48, 9) and st2.struct.m2 == 9
    for got, ref in zip(st2.stats, pls.from_design(des, "dense", orthonormal=False)[0]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(F.deviance(pig.theta, st2, True), -2 * pig.loglik, rtol=1e-10)


def test_fit_arrays_matches_jm_fit(jsp_arrays):
    fit, a = jsp_arrays
    e = fit_jit(**a, w=jnp.ones(a["y"].shape[0]))
    assert isinstance(e, F.Estimates) and bool(e.converged)
    np.testing.assert_allclose(e.theta, fit.theta, rtol=1e-6)
    np.testing.assert_allclose(e.beta, fit.beta, rtol=1e-8)
    np.testing.assert_allclose(e.sigma, fit.sigma, rtol=1e-8)
    np.testing.assert_allclose(-0.5 * e.deviance, fit.loglik, rtol=1e-12)
    np.testing.assert_allclose(e.b[0], fit.solution.b[0], rtol=1e-5, atol=1e-8)
    sol = F.solve(e.theta, F.stats_from_arrays(a["y"], a["X"], a["groups"], a["Z"], cov="independent"))
    np.testing.assert_allclose(sol.beta, e.beta, rtol=1e-12)


def _five_point(f, h):
    return (-f(2 * h) + 8 * f(h) - 8 * f(-h) + f(-2 * h)) / (12 * h)


# a small random-intercept model (quick to compile) for the gradient and vmap tests
_RNG = np.random.default_rng(1)
_N, _L = 40, 8
_G = np.repeat(np.arange(_L), _N // _L)
_X = jnp.asarray(np.column_stack([_RNG.normal(size=_N), np.ones(_N)]))
_Y = jnp.asarray(_RNG.normal(size=(3, _N)) + 1.5 * _RNG.normal(size=(3, _L))[:, _G])


@jax.jit
def _small_fit(y, X, w):
    return F.fit_arrays(y, X, _G, None, w, n_groups=_L)


def test_implicit_gradients_match_finite_differences():
    """d(β̂, σ̂, θ̂)/d(y, X, weights) through the optimum, against central differences."""
    args = (_Y[0], _X, jnp.asarray(_RNG.uniform(0.5, 2.0, size=_N)))
    e = _small_fit(*args)
    assert bool(e.converged) and float(e.theta[0]) > 0.1  # an interior optimum

    def loss(y, X, w):
        return _summary(F.fit_arrays(y, X, _G, None, w, n_groups=_L))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
    rng = np.random.default_rng(7)
    for i, g in enumerate(grads):
        v = jnp.asarray(rng.normal(size=args[i].shape))
        if i == 2:
            v = v * 0.2  # weights stay positive

        def along(s):
            moved = list(args)
            moved[i] = args[i] + s * v
            return float(_summary(_small_fit(*moved)))

        fd = _five_point(along, 1e-4)
        an = float(jnp.sum(g * v))
        assert an == pytest.approx(fd, rel=1e-5), (i, an, fd)


def test_weighted_deviance_is_the_dense_likelihood():
    """With prior weights, −2ℓ(θ) equals the Gaussian likelihood of y ~ N(Xβ, σ²(ZΛΛᵀZᵀ + W⁻¹))
    with β, σ profiled (ML) and its restricted version (REML), computed densely."""
    rng = np.random.default_rng(3)
    n, L = 60, 6
    g = np.repeat(np.arange(L), n // L)
    X = np.column_stack([rng.normal(size=n), np.ones(n)])
    Z = np.column_stack([np.ones(n), rng.normal(size=n)])
    y = X @ [1.0, 2.0] + rng.normal(size=(L, 2))[g].__mul__(Z).sum(1) + rng.normal(size=n)
    w = rng.uniform(0.5, 2.0, size=n)
    st = F.stats_from_arrays(y, X, g, Z, w, cov="unstructured")
    theta = np.array([0.8, 0.3, 0.5])
    lam = np.array([[0.8, 0.0], [0.3, 0.5]])
    Zfull = np.zeros((n, 2 * L))
    for i in range(n):
        Zfull[i, 2 * g[i]:2 * g[i] + 2] = Z[i]
    V = Zfull @ np.kron(np.eye(L), lam @ lam.T) @ Zfull.T + np.diag(1 / w)
    Vi = np.linalg.inv(V)
    beta = np.linalg.solve(X.T @ Vi @ X, X.T @ Vi @ y)
    r = y - X @ beta
    rss = r @ Vi @ r
    ld = np.linalg.slogdet(V)[1]
    ml = ld + n * (1 + np.log(2 * np.pi * rss / n))
    p = X.shape[1]
    reml = ld + np.linalg.slogdet(X.T @ Vi @ X)[1] + (n - p) * (1 + np.log(2 * np.pi * rss / (n - p)))
    np.testing.assert_allclose(F.deviance(theta, st, False), ml, rtol=1e-10)
    np.testing.assert_allclose(F.deviance(theta, st, True), reml, rtol=1e-10)
    # unit weights are no weights
    st1 = F.stats_from_arrays(y, X, g, Z, np.ones(n), cov="unstructured")
    st0 = F.stats_from_arrays(y, X, g, Z, cov="unstructured")
    np.testing.assert_allclose(F.deviance(theta, st1, True), F.deviance(theta, st0, True), rtol=1e-13)


def test_vmap_over_responses_and_grad_of_deviance(jsp_arrays):
    """vmap of fit_arrays over responses equals the fits one by one."""
    w = jnp.ones(_N)
    batched = jax.jit(jax.vmap(lambda y: _small_fit(y, _X, w)))(_Y)
    for k in range(3):
        e = _small_fit(_Y[k], _X, w)
        np.testing.assert_allclose(batched.theta[k], e.theta, rtol=1e-7)
        np.testing.assert_allclose(batched.beta[k], e.beta, rtol=1e-9)
        np.testing.assert_allclose(batched.deviance[k], e.deviance, rtol=1e-12)
    # the functional deviance's gradient is the engine's
    _, a = jsp_arrays
    st = F.stats_from_arrays(a["y"], a["X"], a["groups"], a["Z"], cov="independent")
    engine_deviance = pls.deviance

    th = jnp.array([0.05, 0.4])
    np.testing.assert_allclose(jax.grad(F.deviance)(th, st, True),
                               jax.grad(engine_deviance)(th, st.stats, st.struct, True), rtol=1e-8)


def test_xla_linear_algebra_matches_lapack():
    rng = np.random.default_rng(0)
    for n in (3, 11):  # unrolled, and the column loop
        A = rng.normal(size=(3, n, n))
        A = A @ np.swapaxes(A, 1, 2) + n * np.eye(n)
        np.testing.assert_allclose(F.cholesky_xla(jnp.asarray(A)), np.linalg.cholesky(A), rtol=1e-12, atol=1e-12)
        B = rng.normal(size=(3, n, 2))
        for lower in (True, False):
            T = np.tril(A) if lower else np.triu(A)
            for transpose_a in (False, True):
                for left in (True, False):
                    b = B if left else np.swapaxes(B, 1, 2)
                    kw = dict(left_side=left, lower=lower, transpose_a=transpose_a)
                    np.testing.assert_allclose(F.triangular_solve_xla(jnp.asarray(T), jnp.asarray(b), **kw),
                                               jax.lax.linalg.triangular_solve(jnp.asarray(T), jnp.asarray(b), **kw),
                                               rtol=1e-10, atol=1e-12)


def test_errors():
    with pytest.raises(jm.ModelError, match="n_groups"):
        jax.jit(lambda g: F.stats_from_arrays(jnp.ones(4), jnp.ones((4, 1)), g).stats.n)(jnp.array([0, 0, 1, 1]))
    with pytest.raises(jm.DataError):
        F.stats_from_arrays(jnp.ones(4), jnp.ones((3, 1)), jnp.array([0, 0, 1, 1]))
    with pytest.raises(jm.ModelError, match="cov"):
        F.stats_from_arrays(jnp.ones(4), jnp.ones((4, 1)), jnp.array([0, 0, 1, 1]), cov="banana")
