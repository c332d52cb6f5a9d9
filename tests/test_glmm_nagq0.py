"""lme4's nAGQ = 0 (``jm.fit(..., nagq=0)``): θ optimised with the fixed effects inside PIRLS.
Reference: lme4 1.1-31 with PIRLS converged tightly (tests/reference/make_glmm_nagq0.R); the
implicit derivative through β̂(θ) against finite differences."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import jaxmixed as jm
from jaxmixed.engine import laplace

REF = json.load(open(os.path.join(os.path.dirname(__file__), "reference", "glmm_nagq0.json")))
DATA = {"cbpp": "cbpp", "verbagg": "verbagg", "contraception_ri": "contraception",
        "contraception_slope": "contraception"}
_fits: dict = {}


def _data(case):
    d = jm.datasets.load(DATA[case])
    if "urban" in d:
        d["urbanY"] = (d["urban"] == "Y").astype(float)
    return d


def fitted(case):
    if case not in _fits:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", jm.JaxmixedWarning)
            _fits[case] = jm.fit(REF[case]["formula"], _data(case), family="binomial", nagq=0)
    return _fits[case]


def _lme4_order(values):
    """lme4 lists the intercept first, jaxmixed last (as Stata)."""
    v = np.asarray(values, dtype=float)
    return np.r_[v[1:], v[:1]]


@pytest.mark.parametrize("case", list(DATA))
def test_nagq0_matches_lme4(case):
    r, ref = fitted(case), REF[case]
    assert r.converged and r.nagq == 0 and r.method == "laplace"
    assert r.loglik == pytest.approx(ref["logLik"], abs=1e-6)
    assert r.loglik >= ref["default"]["logLik"] - 1e-9  # lme4's default tolerance stops short
    assert len(r.fixed) == len(ref["beta"])
    np.testing.assert_allclose(r.fixed["coef"], _lme4_order(ref["beta"]), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(r.fixed["se"], _lme4_order(ref["se"]), rtol=1e-5)
    # the variance components: lme4's VarCorr rows (sd, then corr) against jaxmixed's table
    sd = dict(zip(ref["sdcor_names"] if isinstance(ref["sdcor_names"], list) else [ref["sdcor_names"]],
                  np.atleast_1d(ref["sdcor"])))
    ours = {}
    for _, row in r.random.iterrows():
        name = row["name"].replace("_cons", "(Intercept)")
        key = (f"{row['group']} {name[3:-1]} NA" if name.startswith("sd(") else
               f"{row['group']} {name[5:-1].split(',')[1]} {name[5:-1].split(',')[0]}")
        ours[key] = row["estimate"]
    assert set(ours) == set(sd)
    for k, v in sd.items():
        assert ours[k] == pytest.approx(v, rel=2e-6, abs=1e-7), k
    assert "nAGQ = 0" in str(r)


def test_nagq0_gradient_is_exact():
    """The objective's gradient in (θ) through β̂(θ) by the implicit function theorem, against
    central differences, away from the optimum (a correlated random slope)."""
    r = fitted("contraception_slope")
    shape = r.engine.shape
    p = shape.p
    beta0 = jnp.asarray(r.params[:p])
    f = jax.jit(lambda y: laplace.nagq0_deviance(y, r.data, shape, beta0))
    g = jax.jit(jax.grad(lambda y: laplace.nagq0_deviance(y, r.data, shape, beta0)))
    y = jnp.asarray(r.params[p:]) + jnp.array([0.05, -0.04, 0.03])
    h = 1e-5
    fd = np.array([(float(f(y + h * e)) - float(f(y - h * e))) / (2 * h) for e in np.eye(y.size)])
    np.testing.assert_allclose(np.asarray(g(y)), fd, rtol=1e-6, atol=1e-6)
    # at the estimates the objective is stationary in θ, and β̂ is the joint PIRLS solution
    assert np.max(np.abs(np.asarray(g(jnp.asarray(r.params[p:]))))) < 1e-3
    u, b, ok = jax.jit(laplace.pirls_joint, static_argnames=("shape",))(
        jnp.asarray(r.params), r.data, shape, jnp.zeros(shape.n_u), jnp.zeros(p))
    assert bool(ok)
    np.testing.assert_allclose(np.asarray(b), r.params[:p], rtol=1e-8, atol=1e-10)


def test_nagq0_is_not_the_laplace_optimum_but_close():
    r0, r1 = fitted("cbpp"), jm.fit(REF["cbpp"]["formula"], _data("cbpp"), family="binomial")
    assert r1.loglik > r0.loglik  # Laplace maximises over β too
    assert r1.loglik - r0.loglik < 0.05
    # the nAGQ = 0 value is the Laplace log likelihood at its own estimates
    lap = replace(r0.engine.shape, nagq=1)
    assert -0.5 * float(laplace.deviance(jnp.asarray(r0.params), r0.data, lap)) == pytest.approx(r0.loglik, abs=1e-9)


def test_nagq0_in_fit_many_and_errors():
    rng = np.random.default_rng(4)
    g = np.repeat(np.arange(30), 12)
    x = rng.normal(size=g.size)
    eta = -0.2 + 0.6 * x + rng.normal(scale=0.8, size=30)[g]
    d = pd.DataFrame({"x": x, "g": g})
    for k in range(3):
        d[f"y{k}"] = (rng.uniform(size=g.size) < 1 / (1 + np.exp(-eta - 0.3 * k))).astype(float)
    many = jm.fit_many("y0 ~ x + (1 | g)", d, ["y0", "y1", "y2"], family="binomial", nagq=0)
    for k in range(3):
        one = jm.fit(f"y{k} ~ x + (1 | g)", d, family="binomial", nagq=0)
        assert many.loglik[k] == pytest.approx(one.loglik, abs=1e-7)
        fx = many.fixed[many.fixed.response == f"y{k}"].set_index("term")
        np.testing.assert_allclose(fx.se[one.fixed.index], one.fixed.se, rtol=1e-5)
    with pytest.raises(jm.ModelError, match="nagq must be a whole number ≥ 0"):
        jm.fit("y0 ~ x + (1 | g)", d, family="binomial", nagq=-1)
