"""Factor coding (issue #12): a pandas Categorical's own order, Stata's base-level operators."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import jaxmixed as jm


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(3)
    n, G = 400, 20
    g = rng.integers(0, G, n)
    sex = rng.choice(["Male", "Female"], n, p=[0.4, 0.6])
    arm = rng.choice(["a", "b", "c"], n, p=[0.2, 0.5, 0.3])
    x = rng.normal(size=n)
    y = (1.0 + 0.5 * x + 0.8 * (sex == "Female") + np.select([arm == "b", arm == "c"], [0.3, -0.4], 0.0)
         + rng.normal(size=G)[g] + rng.normal(size=n))
    return pd.DataFrame({"y": y, "x": x, "g": g, "sex": sex, "arm": arm})


def _same(a, b, rtol=1e-10):
    assert a.loglik == pytest.approx(b.loglik, rel=rtol)
    np.testing.assert_allclose(a.beta, b.beta, rtol=1e-8, atol=1e-10)


def test_categorical_order_sets_the_reference_level(frame):
    d = frame.assign(sex=pd.Categorical(frame.sex, categories=["Male", "Female"]))
    r = jm.fit("y ~ x + sex + (1|g)", d)
    assert list(r.fixed.index) == ["x", "sex[T.Female]", "_cons"]
    ref = jm.fit("y ~ x + female + (1|g)", frame.assign(female=(frame.sex == "Female").astype(float)))
    _same(r, ref)
    # plain strings: sorted levels, Female the reference
    assert list(jm.fit("y ~ x + sex + (1|g)", frame).fixed.index) == ["x", "sex[T.Male]", "_cons"]
    # new data: the training levels and reference, whatever the new frame's categories say
    new = frame.iloc[:5].assign(sex=pd.Categorical(frame.sex.iloc[:5], categories=["Female", "Male"]))
    xb = r.predict("xb", data=new).to_numpy()
    hand = r.beta[0] * new.x.to_numpy() + r.beta[1] * (new.sex == "Female").to_numpy() + r.beta[2]
    np.testing.assert_allclose(xb, hand, rtol=1e-12)


def test_stata_ib_freq_and_ibn(frame):
    # b is the most frequent arm: ib(freq).arm is ib(b).arm written by value
    freq = jm.mixed("y x ib(freq).arm || g:", frame)
    assert [n for n in freq.fixed.index if n.endswith(".arm")] == ["a.arm", "c.arm"]
    codes = frame.assign(arm_n=frame.arm.map({"a": 1, "b": 2, "c": 3}))
    by_value = jm.mixed("y x ib2.arm_n || g:", codes)
    _same(freq, by_value)
    assert [n for n in by_value.fixed.index if n.endswith(".arm_n")] == ["1.arm_n", "3.arm_n"]
    dummies = frame.assign(a=(frame.arm == "a") * 1.0, c=(frame.arm == "c") * 1.0)
    _same(by_value, jm.mixed("y x a c || g:", dummies))  # precomputed columns
    # ibn. without a constant: one mean per level, as lme4's 0 + arm
    ibn = jm.mixed("y x ibn.arm, noconstant || g:", frame)
    assert [n for n in ibn.fixed.index if n.endswith(".arm")] == ["a.arm", "b.arm", "c.arm"]
    _same(ibn, jm.fit("y ~ 0 + x + arm + (1|g)", frame, method="ml"))
    # new data with another most frequent level keep the fit's base
    new = frame[frame.arm == "a"].head(6)
    xb = freq.predict("xb", data=new).to_numpy()
    b = dict(zip(freq.fixed.index, freq.beta))
    np.testing.assert_allclose(xb, b["x"] * new.x.to_numpy() + b["a.arm"] + b["_cons"], rtol=1e-12)


@pytest.mark.parametrize("op", ["L", "F", "L2", "D"])
def test_time_series_operators_are_refused_clearly(frame, op):
    with pytest.raises(jm.FormulaError, match="time-series operator"):
        jm.mixed(f"y {op}.x || g:", frame)


REF_DIR = __import__("pathlib").Path(__file__).resolve().parent / "reference"


@pytest.mark.parametrize("case,formula,column", [
    ("orthodont", "distance ~ age + Sex + (age | Subject)", "Sex"),
    ("hsb82", "mAch ~ sector + cses + (1 | school)", "sector"),
])
def test_lme4_codings_with_categoricals_in_r_order(case, formula, column):
    """lme4's fixed effects when the factor is a Categorical in R's level order (lme4 run by
    scripts/reference/coding_reference.R; values in tests/reference/coding_lme4.json)."""
    import json

    ref = json.loads((REF_DIR / "coding_lme4.json").read_text())[case]
    d = pd.read_csv(REF_DIR / f"{case}.csv")
    levels = ref["levels"][column]
    d[column] = pd.Categorical(d[column], categories=levels)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jm.JaxmixedWarning)
        r = jm.fit(formula, d)
    # (lme4 stops within its tolerance: on Orthodont 2e-8 below jaxmixed's log likelihood, where
    # the likelihood is flat enough that the Sex coefficient moves by 2e-5 relative)
    assert r.loglik == pytest.approx(ref["loglik"], abs=1e-6) and r.loglik >= ref["loglik"] - 1e-9
    names = {"(Intercept)": "_cons", f"{column}{levels[1]}": f"{column}[T.{levels[1]}]"}
    assert list(r.fixed.index) == [names.get(n, n) for n in ref["fixef"] if n != "(Intercept)"] + ["_cons"]
    for name, value in ref["fixef"].items():
        got = r.fixed.loc[names.get(name, name)]
        assert got.coef == pytest.approx(value, rel=1e-4, abs=1e-6)
        assert got.se == pytest.approx(ref["se"][name], rel=1e-3)


def test_booleans_and_integers_as_categories_where_asked(frame):
    d = frame.assign(late=frame.x > 0.3, k=(np.arange(len(frame)) % 3).astype(int))
    a = jm.fit("y ~ C(late) + C(k) + (1|g)", d)
    assert list(a.fixed.index) == ["late[T.True]", "k[T.1]", "k[T.2]", "_cons"]
    b = jm.mixed("y i.late i.k || g:", d, method="reml")
    assert list(b.fixed.index) == ["True.late", "1.k", "2.k", "_cons"]
    c = jm.fit("y ~ t + k1 + k2 + (1|g)", d.assign(t=d.late * 1.0, k1=(d.k == 1) * 1.0, k2=(d.k == 2) * 1.0))
    _same(a, c)
    _same(b, c)
    # an integer column without C() is a number, as in R and statsmodels
    assert list(jm.fit("y ~ k + (1|g)", d).fixed.index) == ["k", "_cons"]
