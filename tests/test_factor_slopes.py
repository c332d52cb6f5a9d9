"""lme4's random slopes of a factor, ``(1 + f | g)``: one random column per indicator of f's
levels but the first (all levels in ``(0 + f | g)``), named ``f<level>`` as lme4 does. Checked
against lme4 (the Contraception fit of tests/reference/glmm_nagq0.json was made with the numeric
0/1 column urbanY, which is what lme4 builds from the factor) and against the same model written
with hand-made indicator columns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import jaxmixed as jm

REF = json.loads((Path(__file__).parent / "reference" / "glmm_nagq0.json").read_text())["contraception_slope"]


@pytest.fixture(scope="module")
def sleep():
    s = jm.datasets.load("sleepstudy")
    s["phase"] = np.where(s["Days"] < 5, "a", "b")
    s["phase_b"] = (s["phase"] == "b") * 1.0
    return s


def test_factor_slope_glmm_matches_lme4():
    d = jm.datasets.load("contraception")
    d["urbanY"] = (d["urban"] == "Y").astype(float)
    r = jm.fit("use ~ age + I(age^2) + urbanY + livch + (1 + urban | district)", d, family="binomial", nagq=0)
    assert r.loglik == pytest.approx(REF["logLik"], abs=1e-6)
    assert list(r.random.name) == ["sd(urbanY)", "sd(_cons)", "corr(urbanY,_cons)"]
    sd = dict(zip(REF["sdcor_names"], REF["sdcor"]))
    assert r.random.estimate.iloc[0] == pytest.approx(sd["district urbanY NA"], rel=2e-6)
    assert r.random.estimate.iloc[2] == pytest.approx(sd["district (Intercept) urbanY"], rel=2e-6)


def test_factor_slope_equals_indicator_columns(sleep):
    a = jm.fit("Reaction ~ Days + phase + (1 + phase | Subject)", sleep)
    b = jm.fit("Reaction ~ Days + phase + (1 + phase_b | Subject)", sleep)
    assert not a.singular
    assert a.loglik == pytest.approx(b.loglik, abs=1e-8)
    np.testing.assert_allclose(a.random.estimate, b.random.estimate, rtol=1e-6)
    assert list(a.random.name[:3]) == ["sd(phaseb)", "sd(_cons)", "corr(phaseb,_cons)"]
    np.testing.assert_allclose(a.predict("fitted"), b.predict("fitted"), rtol=1e-8)
    new = sleep.iloc[[0, 4, 9]].drop(columns=["phase_b"])  # new data: the factor only
    np.testing.assert_allclose(a.predict("fitted", data=new), b.predict("fitted")[[0, 4, 9]], rtol=1e-8)
    np.testing.assert_allclose(a.blups()["Subject"].to_numpy(), b.blups()["Subject"].to_numpy(), rtol=1e-5,
                               atol=1e-6)


def test_factor_slope_without_intercept_is_unstructured_over_levels(sleep):
    a = jm.fit("Reaction ~ Days + phase + (1 + phase | Subject)", sleep)
    c = jm.fit("Reaction ~ Days + phase + (0 + phase | Subject)", sleep)  # the same covariance model
    assert c.loglik == pytest.approx(a.loglik, abs=1e-6)
    assert not c.singular
    assert list(c.random.name) == ["sd(phasea)", "sd(phaseb)", "corr(phasea,phaseb)", "sd(Residual)"]


def test_factor_slope_levels_from_the_rows_used(sleep):
    s = sleep.copy()
    s["phase"] = pd.Categorical(s["phase"], categories=["b", "a", "z"])  # order and an unused level
    s.loc[s.index[:2], "Reaction"] = np.nan
    r = jm.fit("Reaction ~ Days + (1 + phase | Subject)", s)
    assert r.n_dropped == 2
    assert list(r.random.name[:2]) == ["sd(phasea)", "sd(_cons)"]  # base: the first category, b
