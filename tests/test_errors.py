"""Bad input, Stata's data rules, boundary fits and numerical range (issue #6).

Bad input must end in a :class:`jaxmixed.JaxmixedError` whose message names the cause and where
it is, or in a fit that says what happened (a note and a visible :class:`JaxmixedWarning`); never
a JAX traceback, a bare Python exception or a silently wrong number.

``BAD_INPUTS`` is also the source of the table in ``docs/bad_input.md``
(``python tests/test_errors.py`` prints it).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import jaxmixed as jm
from jaxmixed import DataError, FormulaError, JaxmixedError, JaxmixedWarning, ModelError

REF = Path(__file__).parent / "reference"


def _frame(n_groups: int = 8, per: int = 5, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = n_groups * per
    g = np.repeat(np.arange(n_groups), per)
    x = rng.normal(size=n)
    y = 1.0 + 0.5 * x + rng.normal(size=n_groups)[g] + rng.normal(size=n)
    r = np.array(list("pqrs"))[np.arange(n) % 4]  # a row-level factor crossed with g
    return pd.DataFrame({"y": y, "x": x, "z": rng.normal(size=n), "g": g,
                         "s": np.array(list("abcdefgh"))[g], "h": np.where(g < 4, "lo", "hi"),
                         "r": r, "rr": np.where(np.isin(r, ["p", "q"]), "u", "v")})


def _with(**changes):
    """A data builder: the standard frame with some columns replaced (callables get the frame)."""
    def build():
        d = _frame()
        for k, v in changes.items():
            d[k] = v(d) if callable(v) else v
        return d
    return build


def _rows(k):
    return lambda: _frame().iloc[:k].assign(g=[1, 1, 2, 2][:k], a=[0.3, 1.2, -0.4, 2.0][:k],
                                            b=[1.0, -1.0, 0.5, 0.25][:k])


def _drop_all():
    d = _frame()
    d.loc[::2, "y"] = np.nan
    d.loc[1::2, "x"] = np.nan
    return d


def _one_each():
    d = _frame()
    d["g"] = np.arange(len(d))
    return d


def _dup_names():
    d = _frame()
    return pd.concat([d, d[["x"]].rename(columns={"x": "y"})], axis=1)


def _set(col, row, value):
    def build():
        d = _frame()
        d[col] = d[col].astype(float) if col == "g" else d[col]
        d.loc[row, col] = value
        return d
    return build


# (label, front end, model, data builder, keyword arguments, error class, text the message holds)
BAD_INPUTS = [
    ("unknown column", "fit", "y ~ xx + (1|g)", _frame, {}, DataError,
     "variable 'xx' is not a column of the data; did you mean 'x'?"),
    ("unknown grouping column (Stata)", "xtmixed", "y x || gg:", _frame, {}, DataError,
     "variable 'gg' is not a column of the data; did you mean 'g'?"),
    ("formula syntax error", "fit", "y ~ x + (1|g", _frame, {}, FormulaError, "(at position 12)"),
    ("formula: stray bar", "fit", "y ~ x | g", _frame, {}, FormulaError, "must be inside parentheses"),
    ("Stata syntax error", "xtmixed", "y x | g:", _frame, {}, FormulaError, "use '||' between equations"),
    ("cov(unstructured) on R.x", "xtmixed", "y x || g: R.s, cov(unstructured)", _frame, {}, FormulaError,
     "R.s implies cov(identity); cov(unstructured) is not allowed"),
    ("non-numeric response", "fit", "y ~ x + (1|g)", _with(y=lambda d: d.s), {}, DataError,
     "response 'y' is not numeric"),
    ("non-numeric c. covariate", "xtmixed", "y c.s || g:", _frame, {}, DataError, "variable 's' is not numeric"),
    ("non-numeric random slope (Stata)", "xtmixed", "y || g: s", _frame, {}, DataError,
     "random-effects covariate 's' is not numeric"),
    ("grouping variable all missing", "fit", "y ~ x + (1|g)", _with(g=np.nan), {}, DataError,
     "grouping variable 'g' is missing in every row"),
    ("a single group", "fit", "y ~ x + (1|g)", _with(g=7), {}, DataError,
     "grouping 'g' has 1 level(s): a variance needs at least two groups"),
    ("_all is a single group", "xtmixed", "y x || _all:", _frame, {}, DataError,
     "level '_all' is a single group: a variance needs at least two groups"),
    ("no rows at all", "fit", "y ~ x + (1|g)", lambda: _frame().iloc[:0], {}, DataError, "the data have no rows"),
    ("empty after dropping missing rows", "fit", "y ~ x + (1|g)", _drop_all, {}, DataError,
     "no observations left after dropping rows with missing values"),
    ("infinite response", "fit", "y ~ x + (1|g)", _set("y", 3, -np.inf), {}, DataError,
     "response 'y' has 1 infinite value(s)"),
    ("infinite covariate", "fit", "y ~ x + (1|g)", _set("x", 3, np.inf), {}, DataError,
     "variable 'x' has 1 infinite value(s)"),
    ("infinite random slope", "fit", "y ~ 1 + (x|g)", _set("x", 3, np.inf), {}, DataError,
     "random-effects covariate 'x' has 1 infinite value(s)"),
    ("infinite group label", "fit", "y ~ x + (1|g)", _set("g", 3, np.inf), {}, DataError,
     "grouping variable 'g' has 1 infinite value(s)"),
    ("REML, fixed effects = observations", "fit", "y ~ x + a + b + (1|g)", _rows(4), {}, DataError,
     "too few observations: 4 for 4 fixed effects (x, a, b, _cons)"),
    ("REML, more fixed effects than observations", "xtmixed", "y x a b || g:", _rows(3), {}, DataError,
     "too few observations: 3 for 3 fixed effects"),
    ("ML, more fixed effects than observations", "fit", "y ~ x + a + b + (1|g)", _rows(3), {"method": "ml"},
     DataError, "too few observations: 3 for 3 fixed effects"),
    ("as many groups as observations", "fit", "y ~ x + (1|g)", _one_each, {}, DataError,
     "40 observations for 40 random effects in the term (_cons | g)"),
    ("constant response", "fit", "y ~ x + (1|g)", _with(y=3.0), {}, DataError,
     "response 'y' is constant (3 in all 40 observations)"),
    ("response fitted exactly", "fit", "y ~ x + (1|g)", _with(y=lambda d: 2 * d.x + 1), {}, DataError,
     "response 'y' is fitted exactly by the fixed effects (x, _cons)"),
    ("response also a predictor", "fit", "y ~ y + x + (1|g)", _frame, {}, DataError,
     "fitted exactly by the fixed effects"),
    ("huge values", "fit", "y ~ x + (1|g)", _with(y=lambda d: d.y * 1e300), {}, DataError,
     "response 'y' has values as large as"),
    ("tiny response", "fit", "y ~ x + (1|g)", _with(y=lambda d: d.y * 1e-100), {}, DataError,
     "too small for double precision; rescale it"),
    ("all-zero random slope", "fit", "y ~ x + (1 + k|g)", _with(k=0.0), {}, DataError,
     "k is zero, constant or a linear combination of _cons in every row"),
    ("duplicated random slope", "fit", "y ~ x + (x + xa|g)", _with(xa=lambda d: 2 * d.x), {}, DataError,
     "xa is zero, constant or a linear combination of x, _cons in every row"),
    ("cells holding lists", "fit", "y ~ x + (1|g)", _with(x=lambda d: [[1.0]] * len(d)), {}, DataError,
     "variable 'x' holds values that are not scalars (a list)"),
    ("complex numbers", "fit", "y ~ x + (1|g)", _with(x=lambda d: d.x + 1j), {}, DataError,
     "variable 'x' has complex values"),
    ("duplicated column names", "fit", "y ~ x + (1|g)", _dup_names, {}, DataError,
     "column 'y' appears 2 times in the data"),
    ("data not a DataFrame", "fit", "y ~ x + (1|g)", lambda: {"y": [1.0]}, {}, DataError,
     "data must be a pandas DataFrame, not dict"),
    ("formula not a string", "fit", 42, _frame, {}, FormulaError, "a formula must be a string, not int"),
    ("no random effects", "fit", "y ~ x", _frame, {}, ModelError, "the model has no random-effects term"),
    ("unknown method", "fit", "y ~ x + (1|g)", _frame, {"method": "gls"}, ModelError,
     "method must be 'reml' or 'ml', not 'gls'"),
    ("confidence level out of range", "fit", "y ~ x + (1|g)", _frame, {"level": 5}, ModelError,
     "level must be between 10 and 99.99"),
    ("start of the wrong length", "fit", "y ~ x + (1|g)", _frame, {"start": [1.0, 2.0]}, ModelError,
     "start must have 1 entries"),
    ("unknown keyword (Stata)", "xtmixed", "y x || g:", _frame, {"bogus": 1}, ModelError,
     "unknown argument(s): bogus"),
]

FRONT = {"fit": jm.fit, "xtmixed": jm.xtmixed}


def _dropped():
    d = _frame()
    d.loc[[1, 5], "x"] = np.nan
    return d


def _no_within():
    d = _frame()
    d["y"] = d.g * 1.0 + 0.5 + 0.1 * d.x  # no residual variation once the groups are known
    return d


def _dyestuff2():
    return pd.read_csv(REF / "dyestuff2.csv")


# Inputs that fit, with a note in the report and (but for dropped rows) a JaxmixedWarning:
# (label, front end, model, data builder, keyword arguments, text of the note/warning)
NOTED_INPUTS = [
    ("missing values (rows dropped, counted)", "fit", "y ~ x + (1|g)", _dropped, {},
     "2 observation(s) dropped because of missing values"),
    ("duplicated covariate", "fit", "y ~ x + x2 + (1|g)", _with(x2=lambda d: d.x), {},
     "x2 omitted because of collinearity"),
    ("all-constant covariate", "xtmixed", "y x k || g:", _with(k=5.0), {}, "k omitted because of collinearity"),
    ("i. dummies spanning the constant", "xtmixed", "y x i.r i.rr || g:", _frame, {},
     "v.rr omitted because of collinearity"),
    ("zero variance at the optimum (Dyestuff2)", "fit", "Yield ~ 1 + (1|Batch)", _dyestuff2, {},
     "boundary (singular) fit: a variance is zero or a correlation is ±1; standard errors of the "
     "variance components are not reported"),
    ("no residual variation within groups", "fit", "y ~ x + (1|g)", _no_within, {},
     "convergence not achieved"),
]


def run_noted(case):
    """(FitResult, notes, JaxmixedWarning messages) for one NOTED_INPUTS row."""
    label, front, text, build, kw, _ = case
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        r = FRONT[front](text, build(), **kw)
    return r, list(r.notes), [str(w.message) for w in rec if issubclass(w.category, JaxmixedWarning)]


@pytest.mark.parametrize("case", NOTED_INPUTS, ids=[c[0] for c in NOTED_INPUTS])
def test_questionable_input_fits_with_a_note_and_a_warning(case):
    r, notes, warned = run_noted(case)
    fragment = case[-1]
    assert isinstance(r, jm.FitResult)
    assert np.isfinite(r.loglik) and np.all(np.isfinite(r.beta))
    if "dropped" in fragment:
        assert any(fragment in n for n in notes) and not warned
    else:
        assert any(fragment in n for n in notes) and any(fragment in w for w in warned)


def run_case(case):
    """(exception or None, message) for one BAD_INPUTS row."""
    label, front, text, build, kw, _, _ = case
    try:
        FRONT[front](text, build(), **kw)
    except Exception as e:  # noqa: BLE001 - the test inspects what escapes
        return e, str(e)
    return None, ""


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_jaxmixed_error(case):
    label, front, text, build, kw, cls, fragment = case
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray numpy/pandas/JAX warnings on the way to the error
        warnings.simplefilter("ignore", JaxmixedWarning)
        err, msg = run_case(case)
    assert isinstance(err, cls), f"{label}: got {type(err).__name__}: {msg}"
    assert isinstance(err, JaxmixedError)
    assert fragment in msg, msg


def test_formula_errors_point_at_the_position():
    with pytest.raises(FormulaError) as info:
        jm.fit("y ~ x + (1 + | g)", _frame())
    e = info.value
    assert e.pos == 13 and e.text == "y ~ x + (1 + | g)"
    lines = str(e).splitlines()
    assert lines[1].strip() == "y ~ x + (1 + | g)" and lines[2].index("^") == lines[1].index("|")


# -- Stata's data rules ------------------------------------------------------------------------

def _fit_quiet(fn, *a, **k):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        r = fn(*a, **k)
    return r, [w for w in rec]


def test_missing_values_drop_the_row_and_are_counted():
    d = _frame()
    d.loc[[1, 5], "x"] = np.nan
    d.loc[9, "y"] = np.nan
    d.loc[9, "g"] = np.nan  # one row with two missing values counts once
    d.loc[12, "s"] = None  # a column the model does not use: not a reason to drop
    r, rec = _fit_quiet(jm.fit, "y ~ x + (1|g)", d)
    assert r.nobs == 37 and r.n_dropped == 3
    assert "3 observation(s) dropped because of missing values" in r.notes
    assert "Note: 3 observation(s) dropped because of missing values." in str(r)
    assert all(issubclass(w.category, JaxmixedWarning) for w in rec)
    ref = jm.fit("y ~ x + (1|g)", d.drop(index=[1, 5, 9]))
    assert r.loglik == pytest.approx(ref.loglik, abs=1e-9)
    assert np.allclose(r.beta, ref.beta, atol=1e-9)


@pytest.mark.parametrize("front,text,omitted,same_as", [
    ("fit", "y ~ x + x2 + (1|g)", ["x2"], "y ~ x + (1|g)"),  # a duplicated column
    ("fit", "y ~ x + k + (1|g)", ["k"], "y ~ x + (1|g)"),  # an all-constant covariate
    ("xtmixed", "y x k || g:", ["k"], "y ~ x + (1|g)"),
    ("xtmixed", "y x i.h i.h2 || g:", ["b.h2"], "y ~ x + h + (1|g)"),  # a relabelled copy of h
    ("fit", "y ~ x + h + h2 + (1|g)", ["h2[T.b]"], "y ~ x + h + (1|g)"),
    ("xtmixed", "y x i.one || g:", [], "y ~ x + (1|g)"),  # one level: no dummy at all
    ("fit", "y ~ 0 + h + one + x + (1|g)", ["one"], "y ~ x + h + (1|g)"),  # h's dummies span _cons
    ("xtmixed", "y x ibn.h || g:", ["lo.h"], "y ~ x + h + (1|g)"),  # ibn.: every level; with _cons one goes
    ("fit", "y ~ x + r + rr + (1|g)", ["rr[T.v]"], "y ~ x + r + (1|g)"),  # rr is a function of r
    ("xtmixed", "y x i.r i.rr || g:", ["v.rr"], "y ~ x + r + (1|g)"),
])
def test_collinear_columns_are_omitted_with_a_note(front, text, omitted, same_as):
    d = _frame().assign(x2=lambda d: d.x, k=5.0, one=1, h2=lambda d: d.h.map({"lo": "a", "hi": "b"}))
    if omitted is None:
        with pytest.raises(FormulaError):
            FRONT[front](text, d)
        return
    r, rec = _fit_quiet(FRONT[front], text, d)
    for name in omitted:
        assert f"{name} omitted because of collinearity" in r.notes
        assert name not in r.fixed.index
    assert len([n for n in r.notes if "collinearity" in n]) == len(omitted)
    warned = [str(w.message) for w in rec if issubclass(w.category, JaxmixedWarning)]
    assert bool(omitted) == any("collinearity" in m for m in warned)
    assert np.all(np.isfinite(r.beta)) and np.all(np.isfinite(r.fixed.se))
    # omitting the column leaves the span of X, hence the likelihood, unchanged
    base = jm.fit(same_as, d, method=r.method)
    assert r.loglik == pytest.approx(base.loglik, abs=1e-7)
    assert r.sigma == pytest.approx(base.sigma, rel=1e-6)


def test_without_intercept_a_factor_gets_every_level_as_in_r():
    d = _frame()
    a = jm.fit("y ~ 0 + h + x + (1|g)", d, method="ml")
    b = jm.fit("y ~ h + x + (1|g)", d, method="ml")
    assert list(a.fixed.index) == ["h[hi]", "h[lo]", "x"]
    assert a.loglik == pytest.approx(b.loglik, abs=1e-8)
    assert a.fixed.coef["h[lo]"] == pytest.approx(b.fixed.coef["_cons"] + b.fixed.coef["h[T.lo]"], abs=1e-8)
    # a slope per level when the interaction comes without the main effect (R's rule)
    c = jm.fit("y ~ x:h + (1|g)", d, method="ml")
    e = jm.fit("y ~ x + x:h + (1|g)", d, method="ml")
    assert sorted(c.fixed.index) == ["_cons", "x:h[hi]", "x:h[lo]"]
    assert c.loglik == pytest.approx(e.loglik, abs=1e-8)


def test_levels_with_one_observation_are_fine():
    d = _frame(n_groups=8, per=5)
    d.loc[[35, 36, 37, 38], "g"] = [100, 101, 102, 103]  # four singleton groups
    r, rec = _fit_quiet(jm.fit, "y ~ x + (1|g)", d)
    assert r.groups.loc["g", "n_groups"] == 12 and r.groups.loc["g", "min"] == 1
    assert r.converged and not r.singular and not rec
    assert np.isfinite(r.random.se).all()


# -- boundary fits -----------------------------------------------------------------------------

def test_dyestuff2_zero_variance_is_reported_as_singular():
    ref = json.loads((REF / "lme4_reference.json").read_text())["dyestuff2"]
    d = pd.read_csv(REF / "dyestuff2.csv")
    with pytest.warns(JaxmixedWarning, match="boundary"):
        r = jm.fit("Yield ~ 1 + (1|Batch)", d)
    assert r.singular and r.converged
    assert r.loglik == pytest.approx(ref["logLik"], abs=1e-6)
    assert r.sigma == pytest.approx(ref["sigma"], rel=1e-6)
    assert r.fixed.coef["_cons"] == pytest.approx(ref["fixef"]["(Intercept)"], abs=1e-6)
    assert r.theta[0] == pytest.approx(0.0, abs=1e-6)
    est = r.random.set_index("name")
    assert est.estimate["sd(_cons)"] == pytest.approx(0.0, abs=1e-5)
    assert est.se.isna().all() and est.ci_lower.isna().all()  # no fake standard errors
    assert any(n.startswith("boundary (singular) fit") for n in r.notes)
    assert "boundary (singular) fit" in str(r)
    # the Stata front end agrees
    with pytest.warns(JaxmixedWarning, match="boundary"):
        s = jm.xtmixed("Yield || Batch:", d)
    assert s.singular and s.loglik == pytest.approx(r.loglik, abs=1e-9)


def test_correlation_at_minus_one_is_reported_as_singular():
    from conftest import cached_fit

    r = cached_fit("fit", "math5 ~ math3c + (1 + math3c | school)", "jsp", method="ml", variance=True)
    assert r.singular and r.converged
    est = r.random.set_index("name").estimate
    assert est["cov(math3c,_cons)"] == pytest.approx(-math.sqrt(est["var(math3c)"] * est["var(_cons)"]), rel=1e-4)
    assert r.random.se.isna().all()
    assert any(n.startswith("boundary") for n in r.notes)


def test_non_convergence_is_a_note_and_a_warning():
    d = _frame()
    d["y"] = d.g * 1.0 + 0.5 + 0.1 * d.x  # no residual variation once the groups are known
    with pytest.warns(JaxmixedWarning, match="convergence not achieved") as rec:
        r = jm.fit("y ~ x + (1|g)", d)
    assert not r.converged
    note = [n for n in r.notes if n.startswith("convergence not achieved")]
    assert note and "starts tried: θ₀ ×" in note[0]
    assert any("starts tried" in str(w.message) for w in rec)


def test_convergence_flag_of_a_stalled_newton_step():
    """At the optimum the Newton step cannot lower f by a representable amount; the fit must
    still be reported as converged (first- and second-order conditions hold)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JaxmixedWarning)
        r = jm.fit("y ~ x + (1|g)", _frame(seed=83), method="ml")
    assert r.converged


# -- numerical range ---------------------------------------------------------------------------

def _slope_data(seed=1, G=40, m=15):
    rng = np.random.default_rng(seed)
    n = G * m
    g = np.repeat(np.arange(G), m)
    x = rng.normal(size=n)
    x2 = rng.normal(size=n)
    b0 = 0.8 * rng.normal(size=G)
    b1 = 0.5 * rng.normal(size=G)
    y = 1 + 2 * x - x2 + b0[g] + b1[g] * x + rng.normal(size=n)
    return pd.DataFrame(dict(y=y, x=x, x2=x2, g=g))


SLOPE = "y ~ x + x2 + (1 + x | g)"


@pytest.fixture(scope="module")
def slope_fits():
    d = _slope_data()
    return d, {m: jm.fit(SLOPE, d, method=m) for m in ("ml", "reml")}


def _same_up_to_scale(r, base, beta_scale, sd_scale, loglik_shift, rel=1e-6):
    assert r.converged and not r.singular
    assert r.loglik == pytest.approx(base.loglik + loglik_shift, abs=1e-6 * (1 + abs(base.loglik)))
    assert np.allclose(r.beta, base.beta * beta_scale, rtol=rel, atol=0)
    est, est0 = r.random.estimate.to_numpy(), base.random.estimate.to_numpy()
    assert np.allclose(est, est0 * sd_scale, rtol=rel, atol=0)
    assert np.allclose(r.fixed.se, base.fixed.se * np.abs(beta_scale), rtol=1e-4)


@pytest.mark.parametrize("c", [1e-8, 1e-3, 1e3, 1e6, 1e9])
@pytest.mark.parametrize("method", ["ml", "reml"])
def test_response_in_millions_or_thousandths(slope_fits, c, method):
    d, base = slope_fits
    r = jm.fit(SLOPE, d.assign(y=d.y * c), method=method)
    n, p = len(d), 3
    shift = -(n if method == "ml" else n - p) * math.log(c)
    sd_scale = np.array([c, c, 1.0, c])  # sd(x), sd(_cons), corr, sd(Residual)
    _same_up_to_scale(r, base[method], c, sd_scale, shift)


@pytest.mark.parametrize("c2", [1e-6, 1e8])
def test_fixed_covariates_on_wildly_different_scales(slope_fits, c2):
    d, base = slope_fits
    r = jm.fit(SLOPE, d.assign(x2=d.x2 * c2), method="reml")
    # REML: log|XᵀV⁻¹X| moves by 2 ln c2, so the restricted log likelihood by -ln c2
    _same_up_to_scale(r, base["reml"], np.array([1.0, 1 / c2, 1.0]), 1.0, -math.log(c2))


# A random-slope covariate on any scale: the optimiser and the boundary test work on θ in units of
# the covariate's root mean square (Design.theta_scale), so x × c gives the fit of x, in x × c's units.
SCALES = [1e-4, 1e-2, 1e2, 1e4, 1e5, 1e6]


def _fit_silently(formula, data, **kw):
    """jm.fit with a JaxmixedWarning an error: a covariate on another scale is not questionable."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", JaxmixedWarning)
        return jm.fit(formula, data, **kw)


def _scaled_like_base(r, base, c, var="x", rel=1e-5):
    """Everything reported in the data's units, after ``var`` was multiplied by ``c``: β_x, sd(x),
    its se and CI bounds, x's BLUPs and their SEs, x's rows of the random-effects covariance scale
    by 1/c; everything else, fitted values (also for new data) and wcorrelation do not move."""
    def k(names):  # the factor that takes r's numbers to base's, per random-effect name
        return np.array([c if n == var else 1.0 for n in names])

    sd_k = np.array([c if n == f"sd({var})" else 1.0 for n in base.random.name])
    for col in ["estimate", "se", "ci_lower", "ci_upper"]:
        assert np.allclose(r.random[col] * sd_k, base.random[col], rtol=rel, atol=0), col
    for se in (False, True):
        rb, bb = r.blups(se=se), base.blups(se=se)
        for key in bb:
            got = rb[key].to_numpy() * k(bb[key].columns)
            ref = bb[key].to_numpy()
            assert np.allclose(got, ref, rtol=rel, atol=rel * np.max(np.abs(ref))), (key, se)
    for key, S in base.recovariance().items():
        kk = k(S.columns)
        assert np.allclose(r.recovariance()[key].to_numpy() * np.outer(kk, kk), S.to_numpy(), rtol=rel,
                           atol=rel * np.max(np.abs(S.to_numpy())))
    assert np.allclose(r.wcorrelation().to_numpy(), base.wcorrelation().to_numpy(), rtol=rel, atol=rel)
    assert np.allclose(r.predict("fitted"), base.predict("fitted"), rtol=rel, atol=0)
    new = pd.DataFrame({"x": np.linspace(-2, 2, 9), "x2": np.linspace(1, -1, 9), "g": np.arange(9) % 4,
                        "h": np.arange(9) % 3})
    assert np.allclose(r.predict("fitted", data=new.assign(x=new.x * c)), base.predict("fitted", data=new),
                       rtol=rel, atol=rel)
    assert r.iterations[-1] == pytest.approx(r.loglik, abs=1e-9)


@pytest.mark.parametrize("c", SCALES)
@pytest.mark.parametrize("method", ["ml", "reml"])
def test_random_slope_covariate_far_from_unit_scale(slope_fits, c, method):
    d, base = slope_fits
    r = _fit_silently(SLOPE, d.assign(x=d.x * c), method=method)
    # β_x and sd(x) scale by 1/c; the ML log likelihood does not move, the restricted one by -ln c
    # (x is also a fixed effect: log|XᵀV⁻¹X| moves by 2 ln c)
    shift = 0.0 if method == "ml" else -math.log(c)
    _same_up_to_scale(r, base[method], np.array([1 / c, 1.0, 1.0]), np.array([1 / c, 1.0, 1.0, 1.0]), shift,
                      rel=1e-5)
    _scaled_like_base(r, base[method], c)


@pytest.mark.parametrize("c", [1e-4, 1e5])
def test_independent_random_slope_far_from_unit_scale(slope_fits, c):
    d, _ = slope_fits
    f = "y ~ x + x2 + (1 + x || g)"
    base = _fit_silently(f, d, method="ml")
    r = _fit_silently(f, d.assign(x=d.x * c), method="ml")
    sd_scale = np.array([1 / c if n == "sd(x)" else 1.0 for n in base.random.name])
    _same_up_to_scale(r, base, np.array([1 / c, 1.0, 1.0]), sd_scale, 0.0, rel=1e-5)
    _scaled_like_base(r, base, c)


@pytest.fixture(scope="module")
def crossed_data():
    d = _slope_data()
    rng = np.random.default_rng(11)
    h = rng.integers(0, 10, size=len(d))
    return d.assign(h=h, y=d.y + 0.7 * rng.normal(size=10)[h] + 0.4 * rng.normal(size=10)[h] * d.x)


@pytest.mark.parametrize("engine", ["dense", "sparse"])
@pytest.mark.parametrize("method,c", [("ml", 1e-4), ("reml", 1e6)])
def test_crossed_random_slope_far_from_unit_scale(crossed_data, engine, method, c):
    """The slope on the second (crossed) factor, in the dense and in the blocked engine."""

    f = "y ~ x + x2 + (1 | g) + (1 + x | h)"
    d = crossed_data
    base = _fit_silently(f, d, method=method, engine=engine)
    r = _fit_silently(f, d.assign(x=d.x * c), method=method, engine=engine)
    assert (r.engine.shape.layout is not None) == (engine == "sparse")
    sd_scale = np.array([1 / c if n == "sd(x)" else 1.0 for n in base.random.name])
    shift = 0.0 if method == "ml" else -math.log(c)
    _same_up_to_scale(r, base, np.array([1 / c, 1.0, 1.0]), sd_scale, shift, rel=1e-5)
    _scaled_like_base(r, base, c)


def test_fit_many_and_bootstrap_with_a_slope_covariate_far_from_unit_scale(slope_fits):
    """The batched fits (fit_many, and the parametric bootstrap that uses them) work in the same
    units as jm.fit: x × 1e5 gives the unscaled fits' numbers, sd(x) and β_x divided by 1e5."""
    d, base = slope_fits
    c = 1e5
    Y = d.y.to_numpy()[:, None] + np.random.default_rng(3).normal(size=(len(d), 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", JaxmixedWarning)
        m0 = jm.fit_many(SLOPE, d, responses=Y, method="ml")
        m1 = jm.fit_many(SLOPE, d.assign(x=d.x * c), responses=Y, method="ml")
    assert m1.summary.converged.all() and not m1.summary.singular.any()
    assert np.allclose(m1.loglik, m0.loglik, rtol=1e-9, atol=0)
    k = np.where(m0.random.name == "sd(x)", c, 1.0)
    for col in ["estimate", "se", "ci_lower", "ci_upper"]:
        assert np.allclose(m1.random[col] * k, m0.random[col], rtol=1e-5, atol=0), col
    one = jm.fit(SLOPE, d.assign(x=d.x * c, y=Y[:, 0]), method="ml")
    assert np.allclose(one.random.estimate, m1.random.estimate[m1.random.response == m1.responses[0]], rtol=1e-5)
    b0 = base["ml"].bootstrap(n=16, seed=2)
    b1 = _fit_silently(SLOPE, d.assign(x=d.x * c), method="ml").bootstrap(n=16, seed=2)
    assert b1.n_failed == b0.n_failed == 0 and list(b1.draws.columns) == list(b0.draws.columns)
    k = np.array([c if col == "x" or col.endswith("sd(x)") else 1.0 for col in b0.draws.columns])
    assert np.allclose(b1.draws.to_numpy() * k, b0.draws.to_numpy(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("eps", [1e-3, 1e-5])
def test_near_collinear_fixed_effects(slope_fits, eps):
    """x and x + ε z are nearly collinear; the fit equals the one on (x, z) after reparametrisation."""
    d, _ = slope_fits
    z = np.random.default_rng(7).normal(size=len(d))
    d = d.assign(xa=d.x + eps * z, z=z)
    r1 = jm.fit("y ~ x + xa + (1|g)", d)
    r2 = jm.fit("y ~ x + z + (1|g)", d)
    assert not any("collinear" in n for n in r1.notes)
    # (the flag may be False at the optimum here: see test_convergence_flag_of_a_stalled_newton_step)
    assert r2.converged and (r1.converged or any(n.startswith("convergence") for n in r1.notes))
    # β_x + β_xa = β_x' and ε β_xa = β_z; REML log likelihood moves by -ln ε (Jacobian)
    # (conditioning ~ 1/ε² costs digits: tolerances grow with 1/ε)
    assert r1.loglik == pytest.approx(r2.loglik - math.log(eps), abs=1e-10 / eps)
    assert r1.beta[0] + r1.beta[1] == pytest.approx(r2.beta[0], abs=1e-10 / eps)
    assert eps * r1.beta[1] == pytest.approx(r2.beta[1], abs=1e-10 / eps)
    assert r1.sigma == pytest.approx(r2.sigma, rel=1e-6)


def _pipes(text: str) -> str:
    return text.replace("|", "\\|")  # GitHub tables split on | even inside code spans


def _cell(msg: str) -> str:
    """A message as one markdown table cell; lines after the first (formula, caret) keep their spaces."""
    first, *rest = msg.replace("|", "\\|").split("\n")
    return "<br>".join([first] + [line.replace(" ", "&nbsp;") for line in rest])


def markdown_table() -> str:
    lines = ["| Bad input | Call | Error | Message |", "|---|---|---|---|"]
    for case in BAD_INPUTS:
        label, front, text, _, kw, _, _ = case
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", JaxmixedWarning)
            err, msg = run_case(case)
        call = f"jm.{front}({text!r}, data" + "".join(f", {k}={v!r}" for k, v in kw.items()) + ")"
        lines.append(f"| {label} | `{_pipes(call)}` | {type(err).__name__ if err else '(none)'} | <code>{_cell(msg)}</code> |")
    lines += ["", "| Questionable input | Call | Outcome | Note in the report / JaxmixedWarning |", "|---|---|---|---|"]
    for case in NOTED_INPUTS:
        label, front, text, _, kw, fragment = case
        r, notes, warned = run_noted(case)
        call = f"jm.{front}({text!r}, data)"
        outcome = f"fit: converged={r.converged}, singular={r.singular}, nobs={r.nobs}"
        said = "<br>".join([f"note: {n}" for n in notes] + [f"warning: {w}" for w in warned
                                                               if not any(w == n for n in notes)])
        said += "<br>(the same text is also a JaxmixedWarning)" if any(w in notes for w in warned) else ""
        lines.append(f"| {label} | `{_pipes(call)}` | {outcome} | {_cell(said)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
