"""Bad input to a GLMM: a clear jaxmixed error naming the problem, never a JAX traceback or a
silent number; missing values dropped and counted; separation reported."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import jaxmixed as jm


@pytest.fixture(scope="module")
def d():
    rng = np.random.default_rng(0)
    out = pd.DataFrame({"y": rng.integers(0, 2, 60).astype(float), "x": rng.normal(size=60),
                        "g": np.repeat(list("abcdefghij"), 6), "h": np.tile(list("uvw"), 20)})
    out["c"] = rng.poisson(2, 60).astype(float)
    out["n"] = 5.0
    return out


@pytest.mark.parametrize("formula,kw,err,match", [
    ("y ~ x + (1|g)", dict(family="binomial", link="identity"), jm.ModelError, "does not fit the binomial"),
    ("c ~ x + (1|g)", dict(family="poisson", link="logit"), jm.ModelError, "does not fit the poisson"),
    ("y ~ x + (1|g) + (1|h)", dict(family="binomial", nagq=3), jm.ModelError, "are crossed"),
    ("y ~ x + (1|g)", dict(family="binom2"), jm.ModelError, "unknown family 'binom2'"),
    ("y ~ x + (1|g)", dict(family="binomial", link="logistic"), jm.ModelError, "unknown link"),
    ("y ~ x + (1|g)", dict(family="binomial", nagq=-1), jm.ModelError, "nagq must be"),
    ("y ~ x + (1|g)", dict(family="binomial", method="reml"), jm.ModelError, "REML is defined for linear"),
    ("cbind(c) ~ x + (1|g)", dict(family="binomial"), jm.FormulaError, r"cbind\(\) needs two arguments"),
    ("cbind(c, n - c) ~ x + (1|g)", dict(family="poisson"), jm.ModelError, "binomial response"),
    ("y ~ x + offset(log(q)) + (1|g)", dict(family="poisson"), jm.DataError, "offset 'log\\(q\\)'"),
    ("y ~ x + (1|g)", dict(family="binomial", weights="zz"), jm.DataError, "weights 'zz'"),
    ("h ~ x + (1|g)", dict(family="binomial"), jm.DataError, "has 3 level"),
    ("y ~ x + (1|g)", dict(nagq=5), jm.ModelError, "nagq= is for generalized"),
])
def test_bad_model(d, formula, kw, err, match):
    with pytest.raises(err, match=match):
        jm.fit(formula, d, **kw)


def test_bad_responses(d):
    bad = d.copy()
    bad.loc[3, "y"] = 2
    with pytest.raises(jm.DataError, match=r"'y' must be 0 or 1 .* row 3 has 2"):
        jm.fit("y ~ x + (1|g)", bad, family="binomial")
    with pytest.raises(jm.DataError, match="successes exceed the trials"):
        jm.fit("cbind(c, n - c) ~ x + (1|g)", d.assign(c=d.c + 4), family="binomial")
    with pytest.raises(jm.DataError, match="non-negative whole-number count for the poisson"):
        jm.fit("c ~ x + (1|g)", d.assign(c=d.c - 3), family="poisson")
    with pytest.raises(jm.DataError, match="whole-number count for the negbinomial"):
        jm.fit("c ~ x + (1|g)", d.assign(c=d.c + 0.5), family="negbinomial")
    with pytest.raises(jm.DataError, match="must be positive for the gamma"):
        jm.fit("x ~ c + (1|g)", d, family="gamma")
    with pytest.raises(jm.DataError, match="weights must be positive"):
        jm.fit("y ~ x + (1|g)", d.assign(w=-1.0), family="poisson", weights="w")


def test_bad_stata_options(d):
    with pytest.raises(jm.ModelError, match="melogit fixes the family"):
        jm.melogit("y x || g:, family(poisson)", d)
    with pytest.raises(jm.FormulaError, match="intpoints"):
        jm.melogit("y x || g:, intpoints(0)", d)
    with pytest.raises(jm.FormulaError, match="intmethod"):
        jm.melogit("y x || g:, intmethod(quadratic)", d)
    assert jm.melogit("y x || g: || h:, intpoints(3)", d).nagq == 3  # two nested levels: fine
    # Stata's levels nest (k within h within g): three nested levels take mvaghermite's 7 points
    d3 = d.assign(k=np.tile(["p", "q"], 30))
    assert jm.melogit("y x || g: || h: || k:", d3).nagq == 7
    # three factors that do not nest: asked-for points are refused, naming two that cross
    with pytest.raises(jm.ModelError, match="needs one grouping factor or nested ones; g and h are crossed"):
        jm.fit("y ~ x + (1|g) + (1|h) + (1|k)", d3, family="binomial", nagq=5)
    with pytest.raises(jm.ModelError, match="use jm.mixed"):
        jm.meglm("y x || g:, family(gaussian)", d)


def test_missing_rows_dropped_and_separation_reported(d):
    d3 = d.copy()
    d3.loc[[1, 5], "x"] = np.nan
    d3.loc[7, "c"] = np.nan  # a column the model does not use: no row lost for it
    r = jm.fit("y ~ x + (1|g)", d3, family="binomial")
    assert (r.nobs, r.n_dropped) == (58, 2)
    assert "2 observation(s) dropped because of missing values" in r.notes
    rng = np.random.default_rng(1)
    d4 = d.assign(s=(d.y > 0) * 2.0 - 1 + rng.normal(scale=0.01, size=len(d)))
    with pytest.warns(jm.JaxmixedWarning, match="separation"):
        r4 = jm.fit("y ~ s + (1|g)", d4, family="binomial")
    assert any("separation suspected: s" in n for n in r4.notes)
    assert not r4.converged
