"""BLUPs, conditional SEs (against lme4), predictions, lrtest and estat (issue: after the fit)."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest

import jaxmixed as jm
from conftest import REF, cached_fit
from jaxmixed.app.tour import school_lines
from test_reference import agree

LME4 = json.loads((REF / "lme4_reference.json").read_text())
SLOPE = "math5 ~ math3c + (1 + math3c || school)"


def test_school_lines_first_10(jsp_ref):
    r = cached_fit("xtmixed", "math5 math3c || school: math3c", "jsp")
    ref = jsp_ref["slope_indep_reml"]["school_lines_first_10"]
    lines = school_lines(r)
    assert [str(s) for s, _, _ in lines] == list(ref)  # 1..9 and 11: no school 10
    for s, b0, b1 in lines:
        assert agree(b0, ref[str(s)][0], 4) and agree(b1, ref[str(s)][1], 4), (s, b0, b1)


def test_blups_and_reses_match_lme4_one_factor():
    r = cached_fit("fit", SLOPE, "jsp")
    ref = LME4["jsp_slope_indep_reml"]["ranef_school"]
    b, se = r.blups()["school"], r.blups(se=True)["school"]
    for s, row in ref.items():
        s = int(s)
        np.testing.assert_allclose([b.loc[s, "_cons"], b.loc[s, "math3c"]], [row["intercept"], row["slope"]],
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose([se.loc[s, "_cons"], se.loc[s, "math3c"]], [row["se_intercept"], row["se_slope"]],
                                   rtol=1e-4)


def test_reses_match_lme4_crossed():
    """Crossed factors: the second factor's block and the first factor's Schur correction."""
    r = cached_fit("fit", "weight ~ week + (1|id) + (1|week)", "pig")
    ref = LME4["pig_crossed_reml"]
    for key in ("id", "week"):
        b, se = r.blups()[key]["_cons"], r.blups(se=True)[key]["_cons"]
        for level, row in ref[f"ranef_{key}"].items():
            assert abs(b.loc[int(level)] - row["blup"]) <= 1e-4 * (abs(row["blup"]) + 0.1)
            assert abs(se.loc[int(level)] - row["se"]) <= 1e-4 * row["se"]
    fitted = r.predict("fitted").to_numpy()[:20]
    np.testing.assert_allclose(fitted, ref["fitted_first20"], rtol=1e-5)  # optimum agrees to ~1e-6


def test_reses_match_lme4_nested():
    r = cached_fit("fit", "gsp ~ private + emp + hwy + water + other + unemp + (1|region) + (1|region:state)",
                   "productivity")
    ref = LME4["prod_nested_reml"]
    se_state = r.blups(se=True)["region:state"]["_cons"]
    for key, row in ref["ranef_region_state"].items():
        region, state = key.split(":")
        assert abs(se_state.loc[(int(region), state)] - row["se"]) <= 1e-4 * row["se"]
    se_region = r.blups(se=True)["region"]["_cons"]
    for key, row in ref["ranef_region"].items():
        assert abs(se_region.loc[int(key)] - row["se"]) <= 1e-4 * row["se"]


def test_predict_kinds_are_consistent(jsp):
    r = cached_fit("fit", SLOPE, "jsp")
    xb, fitted = r.predict("xb"), r.predict("fitted")
    re = r.predict("reffects")
    assert list(re.columns) == ["school: math3c", "school: _cons"]
    np.testing.assert_allclose(fitted, xb + re["school: _cons"] + re["school: math3c"] * jsp.math3c)
    np.testing.assert_allclose(r.predict("residuals"), jsp.math5 - fitted)
    np.testing.assert_allclose(r.predict("rstandard"), (jsp.math5 - fitted) / r.sigma)
    assert r.predict("reses").notna().all().all()
    with pytest.raises(jm.JaxmixedError, match="predict kind"):
        r.predict("bogus")


def test_predict_new_data_unseen_levels(jsp):
    r = cached_fit("fit", SLOPE, "jsp")
    new = jsp.iloc[:5].copy()
    new.loc[new.index[:2], "school"] = 999  # unseen
    with pytest.warns(jm.JaxmixedWarning, match="2 row-level"):
        fitted = r.predict("fitted", data=new)
    xb = r.predict("xb", data=new)
    np.testing.assert_allclose(fitted.iloc[:2], xb.iloc[:2])  # zero effects for unseen schools
    np.testing.assert_allclose(fitted.iloc[2:], r.predict("fitted").iloc[2:5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert r.predict("reses", data=new).iloc[:2].isna().all().all()


def test_lrtest_ml_matches_loglik_difference_and_lme4(jsp):
    small = cached_fit("fit", "math5 ~ math3c + (1|school)", "jsp", method="ml")
    big = cached_fit("fit", SLOPE, "jsp", method="ml")
    t = jm.lrtest(small, big)
    assert t.df == 1 and abs(t.stat - 2 * (big.loglik - small.loglik)) < 1e-9
    ref = LME4["jsp_lrtest_ml"]
    assert abs(t.stat - ref["chisq"]) < 1e-4 and t.df == ref["df"]
    assert "boundary" in t.note
    stat, df, p = jm.lrtest(big, small)  # order does not matter; unpacks as a 3-tuple
    assert (stat, df) == (t.stat, t.df)


def test_lrtest_refuses_reml_with_different_fixed_effects():
    a = cached_fit("fit", "math5 ~ math3c + (1|school)", "jsp")
    b = cached_fit("fit", "math5 ~ 1 + (1|school)", "jsp")
    with pytest.raises(jm.ModelError, match="REML fits with different fixed effects"):
        jm.lrtest(a, b)
    with pytest.raises(jm.ModelError, match="ML and the other by REML"):
        jm.lrtest(a, cached_fit("fit", SLOPE, "jsp", method="ml"))


def test_aic_bic_match_lme4_convention():
    r = cached_fit("fit", "math5 ~ math3c + (1|school)", "jsp", method="ml")
    k = 2 + 1 + 1
    assert r.aic == pytest.approx(-2 * r.loglik + 2 * k)
    assert r.bic == pytest.approx(-2 * r.loglik + np.log(887) * k)


def test_estat():
    r = cached_fit("xtmixed", "gsp private emp hwy water other unemp || region: || state:", "productivity")
    v = r.random.estimate.to_numpy() ** 2
    icc = r.icc()
    assert icc.loc["region", "icc"] == pytest.approx(v[0] / v.sum())
    assert icc.loc["state", "icc"] == pytest.approx((v[0] + v[1]) / v.sum())
    cov = r.recovariance()
    assert cov["state"].iloc[0, 0] == pytest.approx(v[1])
    w = r.wcorrelation()
    n1 = int((jm.datasets.load("productivity").region == 1).sum())
    assert w.shape == (n1, n1)  # the first region's observations (17 per state)
    same_state = w.iloc[0, 1]
    other_state = w.iloc[0, 20]
    assert same_state == pytest.approx((v[0] + v[1]) / v.sum())
    assert other_state == pytest.approx(v[0] / v.sum())
    slope = cached_fit("fit", SLOPE, "jsp")
    with pytest.raises(jm.ModelError, match="random-intercept"):
        slope.icc()
    us = slope.recovariance()["school"]
    assert us.loc["math3c", "math3c"] == pytest.approx(slope.random.estimate.iloc[0] ** 2)
