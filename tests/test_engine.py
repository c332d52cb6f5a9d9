"""The blocked (sparse) engine against the dense one, streamed cross-products, the optimisers, and
the compilation-cache switch."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import jaxmixed as jm
from jaxmixed import runtime
from jaxmixed.engine import pls_sparse as blocked
from jaxmixed.data import pattern as patterns
from jaxmixed.engine import pls
from jaxmixed.fit import search
from jaxmixed.data import design
from jaxmixed.engine import pls as objective
from jaxmixed.fit import optimizers as optimize
from jaxmixed.results import predict
from jaxmixed.data import crossprod

MODELS = [
    ("weight ~ week + (1|id) + (1|week)", "pig"),  # crossed: one dense panel
    ("gsp ~ private + emp + hwy + water + other + unemp + (1 + hwy + unemp | region) + (1|region:state)",
     "productivity"),  # nested: one 3×3 panel per region
    ("gsp ~ private + emp + (1 + emp|year) + (1 |region:state) + (1|region)", "productivity"),  # both
]


def _design(text, data):
    if isinstance(data, str):
        data = jm.datasets.load(data)
    return design.build_design(jm.parse_formula(text), data)


def _both(des):
    return {eng: pls.from_design(des, eng)
            for eng in ("dense", "sparse")}


def _theta(des, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(des.theta0 * rng.uniform(0.3, 1.5, des.n_theta) + np.where(des.theta_lower == 0, 0, 0.2))


@pytest.mark.parametrize("text,data", [MODELS[0], MODELS[2]])
def test_sparse_engine_matches_dense(text, data):
    des = _design(text, data)
    both = _both(des)
    assert both["sparse"][1].layout is not None and both["dense"][1].layout is None
    th = _theta(des)
    out = {}
    for eng, (st, struct) in both.items():
        dev = objective.deviance(th, st, struct, True)
        g = jax.grad(objective.deviance)(th, st, struct, False)
        H = jax.hessian(objective.deviance)(th, st, struct, True) if data == "pig" else jnp.zeros(())
        sol = objective.solve(th, st, struct, True)
        cv = objective.conditional_variances(th, 1.7, st, struct)
        out[eng] = (dev, g, H, sol, cv)
    (d0, g0, H0, s0, c0), (d1, g1, H1, s1, c1) = out["dense"], out["sparse"]
    np.testing.assert_allclose(d1, d0, rtol=1e-11)
    np.testing.assert_allclose(g1, g0, rtol=1e-7, atol=1e-8 * (1 + np.abs(g0).max()))
    np.testing.assert_allclose(H1, H0, rtol=1e-7, atol=1e-8 * (1 + np.abs(H0).max()))
    for a, b in zip(s0, s1):
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_allclose(y, x, rtol=1e-8, atol=1e-10)
    for x, y in zip(c0, c1):
        np.testing.assert_allclose(y, x, rtol=1e-8, atol=1e-12)


def test_sparse_gradient_matches_finite_differences():
    des = _design(MODELS[1][0], MODELS[1][1])  # nested, 3 × 3 unstructured blocks
    st, struct = _both(des)["sparse"]
    th = np.asarray(_theta(des, 3))
    g = np.asarray(jax.grad(objective.deviance)(jnp.asarray(th), st, struct, True))
    f = lambda t: float(objective.deviance(jnp.asarray(t), st, struct, True))  # noqa: E731
    h = 1e-4
    fd = np.array([(f(th + h * e) - f(th - h * e)) / (2 * h) for e in np.eye(len(th))])
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-5 * (1 + np.abs(fd).max()))


@pytest.mark.parametrize("text,data", [MODELS[0]])
def test_fit_with_sparse_engine_forced(text, data):
    d = jm.datasets.load(data)
    dense = jm.fit(text, d)
    sparse = jm.fit(text, d, engine="sparse")
    assert sparse.engine.shape.layout is not None
    assert abs(sparse.loglik - dense.loglik) <= 1e-9 * abs(dense.loglik)
    np.testing.assert_allclose(sparse.beta, dense.beta, rtol=1e-6)
    np.testing.assert_allclose(sparse.random.estimate, dense.random.estimate, rtol=1e-5)
    np.testing.assert_allclose(sparse.fixed.se, dense.fixed.se, rtol=1e-6)
    se = sparse.predict("reses")
    np.testing.assert_allclose(se.to_numpy(), dense.predict("reses").to_numpy(), rtol=1e-6)


@pytest.mark.parametrize("engine", ["dense", "sparse"])
def test_streamed_cross_products_equal_one_shot(engine):
    des = _design(MODELS[2][0], MODELS[2][1])
    pat = patterns.build_pattern(des)
    shape = pls.shape_of(des, pat, engine)
    a = pls.arrange(crossprod.cross_products(des, pat, batch_rows=10**9), shape, pat)
    b = pls.arrange(crossprod.cross_products(des, pat, batch_rows=37), shape, pat)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-12, atol=1e-9)


def _crossed(n=3000, seed=0):
    """A small InstEval-like design: students × lecturers crossed, lecturers in departments."""
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 400, n)
    dd = rng.integers(0, 120, n)
    dept = dd % 7
    y = rng.normal(size=n) + 0.5 * rng.normal(size=400)[s] + 0.3 * rng.normal(size=120)[dd] + 0.2 * rng.normal(size=7)[dept]
    return pd.DataFrame({"y": y, "x": rng.normal(size=n), "s": s, "d": dd, "dept": dept})


def test_auto_engine_picks_sparse_for_large_crossed_and_matches_dense():
    data = _crossed()
    des = _design("y ~ x + (1|s) + (1|d) + (1|dept)", data)
    assert patterns.choose_engine(des, patterns.build_pattern(des)) == "sparse"
    lay = pls.from_design(des)[1].layout
    assert lay.max_panel == 127  # lecturers and departments: one dense panel
    both = _both(des)
    th = _theta(des, 1)
    d0 = objective.deviance(th, *both["dense"], False)
    d1 = objective.deviance(th, *both["sparse"], False)
    np.testing.assert_allclose(d1, d0, rtol=1e-11)


def test_large_panel_inverse_gradient_and_hessian_match_dense():
    """A dense panel of 340 columns (above blocked.INV_BASE, so S⁻¹ comes from the block
    recursions ``_tri_inv``/``_gram_lower``): gradient and η-Hessian equal the dense engine's."""

    rng = np.random.default_rng(5)
    n = 6000
    s, dd = rng.integers(0, 500, n), rng.integers(0, 333, n)
    dept = dd % 7
    y = rng.normal(size=n) + 0.5 * rng.normal(size=500)[s] + 0.3 * rng.normal(size=333)[dd] + 0.2 * rng.normal(size=7)[dept]
    des = _design("y ~ 1 + (1|s) + (1|d) + (1|dept)", pd.DataFrame({"y": y, "s": s, "d": dd, "dept": dept}))
    both = _both(des)
    assert both["sparse"][1].layout.max_panel == 340 > 2 * blocked.INV_BASE
    th = jnp.asarray([0.6, 0.4, 0.3])
    g0 = jax.grad(objective.deviance)(th, *both["dense"], False)
    g1 = jax.grad(objective.deviance)(th, *both["sparse"], False)
    np.testing.assert_allclose(g1, g0, rtol=1e-9)
    eta = jnp.asarray([-0.6, -1.0, -1.3, 0.05])
    H0 = pls.hessian_eta(eta, *both["dense"], False)
    H1 = pls.hessian_eta(eta, *both["sparse"], False)
    np.testing.assert_allclose(H1, H0, rtol=1e-8, atol=1e-8 * float(jnp.max(jnp.abs(H0))))


def test_nested_panels_are_block_diagonal():
    rng = np.random.default_rng(2)
    school = np.repeat(np.arange(60), 40)
    klass = school * 4 + rng.integers(0, 4, len(school))
    y = rng.normal(size=len(school)) + rng.normal(size=60)[school] + rng.normal(size=240)[klass]
    data = pd.DataFrame({"y": y, "school": school, "klass": klass})
    des = _design("y ~ 1 + (1|school) + (1|school:klass)", data)
    struct = pls.from_design(des, "sparse")[1]
    assert struct.layout.buckets == (patterns.Bucket(n=60, P=1, slot0=0, flat0=0),)
    both = _both(des)
    th = _theta(des)
    np.testing.assert_allclose(objective.deviance(th, *both["sparse"], True),
                               objective.deviance(th, *both["dense"], True), rtol=1e-11)


def test_quasi_newton_reaches_the_newton_optimum():
    """Projected BFGS (the optimiser of large models) reaches projected Newton's optimum."""
    rng = np.random.default_rng(0)
    data = pd.DataFrame({"y": rng.normal(size=400), "g": np.repeat(np.arange(40), 10), "h": np.tile(np.arange(10), 40)})
    des = _design("y ~ 1 + (1|g) + (1|h)", data)
    st, struct = _both(des)["sparse"]
    lower = jnp.asarray(des.theta_lower)
    a = optimize.minimize_quasi_newton(objective.deviance, jnp.asarray(des.theta0), lower, (st, struct, True))
    b = optimize.minimize_bounded(objective.deviance, jnp.asarray(des.theta0), lower, (st, struct, True))
    assert bool(a.converged)
    np.testing.assert_allclose(a.fun, b.fun, rtol=1e-10)
    np.testing.assert_allclose(a.x, b.x, atol=1e-3)


def test_moment_start_is_near_the_optimum_for_random_intercepts():
    data = _crossed(n=20000, seed=3)  # simulated with sd 0.5 (s), 0.3 (d), 0.2 (dept), residual 1
    des = _design("y ~ x + (1|s) + (1|d) + (1|dept)", data)
    pat = patterns.build_pattern(des)
    st, struct = pls.from_design(des, pattern=pat)
    th0 = search.moment_start(des, crossprod.cross_products(des, pat))
    np.testing.assert_allclose(th0[:2], [0.5, 0.3], rtol=0.3)


def test_compilation_cache_switch(tmp_path):
    before = runtime.compilation_cache_dir()
    try:
        path = runtime.enable_compilation_cache(str(tmp_path / "jax"))
        assert runtime.compilation_cache_dir() == path
        f = jax.jit(lambda x: jnp.sin(x) * 3.0 + jnp.cos(x) ** 2)
        f(jnp.arange(7.0)).block_until_ready()
        assert any(os.scandir(path)), "no program written to the cache"
        runtime.disable_compilation_cache()
        assert runtime.compilation_cache_dir() is None
    finally:
        if before:
            runtime.enable_compilation_cache(before)
        else:
            runtime.disable_compilation_cache()


def test_cache_is_on_by_default_and_off_with_the_environment_variable():
    import subprocess
    import sys

    code = "import jaxmixed.runtime as r, jaxmixed; print(r.compilation_cache_dir())"
    env = {k: v for k, v in os.environ.items() if k != "JAXMIXED_NO_CACHE"}
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert on.stdout.strip().endswith(os.path.join("jaxmixed", "jax")) or "JAXMIXED_CACHE_DIR" in env
    off = subprocess.run([sys.executable, "-c", code], env={**env, "JAXMIXED_NO_CACHE": "1"},
                         capture_output=True, text=True, check=True)
    assert off.stdout.strip() == "None"


def test_connected_components_match_scipy():
    """The numpy connected components behind the blocked engine's panels (random graphs and
    shuffled chains, the slowest case for label propagation) equal scipy.sparse.csgraph's."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 300))
        if trial % 3 == 0:
            perm = rng.permutation(n)
            r, c = perm[:-1], perm[1:]
        else:
            m = int(rng.integers(0, 3 * n))
            r, c = rng.integers(0, n, m), rng.integers(0, n, m)
        label = patterns.connected_components(n, r, c)
        _, ref = connected_components(coo_matrix((np.ones(len(r)), (r, c)), shape=(n, n)), directed=False)
        # scipy numbers components by their smallest node, in order; ours labels them by it
        np.testing.assert_array_equal(np.unique(label, return_inverse=True)[1].ravel(), ref)


@pytest.mark.parametrize("text, reml", [("weight ~ week + (1 + week | id)", True),
                                        ("weight ~ week + (1|id) + (1|week)", False),
                                        ("weight ~ week + (1 + week || id)", False)])
def test_eta_hessian_with_k_columns_equals_the_full_autodiff_hessian(text, reml):
    """inference.hessian_eta (k θ columns, ln σ by the chain rule) equals forward-over-reverse
    in all k + 1 η directions, at the estimate and away from it."""
    from jaxmixed.engine import numerics

    r = jm.fit(text, jm.datasets.load("pig"), method="reml" if reml else "ml")
    eta0 = r.engine.eta(r.params, r.sigma)
    full = jax.jit(lambda e: numerics.hessian(pls.loglik_eta)(e, r.data, r.engine.shape, reml))
    for eta in (eta0, eta0 + 0.1 * np.random.default_rng(0).normal(size=eta0.shape)):
        H = pls.hessian_eta(jnp.asarray(eta), r.data, r.engine.shape, reml)
        H0 = full(jnp.asarray(eta))
        np.testing.assert_allclose(H, H0, rtol=1e-9, atol=1e-10 * float(jnp.max(jnp.abs(H0))))


@pytest.mark.parametrize("text, data, reml", [("weight ~ week + (1 + week | id)", "pig", True),
                                              ("weight ~ week + (1|id) + (1|week)", "pig", False),
                                              ("weight ~ week + (1 + week || id)", "pig", False),
                                              ("math5 ~ math3 + (1 | school) + (1 | school:class)", "jsp", True)])
def test_eta_hessian_from_the_optimisers_hessian_equals_autodiff(text, data, reml):
    """A Newton fit's η-Hessian comes from the optimiser's gradient and Hessian of the profiled
    deviance (PLSEngine.hessian_eta_from: ∇r² by the envelope theorem, the chain rule to η);
    it equals inference.hessian_eta (autodiff through the factorisation) to rounding, and the
    fit's standard errors are the ones that Hessian gives."""
    from jaxmixed.inference import tables

    r = jm.fit(text, jm.datasets.load(data), method="reml" if reml else "ml")
    assert r.converged and not r.singular
    eng, theta = r.engine, jnp.asarray(r.params)
    eta = eng.eta(r.params, r.sigma)
    H0 = np.asarray(pls.hessian_eta(jnp.asarray(eta), r.data, eng.shape, reml))

    def refuse(*a):
        raise AssertionError("fell back to the η-Hessian program")

    dev = jax.jit(lambda t: pls.deviance(t, r.data, eng.shape, reml))
    g, H = np.asarray(jax.grad(dev)(theta)), np.asarray(jax.hessian(dev)(theta))
    program = eng.hessian_eta_from(r.params, g, H, eng.solve(r.params, r.data, reml), fallback=refuse)
    np.testing.assert_allclose(np.asarray(program(eta, r.data, reml)), H0, rtol=1e-7,
                               atol=1e-9 * np.max(np.abs(H0)))
    vc = tables.variance_components(eng, r.data, r.design, r.params, r.sigma, reml, False, 95)
    np.testing.assert_allclose(r.random.se.to_numpy(), vc.table.se.to_numpy(), rtol=1e-7)


def test_eta_hessian_from_the_optimiser_falls_back_where_it_does_not_apply():
    """No Hessian from the optimiser (projected BFGS) or an ill-conditioned Λ: the η-Hessian
    program differentiates the log likelihood itself."""
    r = jm.fit("weight ~ week + (1 + week | id)", jm.datasets.load("pig"))
    eng = r.engine
    sol = eng.solve(r.params, r.data, True)
    calls = []

    def fallback(*a):
        calls.append(a)
        return "fallback"

    assert eng.hessian_eta_from(r.params, np.zeros(3), None, sol, fallback=fallback) is fallback
    tiny = np.asarray(r.params) * np.array([1.0, 1e-9, 1e-9])  # Λ with condition number ~1e9
    program = eng.hessian_eta_from(tiny, np.zeros(3), np.eye(3), sol, fallback=fallback)
    assert program(eng.eta(r.params, r.sigma), r.data, True) == "fallback" and len(calls) == 1


def test_fit_runs_openblas_at_one_thread_and_restores_the_callers_setting():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    paths = {i["filepath"] for i in runtime.blas_libraries()}
    if not paths or runtime.fit_threads() != 1:
        pytest.skip("threadpoolctl finds no BLAS here, or JAXMIXED_BLAS_THREADS set")

    def threads():
        return {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info() if i["filepath"] in paths}

    with threadpoolctl.threadpool_limits(2):
        before = threads()
        with runtime.fit_blas_threads():
            inside = threads()
            with runtime.fit_blas_threads():  # nested: still one thread, restored only at the end
                pass
            assert threads() == inside
        assert set(inside.values()) == {1} and threads() == before
        r = jm.fit("weight ~ week + (1|id)", jm.datasets.load("pig"))
        assert threads() == before and r.converged


def test_jacobi_eigh_equals_lapack_and_runs_under_vmap():
    """kernels.eigh_xla (the batched optimiser's LAPACK-free eigen-decomposition) against
    numpy's LAPACK: eigenvalues ascending, orthonormal eigenvectors reconstructing A, for random,
    diagonal, zero, nearly multiple and rank-one matrices; NaN in, NaN out, lane by lane."""
    from jaxmixed.engine.kernels import eigh_xla

    rng = np.random.default_rng(0)
    f = jax.jit(eigh_xla)
    for n in (1, 2, 3, 5, 9):
        B = rng.normal(size=(n, n))
        for A in (B + B.T, np.diag(rng.normal(size=n)), np.zeros((n, n)), 3 * np.eye(n) + 1e-20 * (B + B.T),
                  np.outer(B[0], B[0]), 1e8 * (B + B.T) + 1e16 * np.eye(n)[0][:, None] * np.eye(n)[0]):
            w, V = (np.asarray(v) for v in f(jnp.asarray(A)))
            scale = max(1.0, np.abs(A).max())
            np.testing.assert_allclose(w, np.linalg.eigvalsh(A), atol=1e-13 * scale, rtol=0)
            np.testing.assert_allclose(V @ np.diag(w) @ V.T, A, atol=1e-13 * scale, rtol=0)
            np.testing.assert_allclose(V.T @ V, np.eye(n), atol=1e-13)
    A = rng.normal(size=(6, 4, 4))
    A = A + A.transpose(0, 2, 1)
    A[2, 1, 3] = A[2, 3, 1] = np.nan
    w, _ = jax.jit(jax.vmap(eigh_xla))(jnp.asarray(A))
    w = np.asarray(w)
    assert np.isnan(w[2]).all()
    np.testing.assert_allclose(np.delete(w, 2, axis=0), np.linalg.eigvalsh(np.delete(A, 2, axis=0)), atol=1e-12)
