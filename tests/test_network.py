"""The likelihood layer for networks (jaxmixed.functional.nll; engine/grouped.py, issue #17).

Against jm.fit's ML fits (themselves checked against lme4 and Stata): with a linear fixed part
trained by optax, the estimates and log likelihood to 1e-5 relative; gradients against finite
differences; the mini-batch estimate of the gradient is unbiased.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import jaxmixed as jm
from jaxmixed import functional as F

optax = pytest.importorskip("optax")


def _sleep():
    d = jm.datasets.load("sleepstudy")
    codes, levels = pd.factorize(d["Subject"], sort=True)
    X = np.column_stack([np.ones(len(d)), d["Days"].to_numpy(float)])
    Z = X.copy()
    return d, jnp.asarray(d["Reaction"].to_numpy(float)), jnp.asarray(X), jnp.asarray(Z), jnp.asarray(codes), len(levels)


def _random_problem(seed=0, G=30, q=2, n=400, balanced=False):
    rng = np.random.default_rng(seed)
    # balanced: n / G rows in every group, so that batches of whole groups share one shape
    g = rng.permutation(np.repeat(np.arange(G), n // G)) if balanced else rng.integers(0, G, n)
    Z = np.column_stack([np.ones(n), rng.standard_normal((n, q - 1))])
    eta = rng.standard_normal(n)
    y = eta + np.sum(Z * rng.standard_normal((G, q))[g], axis=1) + 0.7 * rng.standard_normal(n)
    params = F.VarianceParams(jnp.asarray(-0.3), jnp.asarray(rng.standard_normal((q, q)) * 0.4))
    return jnp.asarray(eta), jnp.asarray(y), jnp.asarray(g), jnp.asarray(Z), params, G


def test_nll_equals_the_dense_marginal_density():
    eta, y, g, Z, params, G = _random_problem(G=6, n=40)
    L, s2 = F.grouped.factor(params)
    Zd = np.zeros((40, 6 * 2))
    for i in range(40):
        Zd[i, 2 * int(g[i]):2 * int(g[i]) + 2] = Z[i]
    V = s2 * np.eye(40) + Zd @ np.kron(np.eye(6), np.asarray(L @ L.T)) @ Zd.T
    r = np.asarray(y - eta)
    dense = 0.5 * (40 * np.log(2 * np.pi) + np.linalg.slogdet(V)[1] + r @ np.linalg.solve(V, r))
    np.testing.assert_allclose(float(F.nll(eta, y, g, params, Z, n_groups=G)), dense, rtol=1e-12)
    # the BLUPs are the conditional means Σ_b Zᵀ V⁻¹ r
    b = np.asarray(F.blups(eta, y, g, params, Z, n_groups=G))
    dense_b = (np.kron(np.eye(6), np.asarray(L @ L.T)) @ Zd.T @ np.linalg.solve(V, r)).reshape(6, 2)
    np.testing.assert_allclose(b, dense_b, rtol=1e-10, atol=1e-12)


def test_gradients_match_finite_differences():
    eta, y, g, Z, params, G = _random_problem()
    f = jax.jit(lambda e, p: F.nll(e, y, g, p, Z, n_groups=G))
    ge, gp = jax.grad(f, argnums=(0, 1))(eta, params)
    h = 1e-6
    rng = np.random.default_rng(1)
    for _ in range(3):  # directional derivatives in random directions
        de = jnp.asarray(rng.standard_normal(eta.shape))
        dp = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(np.shape(x))), params)
        plus = f(eta + h * de, jax.tree_util.tree_map(lambda x, d: x + h * d, params, dp))
        minus = f(eta - h * de, jax.tree_util.tree_map(lambda x, d: x - h * d, params, dp))
        fd = (plus - minus) / (2 * h)
        exact = jnp.vdot(ge, de) + sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(gp),
                                                                      jax.tree_util.tree_leaves(dp)))
        np.testing.assert_allclose(float(exact), float(fd), rtol=1e-6)


def test_minibatch_gradient_is_unbiased():
    eta, y, g, Z, params, G = _random_problem(G=40, n=600, balanced=True)  # one compiled batch
    full = jax.grad(lambda p: F.nll(eta, y, g, p, Z, n_groups=G))(params)
    rows_of = [np.flatnonzero(np.asarray(g) == k) for k in range(G)]

    @jax.jit
    def batch_grad(rows, scale):
        return jax.grad(lambda p: F.nll(eta[rows], y[rows], g[rows], p, Z[rows], n_groups=G, scale=scale))(params)

    def rows_for(groups):
        return jnp.asarray(np.concatenate([rows_of[k] for k in groups]))

    # a partition of the groups: the unscaled batch gradients add up to the full gradient exactly
    perm = np.random.default_rng(2).permutation(G)
    parts = [batch_grad(rows_for(perm[i:i + 8]), 1.0) for i in range(0, G, 8)]
    total = jax.tree_util.tree_map(lambda *xs: sum(xs), *parts)
    for a, b in zip(jax.tree_util.tree_leaves(total), jax.tree_util.tree_leaves(full)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-9)
    # random batches of 8 whole groups scaled by G / 8: the mean approaches the full gradient
    rng = np.random.default_rng(3)
    draws = [batch_grad(rows_for(rng.choice(G, 8, replace=False)), G / 8) for _ in range(400)]
    mean = jax.tree_util.tree_map(lambda *xs: sum(xs) / len(xs), *draws)
    sd = jax.tree_util.tree_map(lambda *xs: np.std(np.stack(xs), axis=0) / np.sqrt(len(xs)), *draws)
    for m, f_, s in zip(*(jax.tree_util.tree_leaves(t) for t in (mean, full, sd))):
        assert np.all(np.abs(np.asarray(m) - np.asarray(f_)) <= 4.5 * np.asarray(s) + 1e-9)


def _train(loss, w0, steps=400):
    """optax L-BFGS to convergence."""
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    @jax.jit
    def step(w, state):
        value, grad = value_and_grad(w, state=state)
        updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(w, updates), state, value, grad

    w, state = w0, opt.init(w0)
    for _ in range(steps):
        w, state, value, grad = step(w, state)
        if max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(grad)) < 1e-9:
            break
    return w


@pytest.mark.parametrize("model", ["slope", "intercept"])
def test_linear_network_trained_by_optax_reaches_jm_fit(model):
    d, y, X, Z, g, G = _sleep()
    formula = "Reaction ~ Days + (1 + Days|Subject)" if model == "slope" else "Reaction ~ Days + (1|Subject)"
    Zm = Z if model == "slope" else None
    q = 2 if model == "slope" else 1
    ref = jm.fit(formula, d, method="ml")

    def loss(w):
        return F.nll(X @ w["beta"], y, g, w["var"], Zm, n_groups=G)

    w0 = {"beta": jnp.zeros(2), "var": F.init_params(q, sigma=float(np.std(np.asarray(y))), sd=10.0)}
    w = _train(loss, w0)
    np.testing.assert_allclose(-float(loss(w)), ref.loglik, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(w["beta"])[::-1], ref.beta, rtol=1e-5)  # (jm: Days, _cons)
    rep = F.variance_report(w["var"], names=["_cons", "Days"][:q])
    est = dict(zip(ref.random["name"], ref.random["estimate"]))
    np.testing.assert_allclose(rep["sd(Residual)"], ref.sigma, rtol=1e-5)
    np.testing.assert_allclose(rep["sd(_cons)"], est["sd(_cons)"], rtol=1e-5)
    if model == "slope":
        np.testing.assert_allclose(rep["sd(Days)"], est["sd(Days)"], rtol=1e-5)
        key = next(k for k in est if k.startswith("corr("))
        np.testing.assert_allclose(rep["corr(_cons,Days)"], est[key], rtol=1e-5)
    # predictions: η + BLUPs for seen groups equal jm's fitted values; new groups get η
    b = F.blups(X @ w["beta"], y, g, w["var"], Zm, n_groups=G)
    fitted = F.predict_conditional(X @ w["beta"], g, b, Zm)
    np.testing.assert_allclose(np.asarray(fitted), ref.predict("fitted").to_numpy(), rtol=1e-5)
    marginal = F.predict_conditional(X @ w["beta"], -jnp.ones_like(g), b, Zm)
    np.testing.assert_allclose(np.asarray(marginal), ref.predict("xb").to_numpy(), rtol=1e-5)


def _glmm_data(family, seed=4, G=40, per=15):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(G), per)
    x = rng.standard_normal(G * per)
    lin = -0.3 + 0.8 * x + rng.standard_normal(G)[g] * 0.9 + 0.4 * x * rng.standard_normal(G)[g]
    y = rng.binomial(1, 1 / (1 + np.exp(-lin))) if family == "bernoulli" else rng.poisson(np.exp(lin))
    return pd.DataFrame({"y": y.astype(float), "x": x, "g": g})


@pytest.mark.parametrize("family", ["bernoulli", "poisson"])
def test_laplace_nll_equals_jm_fit_glmm_at_its_optimum(family):
    """At jm.fit's Laplace estimates (β, Σ_b) the layer's −log likelihood is jm.fit's, its
    gradient is 0 there (an optimum of the same function), and its gradients match finite
    differences."""
    d = _glmm_data(family)
    fam = "binomial" if family == "bernoulli" else "poisson"
    r = jm.fit("y ~ x + (1 + x | g)", d, family=fam)
    X = jnp.asarray(np.column_stack([d.x, np.ones(len(d))]))
    Z = jnp.asarray(np.column_stack([np.ones(len(d)), d.x]))
    y, g = jnp.asarray(d.y.to_numpy()), jnp.asarray(d.g.to_numpy())
    V = r.recovariance()
    S = np.asarray(V[list(V)[0]], dtype=float)  # Σ_b in the order (_cons, x)
    order = [list(V[list(V)[0]].index).index(c) for c in ("_cons", "x")]
    S = S[np.ix_(order, order)]
    Lc = np.linalg.cholesky(S)
    chol = np.tril(Lc, -1) + np.diag(np.log(np.diag(Lc)))
    params = F.VarianceParams(jnp.asarray(0.0), jnp.asarray(chol))

    def loss(beta, p):
        return F.nll_laplace(X @ beta, y, g, p, Z, n_groups=40, family=family)

    beta = jnp.asarray(r.beta)
    np.testing.assert_allclose(-float(loss(beta, params)), r.loglik, rtol=1e-8)
    gb, gp = jax.grad(loss, argnums=(0, 1))(beta, params)
    assert float(jnp.max(jnp.abs(gb))) < 1e-3 and float(jnp.max(jnp.abs(jnp.tril(gp.chol)))) < 1e-3
    rng = np.random.default_rng(5)  # finite differences away from the optimum (where the gradient is 0)
    h = 1e-6
    b1, p1 = beta + 0.2, params._replace(chol=params.chol + 0.1 * jnp.tril(jnp.ones((2, 2))))
    gb1, gp1 = jax.grad(loss, argnums=(0, 1))(b1, p1)
    db, dc = jnp.asarray(rng.standard_normal(2)), jnp.asarray(np.tril(rng.standard_normal((2, 2))))
    shifted = lambda t: loss(b1 + t * db, p1._replace(chol=p1.chol + t * dc))  # noqa: E731
    fd = (shifted(h) - shifted(-h)) / (2 * h)
    np.testing.assert_allclose(float(jnp.vdot(gb1, db) + jnp.vdot(gp1.chol, dc)), float(fd), rtol=1e-6)
    modes = F.laplace_modes(X @ beta, y, g, params, Z, n_groups=40, family=family)
    blup = r.blups()[list(r.blups())[0]][["_cons", "x"]].to_numpy()
    np.testing.assert_allclose(np.asarray(modes), blup, rtol=1e-5, atol=1e-7)


def test_nll_factors_crossed_equals_jm_fit():
    """Crossed factors through the engine (full batch): at jm.fit's ML optimum, ½ the deviance
    of y − η is −loglik, and its gradient in η is orthogonal to the fixed-effects columns."""
    d = jm.datasets.load("penicillin")
    r = jm.fit("diameter ~ 1 + (1|plate) + (1|sample)", d, method="ml")
    p1 = jnp.asarray(pd.factorize(d["plate"], sort=True)[0])
    s1 = jnp.asarray(pd.factorize(d["sample"], sort=True)[0])
    y = jnp.asarray(d["diameter"].to_numpy(float))
    f = lambda e: F.nll_factors(e, y, (p1, s1), jnp.asarray(r.params), n_groups=(24, 6))  # noqa: E731
    eta = jnp.full(len(y), float(r.beta[0]))
    np.testing.assert_allclose(float(f(eta)), -r.loglik, rtol=1e-10)
    assert abs(float(jnp.sum(jax.grad(f)(eta)))) < 1e-6  # ∂/∂β of the constant's coefficient


def test_the_example_shows_the_mixed_likelihood_winning():
    """examples/mixed_network.py: (c), the network trained through the mixed-model likelihood,
    has the smallest held-out error of the three (the example asserts it and prints the table)."""
    import pathlib
    import re
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "examples" / "mixed_network.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    mse = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\((\w)\) .*?\s(\d+\.\d+)$", proc.stdout, re.M)}
    assert set(mse) == {"a", "b", "c"} and mse["c"] < min(mse["a"], mse["b"])
    sd = float(re.search(r"sd\(_cons\)\s+(\S+)", proc.stdout).group(1))
    assert abs(sd - 1.0) < 0.1  # the true sd of the random intercept
