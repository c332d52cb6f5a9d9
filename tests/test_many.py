"""fit_many: one design, many responses, against jm.fit one response at a time.

Every test here reuses one compiled batch shape (32 lanes of the JSP model) so that the module
compiles its programs once.
"""

import warnings

import numpy as np
import pandas as pd
import pytest

import jaxmixed as jm
from jaxmixed.inference.bootstrap import simulate

from conftest import cached_fit

FORMULA = "math5 ~ math3c + (1 + math3c || school)"
K = 40  # responses simulated; tests use the first 20 (one 32-lane chunk) or all 40 in chunks of 32


@pytest.fixture(scope="module")
def jsp_many():
    fit = cached_fit("fit", FORMULA, "jsp")
    d = jm.datasets.load("jsp")
    d["math3c"] = d.math3 - d.math3.mean()
    Y = simulate(fit, K, seed=3)  # rows follow fit.design.rows: all 887 rows here
    assert Y.shape == (len(d), K)
    names = [f"v{j}" for j in range(K)]
    d = pd.concat([d, pd.DataFrame(Y, columns=names, index=d.index)], axis=1)
    res = jm.fit_many(FORMULA, d, responses=names[:20])
    return d, names, res


def _one(d, name, **kw):
    dd = d.copy()
    dd["math5"] = dd[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jm.JaxmixedWarning)
        return jm.fit(FORMULA, dd, **kw)


def _assert_same(res, name, r, rtol=1e-6):
    s = res.summary.loc[name]
    assert s.converged == r.converged and s.singular == r.singular
    np.testing.assert_allclose(s.loglik, r.loglik, rtol=1e-9)
    fx = res.fixed[res.fixed.response == name].set_index("term")
    np.testing.assert_allclose(fx[["coef", "se", "ci_lower", "ci_upper"]].to_numpy(),
                               r.fixed[["coef", "se", "ci_lower", "ci_upper"]].to_numpy(), rtol=rtol)
    rd = res.random[res.random.response == name]
    assert list(rd.name) == list(r.random.name) and list(rd.group) == list(r.random.group)
    np.testing.assert_allclose(rd[["estimate", "se", "ci_lower", "ci_upper"]].to_numpy(),
                               r.random[["estimate", "se", "ci_lower", "ci_upper"]].to_numpy(), rtol=rtol)


def test_fit_many_matches_fit_one_at_a_time(jsp_many):
    d, names, res = jsp_many
    assert len(res) == 20 and res.nobs == 887 and res.n_dropped == 0 and res.method == "reml"
    assert list(res.summary.index) == names[:20]
    assert res.summary.converged.all()
    for name in names[:20]:
        _assert_same(res, name, _one(d, name))
    np.testing.assert_allclose(res.beta[0], res.fixed.coef.to_numpy()[:2])


def test_tidy_and_wide_tables(jsp_many):
    _, names, res = jsp_many
    assert list(res.fixed.columns) == ["response", "term", "coef", "se", "z", "p", "ci_lower", "ci_upper"]
    assert list(res.random.columns) == ["response", "group", "name", "estimate", "se", "ci_lower", "ci_upper"]
    assert len(res.fixed) == 20 * 2 and len(res.random) == 20 * 3
    w = res.wide()
    assert list(w.index) == names[:20]
    assert {"coef[math3c]", "se[_cons]", "school: sd(math3c)", "school: sd(_cons)", "sd(Residual)"} <= set(w.columns)
    np.testing.assert_allclose(w["sd(Residual)"], res.sigma)
    assert "20 responses" in str(res)


def test_array_responses_equal_column_responses(jsp_many):
    d, names, res = jsp_many
    arr = jm.fit_many(FORMULA, d, responses=d[names[:20]].to_numpy())
    assert list(arr.summary.index) == [f"y{j}" for j in range(20)]
    np.testing.assert_allclose(arr.loglik, res.loglik, rtol=1e-12)
    np.testing.assert_allclose(arr.beta, res.beta, rtol=1e-10)


def test_missing_values_chunks_and_progress(jsp_many, capsys):
    """Rows missing in any response or covariate are dropped for all responses (counted); 40
    responses in chunks of 32 (the second padded, warm-started) match jm.fit on the same rows."""
    d, names, _ = jsp_many
    d = d.copy()
    d.loc[d.index[10], names[3]] = np.nan
    d.loc[d.index[20], "math3c"] = np.nan
    d.loc[d.index[30], names[0]] = np.nan
    res = jm.fit_many(FORMULA, d, responses=names, chunk_size=32, progress=True)
    err = capsys.readouterr().err
    assert "fit_many" in err and f"{K}/{K}" in err
    assert res.n_dropped == 3 and res.nobs == 887 - 3
    assert any("3 observation(s) dropped" in n for n in res.notes)
    kept = d.drop(index=d.index[[10, 20, 30]])
    for name in (names[0], names[3], names[33], names[39]):
        _assert_same(res, name, _one(kept, name))


def test_bad_input(jsp_many):
    d, names, _ = jsp_many
    with pytest.raises(jm.DataError, match="not in the data"):
        jm.fit_many(FORMULA, d, responses=["v0", "nope"])
    with pytest.raises(jm.DataError, match="rows"):
        jm.fit_many(FORMULA, d, responses=np.zeros((10, 2)))
    with pytest.raises(jm.ModelError, match="chunk_size"):
        jm.fit_many(FORMULA, d, responses=names[:2], chunk_size=0)
    d2 = d.assign(flat=1.0)
    with pytest.raises(jm.DataError, match="constant"):
        jm.fit_many(FORMULA, d2, responses=["v0", "flat"])
    with pytest.raises(jm.ModelError, match="method"):
        jm.fit_many(FORMULA, d, responses=names[:2], method="bayes")


def test_vc_values_overflowing_bound_is_nan_like_the_fit_table():
    """A huge se on the ln-sd scale: the upper bound overflows; the component table (one rule
    for fit_many's table and FitResult.random) says NaN, never inf; the rest are the delta
    method's values."""
    from jaxmixed.inference.tables import ComponentRow, component_values

    layout = [ComponentRow("g", "sd(_cons)", "sd", (0,), 0), ComponentRow("", "sd(Residual)", "sd", (1,), -1)]
    eta, cov = np.array([[0.1, 0.0]]), np.array([[[1e6, 0.0], [0.0, 0.01]]])
    est, se, lo, hi = component_values(eta, layout, cov)
    assert np.isnan(hi[0, 0])
    np.testing.assert_allclose([est[0, 0], lo[0, 0], se[0, 0]],
                               [np.exp(0.1), np.exp(0.1 - 1.96 * 1e3), np.exp(0.1) * 1e3], rtol=1e-12)
    np.testing.assert_allclose([lo[0, 1], hi[0, 1], se[0, 1]], [np.exp(-0.196), np.exp(0.196), 0.1], rtol=1e-12)


def test_concurrent_chunks_give_the_same_answer_and_the_program_calls_no_lapack(jsp_many):
    """40 responses in chunks of 8 (32 lanes' program not reused: 8 lanes), fitted one chunk at
    a time and three at once: identical arrays (each chunk depends on its responses and the
    first chunk's warm start only). The batch program of this design calls no LAPACK (the
    optimiser's eigen-decomposition is Jacobi's in XLA ops), which is what lets chunks run at
    once."""
    from jaxmixed.engine import pls
    from jaxmixed.fit import batched

    d, names, _ = jsp_many
    one = jm.fit_many(FORMULA, d, responses=names, chunk_size=8, workers=1)
    three = jm.fit_many(FORMULA, d, responses=names, chunk_size=8, workers=3)
    for attr in ("loglik", "beta", "sigma"):
        np.testing.assert_array_equal(getattr(one, attr), getattr(three, attr))
    pd.testing.assert_frame_equal(one.random, three.random)
    fit = cached_fit("fit", FORMULA, "jsp")
    shape = pls.from_design(fit.design, "auto")[1]
    program = batched._batch_program(shape, batched.MAX_ITER, True, "cpu")
    assert program._compiled and not program.uses_lapack
    with pytest.raises(jm.ModelError, match="workers"):
        jm.fit_many(FORMULA, d, responses=names[:2], workers=0)
