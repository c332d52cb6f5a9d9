"""Parametric bootstrap (FitResult.bootstrap) and the bootstrap LR test, on the pig model."""

import numpy as np
import pytest

import jaxmixed as jm
from jaxmixed.inference.bootstrap import simulate

from conftest import cached_fit

BIG = "weight ~ week + (1|id) + (1|week)"
SMALL = "weight ~ week + (1|id)"
N = 200


@pytest.fixture(scope="module")
def pig_boot():
    fit = cached_fit("fit", BIG, "pig")
    return fit, fit.bootstrap(n=N, seed=11)


def test_percentile_intervals_cover_the_estimates(pig_boot):
    fit, b = pig_boot
    labels = list(fit.fixed.index) + ["id: sd(_cons)", "week: sd(_cons)", "sd(Residual)"]
    assert list(b.table.index) == labels
    assert b.n == N and b.n_failed == 0 and b.draws.shape == (N, len(labels))
    assert b.level == 95.0 and b.method == "reml"
    # the Wald intervals' centres (the estimates) lie inside the percentile intervals
    centres = np.concatenate([(fit.fixed.ci_lower + fit.fixed.ci_upper).to_numpy() / 2,
                              fit.random.estimate.to_numpy()])
    np.testing.assert_allclose(b.table.estimate, np.concatenate([fit.fixed.coef, fit.random.estimate]))
    assert np.all(b.table.ci_lower.to_numpy() <= centres) and np.all(centres <= b.table.ci_upper.to_numpy())
    # the bootstrap se of the fixed effects is near the model-based one
    np.testing.assert_allclose(b.table.se.to_numpy()[:2], fit.fixed.se.to_numpy(), rtol=0.3)
    assert np.all(b.draws.to_numpy()[:, 2:] >= 0)  # sds
    assert "percentile" in str(b)


def test_bootstrap_is_reproducible(pig_boot):
    fit, b = pig_boot
    again = fit.bootstrap(n=N, seed=11)
    np.testing.assert_array_equal(again.draws.to_numpy(), b.draws.to_numpy())
    np.testing.assert_array_equal(again.table.to_numpy(), b.table.to_numpy())
    other = fit.bootstrap(n=N, seed=12)
    assert not np.allclose(other.draws.to_numpy(), b.draws.to_numpy())


def test_simulated_draws_do_not_depend_on_n_or_chunking():
    fit = cached_fit("fit", BIG, "pig")
    a = simulate(fit, 70, seed=5)
    b = simulate(fit, 10, seed=5)
    assert a.shape == (fit.nobs, 70)
    np.testing.assert_array_equal(a[:, :10], b)
    # a draw has the fitted model's moments, roughly: residual sd over many draws
    X, beta = fit.design.X, fit.beta
    assert abs(np.mean(a - (X @ beta)[:, None])) < 1.0


def test_bootstrap_lrtest():
    big = cached_fit("fit", BIG, "pig")
    small = cached_fit("fit", SMALL, "pig")
    t = jm.bootstrap_lrtest(small, big, n=N, seed=4)
    ref = jm.lrtest(small, big)
    assert t.stat == pytest.approx(ref.stat) and t.df == ref.df == 1
    assert t.p_chi2 == pytest.approx(ref.p)
    assert t.n == N and t.n_valid == N and np.all(t.draws >= 0) and 0 < t.p <= 1
    # same as its definition, and the order of the arguments does not matter
    assert t.p == pytest.approx((1 + np.sum(t.draws >= t.stat - 1e-8 * (1 + t.stat))) / (1 + N))
    t2 = jm.bootstrap_lrtest(big, small, n=N, seed=4)
    assert t2.p == t.p
    with pytest.raises(jm.ModelError, match="ML and the other by REML"):
        jm.bootstrap_lrtest(small, cached_fit("fit", BIG, "pig", method="ml"), n=N)
    with pytest.raises(jm.ModelError, match="n must be"):
        big.bootstrap(n=1)
