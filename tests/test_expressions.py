"""Formula expressions through formulaic (issue #12): the fixed part and the response may use
formulaic's grammar; each fit equals the one on precomputed columns, and new data get the
training encoding (levels, centring)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import jaxmixed as jm


@pytest.fixture(scope="module")
def pig():
    return jm.datasets.load("pig")


def _same(a, b, names=None):
    assert a.loglik == pytest.approx(b.loglik, rel=1e-10, abs=1e-10)
    np.testing.assert_allclose(a.beta, b.beta, rtol=1e-8, atol=1e-10)
    if names is not None:
        assert list(a.fixed.index) == names


@pytest.mark.parametrize("square", ["I(week^2)", "I(week**2)"])
def test_powers(pig, square):
    a = jm.fit(f"weight ~ week + {square} + (1|id)", pig)
    b = jm.fit("weight ~ week + wk2 + (1|id)", pig.assign(wk2=pig.week ** 2))
    _same(a, b, ["week", "I(week ** 2)", "_cons"])


def test_logs_and_a_transformed_response(pig):
    for f in ("log(weight) ~ log(week) + (1|id)", "np.log(weight) ~ np.log(week) + (1|id)"):
        a = jm.fit(f, pig)
        b = jm.fit("lw ~ lwk + (1|id)", pig.assign(lw=np.log(pig.weight), lwk=np.log(pig.week)))
        _same(a, b)
        assert a.design.response in ("log(weight)", "np.log(weight)")
    assert jm.fit("log(weight) ~ week + (1|id)", pig).fixed.index[0] == "week"


def test_scale_and_new_data_keep_the_training_centring(pig):
    a = jm.fit("weight ~ scale(week) + (1 + week | id)", pig)
    z = (pig.week - pig.week.mean()) / pig.week.std(ddof=1)
    _same(a, jm.fit("weight ~ zw + (1 + week | id)", pig.assign(zw=z)), ["scale(week)", "_cons"])
    new = pd.DataFrame({"week": [1.0, 5.0, 12.0], "id": [1, 2, 999], "weight": [30.0, 40.0, 50.0]})
    # by hand: the training mean and sd, not the new rows' own
    zn = (new.week - pig.week.mean()) / pig.week.std(ddof=1)
    xb = a.beta[0] * zn + a.beta[1]
    np.testing.assert_allclose(a.predict("xb", data=new).to_numpy(), xb, rtol=1e-12)
    b = a.blups()["id"]
    fitted = xb + np.array([b.loc[1, "_cons"] + b.loc[1, "week"] * 1.0, b.loc[2, "_cons"] + b.loc[2, "week"] * 5.0, 0.0])
    with pytest.warns(jm.JaxmixedWarning, match="not seen"):
        np.testing.assert_allclose(a.predict("fitted", data=new).to_numpy(), fitted, rtol=1e-12)
    with pytest.warns(jm.JaxmixedWarning):
        np.testing.assert_allclose(a.predict("residuals", data=new).to_numpy(), new.weight - fitted, rtol=1e-12)


def test_poly_spans_the_polynomial(pig):
    # (the ML likelihood is invariant to the basis of the fixed-effects columns; REML's moves
    # by the log-determinant of the change of basis)
    a = jm.fit("weight ~ poly(week, 2) + (1|id)", pig, method="ml")
    b = jm.fit("weight ~ week + wk2 + (1|id)", pig.assign(wk2=pig.week ** 2), method="ml")
    assert a.loglik == pytest.approx(b.loglik, rel=1e-10)
    assert list(a.fixed.index) == ["poly(week, 2)[1]", "poly(week, 2)[2]", "_cons"]
    np.testing.assert_allclose(a.predict("xb").to_numpy(), b.predict("xb").to_numpy(), rtol=1e-9)
    # the same basis by hand (orthonormal polynomials, as R's poly: QR of [1, x, x²], signs by R's diagonal)
    V = np.vander(pig.week.to_numpy(dtype=float), 3, increasing=True)
    Q, R = np.linalg.qr(V)
    P = Q[:, 1:] * np.sign(np.diag(R)[1:])
    c = jm.fit("weight ~ p1 + p2 + (1|id)", pig.assign(p1=P[:, 0], p2=P[:, 1]))
    _same(jm.fit("weight ~ poly(week, 2) + (1|id)", pig), c)


def test_treatment_reference_by_expression(pig):
    d = pig.assign(phase=np.where(pig.week <= 3, "early", np.where(pig.week <= 6, "mid", "late")))
    a = jm.fit('weight ~ C(phase, Treatment("mid")) + np.log(week) + (1|id)', d)
    b = jm.fit("weight ~ early + late + lwk + (1|id)",
               d.assign(early=(d.phase == "early") * 1.0, late=(d.phase == "late") * 1.0, lwk=np.log(d.week)))
    _same(a, b, ["C(phase, Treatment('mid'))[T.early]", "C(phase, Treatment('mid'))[T.late]", "np.log(week)", "_cons"])


def test_missing_rows_are_dropped_before_the_expressions(pig):
    d = pig.copy()
    d.loc[d.index[:3], "week"] = np.nan
    a = jm.fit("weight ~ poly(week, 2) + (1|id)", d)
    assert a.n_dropped == 3 and a.nobs == len(pig) - 3


@pytest.mark.parametrize("formula,match", [
    ("weight ~ log(week - 5) + (1|id)", "non-finite"),
    ("weight ~ log(nosuch) + (1|id)", "'nosuch' is not a column of the data"),
    ("weight ~ week + (1 + poly(week, 2) | id)", "makes 2 columns"),
    ("weight ~ week + (1 + log(week - 5) | id)", "non-finite"),
])
def test_bad_expressions_are_jaxmixed_errors(pig, formula, match):
    with pytest.raises(jm.JaxmixedError, match=match):
        jm.fit(formula, pig)


def test_a_polynomial_beyond_the_distinct_values_is_cut_as_collinear(pig):
    """9 distinct weeks hold a polynomial of degree 8 at most: the higher columns are omitted
    with a note, as collinear columns always are (R's lm gives them NA)."""
    with pytest.warns(jm.JaxmixedWarning, match="omitted because of collinearity"):
        r = jm.fit("weight ~ poly(week, 10) + (1|id)", pig)
    assert list(r.fixed.index) == [f"poly(week, 10)[{k}]" for k in range(1, 9)] + ["_cons"]
    assert r.notes[:2] == ("poly(week, 10)[9] omitted because of collinearity",
                           "poly(week, 10)[10] omitted because of collinearity")


def test_expressions_inside_random_effects_terms(pig):
    a = jm.fit("weight ~ week + (1 + log(week) | id)", pig)
    b = jm.fit("weight ~ week + (1 + lw | id)", pig.assign(lw=np.log(pig.week)))
    _same(a, b)
    assert list(a.random.name[:3]) == ["sd(log(week))", "sd(_cons)", "corr(log(week),_cons)"]
    np.testing.assert_allclose(a.blups()["id"].to_numpy(), b.blups()["id"].to_numpy(), rtol=1e-8)
    # a transformed response and an expression slope together
    c = jm.fit("log(weight) ~ week + (1 + log(week) | id)", pig)
    d = jm.fit("lwt ~ week + (1 + lw | id)", pig.assign(lw=np.log(pig.week), lwt=np.log(pig.weight)))
    _same(c, d)


def test_a_scaled_random_slope_keeps_the_training_centring_on_new_data(pig):
    r = jm.fit("weight ~ week + (1 + scale(week) | id)", pig)
    new = pd.DataFrame({"week": [2.0, 7.0], "id": [3, 5]})
    z = (new.week - pig.week.mean()) / pig.week.std(ddof=1)
    b = r.blups()["id"]
    hand = r.beta[0] * new.week + r.beta[1] + b.loc[[3, 5], "_cons"].to_numpy() + \
        b.loc[[3, 5], "scale(week)"].to_numpy() * z.to_numpy()
    np.testing.assert_allclose(r.predict("fitted", data=new).to_numpy(), hand, rtol=1e-12)
