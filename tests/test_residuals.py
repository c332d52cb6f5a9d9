"""Correlated and heteroskedastic residuals (per-panel engine) against nlme, and the engines
against each other."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import jaxmixed as jm
from conftest import REF
from jaxmixed.data import design
from jaxmixed.engine import gls_panels as panel
from jaxmixed.engine import pls

from jaxmixed.model.residuals import ResidualStructure
from test_reference import agree

NLME = json.loads((REF / "lme4_reference.json").read_text())["nlme"]
PIG_SLOPES = "weight ~ week + (1 + week | id)"
_FITS = {}


def fit(method, residuals, formula=PIG_SLOPES):
    key = (formula, method, residuals)
    if key not in _FITS:
        _FITS[key] = jm.fit(formula, jm.datasets.load("pig"), method, residuals=residuals)
    return _FITS[key]


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_heteroskedastic_by_week_matches_nlme_varident(method):
    ref = NLME[f"pig_hetero_{method}"]
    r = fit(method, jm.independent(by="week"))
    assert r.converged and not r.singular
    assert agree(r.loglik, ref["logLik"], 6)
    for name, key in (("week", "week"), ("_cons", "(Intercept)")):
        assert agree(r.fixed.loc[name, "coef"], ref["fixef"][key], 4)
        assert agree(r.fixed.loc[name, "se"], ref["fixef_se"][key], 4)
    est = r.random.set_index("name").estimate
    assert agree(est["sd(week)"], ref["random_sd"]["week"], 4)
    assert agree(est["sd(_cons)"], ref["random_sd"]["(Intercept)"], 4)
    assert agree(est["corr(week,_cons)"], ref["random_corr"], 3)
    sigma = ref["sigma"]
    for week, ratio in ref["varIdent_ratios"].items():
        assert agree(est[f"week={week}: sd(e)"], sigma * ratio, 4), week
    assert r.random.se.notna().all()


def test_ar1_stata_syntax_same_fit():
    r1 = fit("ml", jm.ar(1, time="week"))
    r2 = jm.xtmixed("weight week || id: week, cov(unstructured) residuals(ar 1, t(week)) mle", jm.datasets.load("pig"))
    assert r2.loglik == pytest.approx(r1.loglik, abs=1e-6)
    assert "Residual: AR(1)" in str(r2) and "rho" in str(r2)


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_ar1_at_least_as_good_as_nlme(method):
    """nlme stops short on this boundary fit (corr → 1); jaxmixed reaches at least its best."""
    ref = NLME[f"pig_ar1_{method}"]
    r = fit(method, jm.ar(1, time="week"))
    best = max(ref["logLik"], ref["diagnostic_tighter_fit"]["logLik"])
    assert r.loglik >= best - 1e-6
    assert r.loglik - best < 0.01
    assert r.singular  # corr(week,_cons) = 1
    assert r.random.se.isna().all()


def test_exponential_equals_ar1_on_integer_times():
    a = fit("reml", jm.ar(1, time="week"), "weight ~ week + (1 | id)")
    b = fit("reml", jm.exponential(time="week"), "weight ~ week + (1 | id)")
    assert b.loglik == pytest.approx(a.loglik, abs=1e-6)
    rho_a = a.random.set_index("name").estimate["rho"]
    rho_b = b.random.set_index("name").estimate["rho"]
    assert rho_b == pytest.approx(rho_a, rel=1e-4)


def test_banded_full_width_equals_unstructured():
    d = jm.datasets.load("pig")
    d = d[d.week <= 4]
    a = jm.fit("weight ~ week + (1 | id)", d, residuals=jm.unstructured(time="week"))
    b = jm.fit("weight ~ week + (1 | id)", d, residuals=jm.banded(3, time="week"))
    assert b.loglik == pytest.approx(a.loglik, abs=1e-5)


def test_panel_engine_equals_cross_product_engine_for_iid_errors():
    d = jm.datasets.load("productivity")
    spec = jm.parse_formula("gsp ~ private + emp + unemp + (1 + unemp | region) + (1 | region:state)")
    des = design.build_design(spec, d)
    st, struct = pls.from_design(des)
    buckets, ps, _ = panel.build_panels(des, d, ResidualStructure("independent"))
    theta = np.array([1.3, -0.2, 0.4, 2.1])
    sigma = 0.04
    x = np.concatenate([theta * sigma, [np.log(sigma)]])
    from jaxmixed.engine.pls import deviance_at_sigma
    for reml in (True, False):
        a = float(deviance_at_sigma(jnp.asarray(theta), np.log(sigma), st, struct, reml))
        b = float(panel.deviance(jnp.asarray(x), buckets, float(des.nobs), ps, reml))
        assert b == pytest.approx(a, rel=1e-9, abs=1e-7)


NLME_AR1 = json.loads((REF / "nlme_ar1.json").read_text())


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_ar1_interior_model_matches_nlme(method):
    """(1 + week || id) with AR(1) errors: an interior optimum, where nlme converges
    (scripts/reference/nlme_ar1_check.R)."""
    ref = NLME_AR1[f"pig_ar1_diag_{method}"]["nlme_default"]
    r = fit(method, jm.ar(1, time="week"), "weight ~ week + (1 + week || id)")
    assert r.converged and not r.singular
    assert agree(r.loglik, ref["logLik"], 6)
    for name, key in (("week", "week"), ("_cons", "(Intercept)")):
        assert agree(r.fixed.loc[name, "coef"], ref["fixef"][key], 4)
        assert agree(r.fixed.loc[name, "se"], ref["fixef_se"][key], 4)
    est = r.random.set_index("name")
    assert agree(est.estimate["sd(week)"], ref["random_sd"]["week"], 4)
    assert agree(est.estimate["sd(_cons)"], ref["random_sd"]["(Intercept)"], 4)
    assert agree(est.estimate["sd(e)"], ref["sigma"], 4)
    assert agree(est.estimate["rho"], ref["phi"], 4)
    assert est.se.notna().all()


@pytest.mark.parametrize("residuals, formula", [
    (jm.ar(1, time="week"), "weight ~ week + (1 + week || id)"),
    (jm.independent(by="week"), PIG_SLOPES)])
def test_variance_component_ses_from_the_optimisers_hessian(residuals, formula):
    """The per-panel fit takes Cov(η) from the optimiser's Hessian in x by the chain rule
    (gls_panels.hessian_eta_from_x); it equals the η-Hessian differentiated through the panels
    (gls_panels.hessian_eta) to rounding."""
    from jaxmixed.inference import tables

    r = fit("reml", residuals, formula)
    assert r.converged and not r.singular
    e = r.engine
    eta = e.eta(r.params, r.sigma, r.design.theta_scale)
    H_direct = np.asarray(e.hessian_eta(eta, r.data, True))
    vc = tables.variance_components(e, r.data, r.design, r.params, r.sigma, True, False, 95)
    np.testing.assert_allclose(vc.cov_eta, np.linalg.inv(-H_direct), rtol=1e-7, atol=0)
    direct = vc.table.set_index("name").se
    used = r.random.set_index("name").se
    assert used.notna().all()
    np.testing.assert_allclose(used.to_numpy(), direct.to_numpy(), rtol=1e-7)
    assert e.hessian_eta_from(np.zeros(len(r.params)), None) == e.hessian_eta  # no Hessian: differentiate itself


def test_blups_and_wcorrelation_with_ar1():
    r = fit("ml", jm.ar(1, time="week"), "weight ~ week + (1 + week || id)")
    est = r.random.set_index("name").estimate
    s2u, s2w, s2e, rho = est["sd(_cons)"] ** 2, est["sd(week)"] ** 2, est["sd(e)"] ** 2, est["rho"]

    def cov(t1, t2):  # marginal covariance of weeks t1, t2 of one pig
        return s2u + t1 * t2 * s2w + s2e * rho ** abs(t1 - t2) if t1 != t2 else s2u + t1 * t1 * s2w + s2e

    w = r.wcorrelation()
    for t2 in (2, 3, 9):
        expected = cov(1, t2) / np.sqrt(cov(1, 1) * cov(t2, t2))
        assert w.iloc[0, t2 - 1] == pytest.approx(expected, rel=1e-6)
    se = r.blups(se=True)["id"]
    assert (se["_cons"] > 0).all() and (se["_cons"] < est["sd(_cons)"]).all()
    assert (se["week"] > 0).all() and (se["week"] < est["sd(week)"]).all()
    assert np.isfinite(r.predict("fitted")).all()


def test_residual_errors():
    pig = jm.datasets.load("pig")
    with pytest.raises(jm.FormulaError, match="needs t"):
        jm.xtmixed("weight week || id:, residuals(ar 1)", pig)
    with pytest.raises(jm.FormulaError, match="unknown residual structure"):
        jm.xtmixed("weight week || id:, residuals(foo)", pig)
    with pytest.raises(jm.JaxmixedError, match="crossed"):
        jm.fit("weight ~ week + (1|id) + (1|week)", pig, residuals=jm.ar(1, time="week"))
    dup = pig.assign(week=1)
    with pytest.raises(jm.DataError, match="repeats a value"):
        jm.fit("weight ~ 1 + (1|id)", dup, residuals=jm.ar(1, time="week"))


def _gappy_panels(seed=1):
    """60 subjects seen at 3-9 of 12 occasions (gaps of 1-11 steps), two by() groups."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(60):
        ts = np.sort(rng.choice(12, size=rng.integers(3, 10), replace=False))
        b0, b1, e = rng.normal(0, 2), rng.normal(0, 0.5), 0.0
        for k, t in enumerate(ts):
            e = (0.6 ** (t - ts[k - 1]) * e if k else 0.0) + rng.normal()
            rows.append(dict(id=i, t=t, g=i % 2, x=rng.normal(), y=10 + 2 * t + b0 + b1 * t + e))
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed)  # rows out of time order


@pytest.mark.parametrize("res", [jm.ar(1, time="t"), jm.ar(1, time="t", by="g"), jm.exponential(time="t"),
                                 jm.exponential(time="t", by="g")], ids=["ar1", "ar1-by", "exp", "exp-by"])
def test_markov_residuals_deviance_equals_panel_matrices(res):
    """AR(1) and exponential residuals with every term on the panel factor: the deviance from
    prewhitened rows (no panel matrix) equals the one from the panels' V_i, value and gradient."""
    import jax

    d = _gappy_panels()
    des = design.build_design(jm.parse_formula("y ~ t + x + (1 + t | id)"), d)
    eng, data = panel.marginal_engine(des, d, res)
    assert eng.ps.markov
    # one program per side (value and gradient, REML and ML): op-by-op dispatch was 3× slower
    both = jax.jit(lambda z: [jax.value_and_grad(lambda w: panel.deviance(w, data.buckets, data.n, eng.ps, reml))(z)
                              for reml in (True, False)])
    both_b = jax.jit(lambda z: [jax.value_and_grad(lambda w: panel.data_deviance(w, data, eng.ps, reml))(z)
                                for reml in (True, False)])
    rng = np.random.default_rng(2)
    for _ in range(3):
        x = jnp.asarray(rng.normal(size=eng.ps.n_params) * 0.5)
        for (a, ga), (b, gb) in zip(both(x), both_b(x)):
            assert float(b) == pytest.approx(float(a), rel=1e-11)
            np.testing.assert_allclose(np.asarray(gb), np.asarray(ga), rtol=1e-9,
                                       atol=1e-9 * float(jnp.max(jnp.abs(ga))))


def test_markov_path_only_where_it_applies():
    d = _gappy_panels()
    nested = design.build_design(jm.parse_formula("y ~ t + (1 | g) + (1 | g:id)"), d)
    assert not panel.marginal_engine(nested, d, jm.ar(1, time="t"))[0].ps.markov
    slopes = design.build_design(jm.parse_formula("y ~ t + (1 + t | id)"), d)
    assert not panel.marginal_engine(slopes, d, jm.ar(2, time="t"))[0].ps.markov
    assert not panel.marginal_engine(slopes, d, jm.toeplitz(1, time="t"))[0].ps.markov
    assert panel.marginal_engine(slopes, d, jm.ar(1, time="t"))[0].ps.markov


# --- profile intervals (the per-panel engine) -----------------------------------------------------

RESID_PROFILE = json.loads((REF / "resid_profile.json").read_text())
PROFILE_ROWS = {"(Intercept)": "_cons", "week": "week", "sd_id": "id: sd(_cons)", "s": "sd(e)", "rho": "rho"}


@pytest.mark.filterwarnings("ignore:boundary")
def test_profile_intervals_ar1_match_glmmtmb_exact_roots():
    """pig, weight ~ week + (1|id) with AR(1) residuals in week, ML: every interval against the
    exact roots of glmmTMB's profile (tests/reference/make_resid_profile.R). The random
    intercept's sd is estimated 0 (the AR(1) takes it), so its interval starts at 0; the lower
    ends of s and ρ lie where the random intercept comes back (a second basin of the profile)."""
    r = jm.fit("weight ~ week + (1|id)", jm.datasets.load("pig"), method="ml", residuals=jm.ar(1, time="week"))
    assert abs(-2 * r.loglik - RESID_PROFILE["D_hat_exact"]) < 1e-6
    ci = r.confint("profile")
    assert list(ci.index) == ["week", "_cons", "id: sd(_cons)", "sd(e)", "rho"]
    for parm, row in PROFILE_ROWS.items():
        ref = RESID_PROFILE["profiles"][parm]
        for side in ("lower", "upper"):
            ours = ci.loc[row, side]
            # glmmTMB's own ends to 1e-4 (its nugget of 1.5e-8 makes it inexact by ~1e-5 where the
            # random intercept is positive), the exact roots of the same likelihood to 1e-7
            theirs, exact = ref[side], ref.get(side + "_exact", ref[side])
            assert abs(ours - theirs) <= 1e-4 * max(abs(theirs), 1e-2), (parm, side, ours, theirs)
            assert abs(ours - exact) <= 1e-7 * max(abs(exact), 1e-2), (parm, side, ours, exact)
    assert ci.loc["id: sd(_cons)", "lower"] == 0.0


def test_profile_intervals_fixed_effects_are_exact_roots():
    """Exchangeable residuals (the panel-matrix path, not the AR(1) prewhitening): at each end of
    a fixed effect's interval, the model refitted with that coefficient moved into the response
    (a separate jm.fit) is z² worse in deviance, and a REML fit is profiled on its ML refit; the
    independent-errors engine's profile of the equivalent model agrees."""
    pig = jm.datasets.load("pig")
    res = jm.exchangeable()
    r = jm.fit("weight ~ week + (0 + week | id)", pig, method="reml", residuals=res)
    ml = jm.fit("weight ~ week + (0 + week | id)", pig, method="ml", residuals=res)
    ci = r.confint("profile", level=90)
    z2 = 1.6448536269514722 ** 2
    for b in ci.loc["week", ["lower", "upper"]]:
        rb = jm.fit("yb ~ 1 + (0 + week | id)", pig.assign(yb=pig.weight - b * pig.week), method="ml", residuals=res)
        assert abs(-2 * (rb.loglik - ml.loglik) - z2) < 1e-6
    for b in ci.loc["_cons", ["lower", "upper"]]:
        rb = jm.fit("yb ~ 0 + week + (0 + week | id)", pig.assign(yb=pig.weight - b), method="ml", residuals=res)
        assert abs(-2 * (rb.loglik - ml.loglik) - z2) < 1e-6
    assert ci.loc["week", "estimate"] == r.fixed.loc["week", "coef"]
    assert 0 < ci.loc["rho", "lower"] < r.random.set_index("name").loc["rho", "estimate"] < ci.loc["rho", "upper"] < 1
    # the same model through the other engine: exchangeable residuals are a random intercept
    # (ρ > 0), so the independent-errors fit of (1 + week || id) has the same profiles of β and
    # of sd(week)
    pls_ci = jm.fit("weight ~ week + (1 + week || id)", pig, method="reml").confint("profile", level=90)
    for row in ("week", "_cons", "id: sd(week)"):
        np.testing.assert_allclose(ci.loc[row, ["lower", "upper"]].to_numpy(dtype=float),
                                   pls_ci.loc[row, ["lower", "upper"]].to_numpy(dtype=float), rtol=1e-6)


def test_per_panel_programs_are_prefetched_before_the_start_fit(monkeypatch):
    """A residual-structure fit asks for the per-panel engine's optimiser program (then its solve
    and η-Hessian) on the background thread before it fits the independent-errors start, so
    that loading or compiling them overlaps that fit; the fit is the same as without it."""
    from jaxmixed.fit import estimate

    events = []
    prefetch, optimize = estimate._kept.prefetch, estimate.optimize

    def watch_prefetch(*args, **kwargs):
        events.append(("prefetch", type(args[3]).__name__))
        return prefetch(*args, **kwargs)

    def watch_optimize(*args, **kwargs):
        events.append(("optimize", type(args[3]).__name__))
        return optimize(*args, **kwargs)

    best_fit = estimate.best_fit

    def watch_best_fit(*args, **kwargs):
        events.append(("start fit", type(args[0]).__name__))
        return best_fit(*args, **kwargs)

    monkeypatch.setattr(estimate._kept, "prefetch", watch_prefetch)
    monkeypatch.setattr("jaxmixed.api.fit.optimize", watch_optimize)
    monkeypatch.setattr("jaxmixed.api.fit.best_fit", watch_best_fit)
    r = jm.fit("weight ~ week + (1 | id)", jm.datasets.load("pig"), "reml", residuals=jm.ar(1, time="week"))
    assert events == [("prefetch", "MarginalEngine"), ("start fit", "PLSEngine"), ("optimize", "MarginalEngine")]
    monkeypatch.setattr(estimate._kept, "prefetch", lambda *a, **k: None)  # the same fit, nothing prefetched
    again = jm.fit("weight ~ week + (1 | id)", jm.datasets.load("pig"), "reml", residuals=jm.ar(1, time="week"))
    assert again.loglik == r.loglik and np.array_equal(again.params, r.params)
