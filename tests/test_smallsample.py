"""Small-sample inference: Satterthwaite and Kenward-Roger df, F tests, type 1/3 tables, Stata's
counting rules, profile intervals.

References: ``reference/df_public.json`` (copied unchanged from the shared reference folder:
lmerTest 3.1.3 and pbkrtest 0.5.2 on REML fits refitted to the optimum), ``reference/df_extra.json``
(made by ``reference/make_df_extra.R``: lmerTest's anova tables, an ML Satterthwaite fit, a
contrast with a right-hand side, lme4's profile intervals and exact roots of ζ).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import jaxmixed as jm
from jaxmixed.errors import FormulaError, ModelError

REF = Path(__file__).parent / "reference"
PUBLIC = json.loads((REF / "df_public.json").read_text())["cases"]
EXTRA = json.loads((REF / "df_extra.json").read_text())


def _data(name):
    return jm.datasets.load(name.replace(".csv", ""))


def _name(n):
    return "_cons" if n == "(Intercept)" else n.replace("SexFemale", "Sex[T.Female]")


def _contrast(r, names, rows):
    """The reference's contrast rows (columns in its coefficient order ``names``) in r.fixed's order."""
    rows = np.asarray(rows, float)
    L = np.zeros((len(rows), len(r.fixed)))
    for j, n in enumerate(names):
        L[:, list(r.fixed.index).index(n)] = rows[:, j]
    return L


def _rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return np.max(np.abs(a - b) / np.abs(b))


@pytest.fixture(scope="module")
def fits():
    out = {}
    for case, c in PUBLIC.items():
        d = _data(c["data_file"])
        for method in ("satterthwaite", "kroger"):
            out[case, method] = jm.fit(c["formula"], d, dfmethod=method)
    return out


@pytest.mark.parametrize("case", sorted(PUBLIC))
@pytest.mark.parametrize("method,key", [("satterthwaite", "sat"), ("kroger", "kr")])
def test_coefficients_match_lmertest_and_pbkrtest(fits, case, method, key):
    c = PUBLIC[case]
    r = fits[case, method]
    names = [_name(n) for n in np.atleast_1d(c["fixef"])]
    fx = r.fixed.loc[names]
    assert list(r.fixed.columns) == ["coef", "se", "t", "df", "p", "ci_lower", "ci_upper"]
    assert _rel(fx["coef"], np.atleast_1d(c["est"])) < 1e-6
    assert _rel(fx["se"], np.atleast_1d(c[key]["se"])) < 1e-6  # KR: the adjusted se
    df_tol = 1e-3 if key == "sat" else 1e-5  # lmerTest's df are numerically differentiated
    assert _rel(fx["df"], np.atleast_1d(c[key]["df"])) < df_tol
    assert _rel(fx["t"], np.atleast_1d(c[key]["t"])) < 1e-5
    if key == "kr":
        assert _rel(fx["p"], np.atleast_1d(c[key]["p"])) < 1e-5
    else:  # lmerTest's p carries its df's noise (17.0000052 for 17): ours at its df
        assert _rel(2 * stats.t.sf(np.abs(fx["t"]), np.atleast_1d(c[key]["df"])), np.atleast_1d(c[key]["p"])) < 1e-5
        assert _rel(fx["p"], np.atleast_1d(c[key]["p"])) < 1e-4
    # the t-based interval
    q = stats.t.ppf(0.975, fx["df"])
    np.testing.assert_allclose(fx["ci_upper"], fx["coef"] + q * fx["se"], rtol=1e-12)


@pytest.mark.parametrize("case", sorted(PUBLIC))
@pytest.mark.parametrize("method,key", [("satterthwaite", "sat"), ("kroger", "kr")])
def test_joint_tests_and_type3_tables(fits, case, method, key):
    c = PUBLIC[case]
    r = fits[case, method]
    names = [_name(n) for n in np.atleast_1d(c["fixef"])]
    for k, v in c.items():
        if k.startswith("contest") and k.endswith("_" + key):
            t = r.test(_contrast(r, names, v["L"]))
            assert t.kind == "F" and t.df1 == v["numdf"]
            assert _rel(t.stat, v["F"]) < 1e-5
            assert _rel(t.df2, v["dendf"]) < (1e-3 if key == "sat" else 1e-5)
            assert _rel(t.p, v["p"]) < (1e-4 if key == "sat" else 1e-5)
        if k.startswith("KRmodcomp") and key == "kr":  # the same L as contest_<suffix>_kr
            t = r.test(_contrast(r, names, c["contest_" + k[len("KRmodcomp_"):] + "_kr"]["L"]))
            assert _rel(t.stat, v["F_scaled"]) < 1e-5 and _rel(t.df2, v["ddf"]) < 1e-5 and _rel(t.p, v["p"]) < 1e-5
    ref = c.get(f"anova3_{key}")
    if ref is not None:
        a = r.anova(3)
        terms = list(np.atleast_1d(ref["term"]))
        assert list(a.index) == terms
        assert _rel(a["F"], np.atleast_1d(ref["F"])) < 1e-5
        assert _rel(a["dendf"], np.atleast_1d(ref["dendf"])) < (1e-3 if key == "sat" else 1e-5)
        assert _rel(a["p"], np.atleast_1d(ref["p"])) < (1e-4 if key == "sat" else 1e-5)
        assert list(a["numdf"]) == list(np.atleast_1d(ref["numdf"]))


def _dcat(d):
    d = d.copy()
    d["Dcat"] = pd.cut(d["Days"], [-1, 2, 5, 9], labels=["a", "b", "c"]).astype(str)
    return d


@pytest.mark.parametrize("key,data,formula", [
    ("anova_orthodont", "orthodont_unbal", "distance ~ age*Sex + (1|Subject)"),
    ("anova_sleep_dcat", "sleepstudy", "Reaction ~ Dcat*Days + (1|Subject)"),
])
@pytest.mark.parametrize("method,mkey", [("satterthwaite", "satterthwaite"), ("kroger", "kenward_roger")])
def test_type1_and_type3_tables_match_lmertest(key, data, formula, method, mkey):
    d = _data(data)
    if "Dcat" in formula:
        d = _dcat(d)
    r = jm.fit(formula, d, dfmethod=method)
    for typ in (1, 3):
        ref = EXTRA["lmertest"][key][mkey][f"type{typ}"]
        a = r.anova(typ)
        assert list(a.index) == ref["term"]
        assert list(a["numdf"]) == ref["NumDF"]
        for col, rk in [("F", "F"), ("p", "p"), ("sum_sq", "SumSq"), ("mean_sq", "MeanSq")]:
            assert _rel(a[col], ref[rk]) < 1e-5, (typ, col)
        assert _rel(a["dendf"], ref["DenDF"]) < (1e-3 if method == "satterthwaite" else 1e-5)


def test_satterthwaite_under_ml_and_a_contrast_with_rhs():
    ref = EXTRA["lmertest"]["summary_sleep_ml"]
    r = jm.fit("Reaction ~ Days + (Days|Subject)", _data("sleepstudy"), method="ml", dfmethod="satterthwaite")
    fx = r.fixed.loc[[_name(n) for n in ref["term"]]]
    assert _rel(fx["se"], ref["se"]) < 1e-6 and _rel(fx["df"], ref["df"]) < 1e-3 and _rel(fx["p"], ref["p"]) < 1e-5
    con = EXTRA["lmertest"]["contest_sleep_ml"]
    lc = r.lincom("Days", rhs=10)  # Stata's lincom Days - 10
    assert abs(lc["estimate"][0] - (con["t_test"]["estimate"] - 10)) < 1e-6
    assert _rel(lc["t"][0], con["t_test"]["t"]) < 1e-5 and _rel(lc["p"][0], con["t_test"]["p"]) < 1e-5
    t = r.test("Days", rhs=10)
    assert _rel(t.stat, con["F_test"]["F"]) < 1e-5 and _rel(t.df2, con["F_test"]["DenDF"]) < 1e-3


def test_no_dfmethod_gives_chi2_tests():
    r = jm.fit("distance ~ age*Sex + (1|Subject)", _data("orthodont_unbal"))
    t = r.test(["Sex[T.Female]", "age:Sex[T.Female]"])
    assert t.kind == "chi2" and np.isinf(t.df2) and t.df1 == 2
    b = r.beta[[1, 2]]
    V = r.solution.cov_beta[np.ix_([1, 2], [1, 2])]
    assert abs(t.stat - b @ np.linalg.solve(V, b)) < 1e-9
    a = r.anova(3)
    assert list(a.columns) == ["chi2", "df", "p"]
    assert "z" in r.fixed.columns and "df" not in r.fixed.columns


def test_derivatives_match_finite_differences():
    r = jm.fit("distance ~ age*Sex + (1|Subject)", _data("orthodont_unbal"))
    from jaxmixed.engine import pls
    import jax.numpy as jnp

    eng, data = r.engine, r.data
    V, J, H = eng.satterthwaite_parts(r.params, r.sigma, data, True)
    x = np.concatenate([r.params, [r.sigma]])
    h = 1e-5
    for k in range(len(x)):
        e = np.zeros(len(x))
        e[k] = h * max(1.0, abs(x[k]))
        Vp = np.asarray(pls.vcov_beta_x(jnp.asarray(x + e), data, eng.shape))
        Vm = np.asarray(pls.vcov_beta_x(jnp.asarray(x - e), data, eng.shape))
        np.testing.assert_allclose(J[k], (Vp - Vm) / (2 * e[k]), rtol=1e-6, atol=1e-9 * np.abs(J[k]).max())

        import jax

        def grad(xx):
            return np.asarray(jax.grad(pls.deviance_x)(jnp.asarray(xx), data, eng.shape, True))

        np.testing.assert_allclose(H[k], (grad(x + e) - grad(x - e)) / (2 * e[k]), rtol=1e-6, atol=1e-8 * np.abs(H).max())
    # Kenward-Roger: ∂(XᵀΣ⁻¹X)/∂γ against differences of the solve's Var(β̂)⁻¹
    Phi, P, Q, IE2 = eng.kenward_roger_parts(r.params, r.sigma, data)
    gamma = pls.gamma_of(r.params, r.sigma, eng.shape)

    def M_of(g):
        th, s = pls.theta_sigma_of_gamma(jnp.asarray(g), eng.shape)
        return np.linalg.inv(np.asarray(pls.vcov_beta_x(jnp.concatenate([th, s[None]]), data, eng.shape)))

    np.testing.assert_allclose(np.linalg.inv(M_of(gamma)), Phi, rtol=1e-9)
    for k in range(len(gamma)):
        e = np.zeros(len(gamma))
        e[k] = 1e-5 * gamma[k]
        np.testing.assert_allclose(P[k], (M_of(gamma + e) - M_of(gamma - e)) / (2 * e[k]), rtol=1e-5,
                                   atol=1e-8 * np.abs(P[k]).max())
    # second derivatives: Q against differences of P (via a second fit's parts)
    from jaxmixed.engine.pls import kenward_roger_parts
    def parts_at(g):
        th, s = pls.theta_sigma_of_gamma(jnp.asarray(g), eng.shape)
        return kenward_roger_parts(th, s, data, eng.shape)

    Qn = np.asarray(parts_at(gamma)[2])
    for k in range(len(gamma)):
        e = np.zeros(len(gamma))
        e[k] = 1e-4 * gamma[k]
        Pp = np.asarray(parts_at(gamma + e)[1])
        Pm = np.asarray(parts_at(gamma - e)[1])
        np.testing.assert_allclose(Qn[..., k], (Pp - Pm) / (2 * e[k]), rtol=1e-4, atol=1e-7 * np.abs(Qn).max())


# --- Stata's counting rules, by hand on a balanced design ---------------------------------------

@pytest.fixture(scope="module")
def balanced():
    rng = np.random.default_rng(3)
    m, T = 12, 4
    g = np.repeat(np.arange(m), T)
    trt = np.tile(np.arange(T), m)
    w = np.repeat(rng.normal(size=m), T)  # a between-subject covariate
    arm = np.repeat(np.arange(m) % 2, T)  # a between-subject factor
    y = 1 + 0.5 * w + 0.3 * arm + 0.2 * trt + np.repeat(rng.normal(size=m), T) + rng.normal(size=m * T)
    return pd.DataFrame({"y": y, "g": g, "trt": trt, "w": w, "arm": arm})


def test_residual_and_repeated_df_by_hand(balanced):
    n, m = len(balanced), 12
    cmd = "y w i.arm i.trt || g:, reml"
    r = jm.mixed(cmd.replace("reml", "reml dfmethod(residual)"), balanced)
    p = len(r.fixed)  # w, arm, 3 trt dummies, _cons
    assert p == 6
    np.testing.assert_array_equal(r.fixed["df"], n - p)
    rr = jm.mixed(cmd.replace("reml", "reml dfmethod(repeated)"), balanced)
    between = ["w", "1.arm", "_cons"]
    p_b, p_w = 3, 3
    for name, row in rr.fixed.iterrows():
        assert row["df"] == (m - p_b if name in between else n - m - p_w), name
    ra = jm.mixed(cmd.replace("reml", "reml dfmethod(anova)"), balanced)
    np.testing.assert_array_equal(ra.fixed["df"], rr.fixed["df"])  # two levels: the same rule
    # the F header: every coefficient but _cons, ddf the smallest df among them
    assert rr.f_test.df1 == 5 and rr.f_test.df2 == m - p_b
    text = str(rr)
    assert "DF method: Repeated" in text and "F(5,9.00)" in text and "P>|t|" in text
    # t-based p values with those df
    row = rr.fixed.loc["w"]
    assert abs(row["p"] - 2 * stats.t.sf(abs(row["t"]), m - p_b)) < 1e-12


def test_stata_front_end_and_refusals(balanced):
    d = _data("sleepstudy")
    a = jm.mixed("Reaction Days || Subject: Days, reml cov(unstructured) dfmethod(kroger)", d)
    b = jm.fit("Reaction ~ Days + (Days|Subject)", d, dfmethod="kroger")
    np.testing.assert_allclose(a.fixed["df"], b.fixed["df"], rtol=1e-8)
    assert "DF method: Kenward-Roger" in str(a)
    with pytest.raises(ModelError, match="REML"):
        jm.mixed("Reaction Days || Subject:, dfmethod(satterthwaite)", d)  # Stata: not under mle
    with pytest.raises(ModelError, match="REML"):
        jm.fit("Reaction ~ Days + (1|Subject)", d, method="ml", dfmethod="kroger")
    with pytest.raises(ModelError, match="unknown dfmethod"):
        jm.fit("Reaction ~ Days + (1|Subject)", d, dfmethod="containment")
    with pytest.raises(FormulaError, match="dfmethod"):
        jm.mixed("Reaction Days || Subject:, reml dfmethod(bogus)", d)
    with pytest.raises(ModelError, match="random-intercept"):
        jm.fit("Reaction ~ Days + (Days|Subject)", d, dfmethod="repeated")
    with pytest.raises(ModelError, match="linear mixed models"):
        jm.fit("incidence ~ period + (1|herd)", jm.datasets.load("cbpp").assign(incidence=lambda x: x.incidence > 0),
               family="binomial", dfmethod="kroger")
    with pytest.raises(ModelError, match="linear mixed models"):
        jm.melogit("use_Y age || district:, dfmethod(kroger)", jm.datasets.load("contraception"))
    r = jm.fit("Reaction ~ Days + (1|Subject)", d, dfmethod="satterthwaite")
    with pytest.raises(ModelError, match="not a fixed-effect coefficient"):
        r.test("day")
    with pytest.raises(ModelError, match="columns"):
        r.test(np.ones(3))
    with pytest.raises(ModelError, match="inconsistent"):
        r.test([[0, 1], [0, 2]], rhs=[1, 1])
    with pytest.raises(ModelError, match="rhs has 3 values for 2"):
        r.test([[1, 0], [0, 1]], rhs=[1, 2, 3])
    with pytest.raises(ModelError, match="rhs must be a number"):
        r.test("Days", rhs="a")
    with pytest.raises(ModelError, match="no non-zero row"):
        r.test(np.zeros((1, 2)))
    with pytest.raises(ModelError, match="type must be 1 or 3"):
        r.anova(type=2)
    with pytest.raises(ModelError, match="confint method"):
        r.confint("bogus")


# --- profile intervals ---------------------------------------------------------------------------

PROFILE_NAMES = {
    "sd_(Intercept)|Subject": "Subject: sd(_cons)", "sd_Days|Subject": "Subject: sd(Days)",
    "cor_Days.(Intercept)|Subject": "Subject: corr(Days,_cons)", "sigma": "sd(Residual)",
    "sd_(Intercept)|plate": "plate: sd(_cons)", "sd_(Intercept)|sample": "sample: sd(_cons)",
    "sd_(Intercept)|g": "g: sd(_cons)", "(Intercept)": "_cons", "Days": "Days", "x": "x",
}


@pytest.mark.filterwarnings("ignore:boundary")
@pytest.mark.parametrize("case,data,formula", [
    ("sleepstudy_reml", "sleepstudy", "Reaction ~ Days + (Days|Subject)"),
    ("penicillin_reml", "penicillin", "diameter ~ 1 + (1|plate) + (1|sample)"),
    ("boundary_ml", None, "y ~ x + (1|g)"),
])
def test_profile_intervals_match_lme4(case, data, formula):
    ref = EXTRA["profile"][case]
    d = pd.read_csv(REF / "profile_boundary.csv", dtype={"g": str}) if data is None else _data(data)
    r = jm.fit(formula, d, method="reml" if ref["REML"] else "ml")
    ci = r.confint("profile")
    assert list(ci.columns) == ["estimate", "lower", "upper"]
    for key, tol in (("exact_root_ci", 1e-4), ("profile_ci", 1e-3)):
        if key == "profile_ci" and ref["singular"]:
            continue  # lme4's spline falls back to linear interpolation there (its own warnings)
        refci = ref[key]
        for parm, lo, hi in zip(refci["parm"], refci["lower"], refci["upper"]):
            row = ci.loc[PROFILE_NAMES[parm]]
            for ours, theirs in ((row["lower"], lo), (row["upper"], hi)):
                assert abs(ours - theirs) <= tol * max(abs(theirs), 1e-2), (parm, ours, theirs)
    if ref["singular"]:
        assert ci.loc["g: sd(_cons)", "lower"] == 0.0
    wald = r.confint("wald")
    np.testing.assert_allclose(wald.loc[list(r.fixed.index), "lower"], r.fixed["ci_lower"], rtol=1e-12)


def test_command_line_dfmethod(tmp_path, capsys):
    from jaxmixed.app.cli import main

    path = tmp_path / "sleep.csv"
    _data("sleepstudy").to_csv(path, index=False)
    assert main(["fit", str(path), "Reaction ~ Days + (Days|Subject)", "--dfmethod", "kroger", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dfmethod"] == "kroger" and abs(out["fixed"]["Days"]["df"] - 17) < 1e-6
    assert abs(out["f_test"]["F"] - PUBLIC["sleepstudy"]["anova3_kr"]["F"]) < 1e-4
    assert main(["fit", str(path), "mixed Reaction Days || Subject:, reml dfmethod(residual)", "--stata", "--nolog"]) == 0
    text = capsys.readouterr().out
    assert "DF method: Residual" in text and "F(1,178.00)" in text


def test_tidy_html_and_latex_use_t():
    r = jm.fit("Reaction ~ Days + (Days|Subject)", _data("sleepstudy"), dfmethod="satterthwaite")
    t = r.tidy()
    fixed = t[t.effect == "fixed"].set_index("term")
    np.testing.assert_allclose(fixed["df"], r.fixed["df"])
    np.testing.assert_allclose(fixed["statistic"], r.fixed["t"])
    assert "P&gt;|t|" in r._repr_html_() or "P>|t|" in r._repr_html_()
    assert "P>|t|" in r.to_latex()


def _ar1_data(seed=5, m=30, T=6):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(m), T)
    t = np.tile(np.arange(T), m)
    x = rng.normal(size=m * T)
    e = np.zeros(m * T)
    for i in range(m):
        z = rng.normal(size=T)
        for k in range(T):
            e[i * T + k] = z[k] if k == 0 else 0.6 * e[i * T + k - 1] + np.sqrt(1 - 0.36) * z[k]
    y = 1 + 0.5 * x + 0.3 * t + np.repeat(rng.normal(size=m), T) * 0.8 + e
    return pd.DataFrame({"y": y, "x": x, "t": t, "g": g.astype(str)})


def test_kenward_roger_with_ar1_residuals_matches_a_dense_computation():
    """Kenward and Roger's (1997) formulas with second derivatives of Σ, written out on the
    dense per-subject V_i = τ²J + s²ρ^|j−k| (no autodiff), against the engine's."""
    d = _ar1_data()
    r = jm.fit("y ~ x + t + (1|g)", d, residuals=jm.ar(1, time="t"), dfmethod="kroger")
    assert not r.singular
    tau2 = r.random["estimate"].iloc[0] ** 2
    s2 = r.random["estimate"].iloc[1] ** 2
    rho = r.random["estimate"].iloc[2]
    T = 6
    lag = np.abs(np.subtract.outer(np.arange(T), np.arange(T)))
    A = rho ** lag
    V = tau2 * np.ones((T, T)) + s2 * A
    dV = [np.ones((T, T)), A, s2 * lag * rho ** np.maximum(lag - 1, 0) * (lag > 0)]
    d2 = np.zeros((3, 3, T, T))
    d2[1, 2] = d2[2, 1] = lag * rho ** np.maximum(lag - 1, 0) * (lag > 0)
    d2[2, 2] = s2 * lag * (lag - 1) * rho ** np.maximum(lag - 2, 0) * (lag > 1)
    Xs = [np.column_stack([grp["x"], grp["t"], np.ones(T)]) for _, grp in d.groupby("g", sort=False)]
    Vi = np.linalg.inv(V)
    M = sum(X.T @ Vi @ X for X in Xs)
    Phi = np.linalg.inv(M)
    P = np.array([-sum(X.T @ Vi @ dV[a] @ Vi @ X for X in Xs) for a in range(3)])
    Q = np.array([[sum(X.T @ Vi @ dV[a] @ Vi @ dV[b] @ Vi @ X for X in Xs) for b in range(3)] for a in range(3)])
    R = np.array([[sum(X.T @ Vi @ d2[a, b] @ Vi @ X for X in Xs) for b in range(3)] for a in range(3)])
    IE = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            # tr(P V_a P V_b) with P = V⁻¹ − V⁻¹XΦXᵀV⁻¹ (pbkrtest's expansion)
            tr1 = len(Xs) * np.trace(Vi @ dV[a] @ Vi @ dV[b])
            IE[a, b] = tr1 - 2 * np.trace(Phi @ Q[a, b]) + np.trace(Phi @ P[a] @ Phi @ P[b])
    W = 2 * np.linalg.inv(IE)
    U = sum(W[a, b] * (Q[a, b] - P[a] @ Phi @ P[b] - 0.25 * R[a, b]) for a in range(3) for b in range(3))
    PhiA = Phi + 2 * Phi @ U @ Phi
    order = [list(r.fixed.index).index(n) for n in ("x", "t", "_cons")]
    np.testing.assert_allclose(r.small.vcov_model[np.ix_(order, order)], Phi, rtol=1e-6)
    np.testing.assert_allclose(r.small.vcov[np.ix_(order, order)], PhiA, rtol=1e-6)
    # and the per-coefficient ddf (pbkrtest's formula on these P, W)
    from jaxmixed.inference.smallsample import SmallSample, _kr_ddf

    ss = SmallSample("kroger", PhiA, Phi, np.zeros(3), P=P, W=W)
    for k, name in enumerate(("x", "t", "_cons")):
        assert abs(_kr_ddf(ss, np.eye(3)[k][None])[0] - r.fixed.loc[name, "df"]) < 1e-5 * r.fixed.loc[name, "df"]


def test_boundary_fit_matches_pbkrtest_and_lmertest():
    """A singular fit (sd 0): derivatives taken just inside the cone (pls.interior_covariance);
    pbkrtest 0.5.2 via lmerTest: summary(lmer(y ~ x + (1|g), profile_boundary.csv), ddf = "Kenward-Roger")."""
    d = pd.read_csv(REF / "profile_boundary.csv", dtype={"g": str})
    with pytest.warns(Warning, match="boundary"):
        r = jm.fit("y ~ x + (1|g)", d, dfmethod="kroger")
    ref = EXTRA["lmertest"]["boundary_kr"]
    fx = r.fixed.loc[["_cons", "x"]]
    assert _rel(fx["se"], ref["se"]) < 1e-6 and _rel(fx["df"], ref["df"]) < 1e-5
    # Satterthwaite leaves the zero variance out of x, as lmerTest's answer does (n − p here)
    with pytest.warns(Warning, match="boundary"):
        r = jm.fit("y ~ x + (1|g)", d, dfmethod="satterthwaite")
    ref = EXTRA["lmertest"]["boundary_sat"]
    fx = r.fixed.loc[["_cons", "x"]]
    assert _rel(fx["se"], ref["se"]) < 1e-6 and _rel(fx["df"], ref["df"]) < 1e-6


def test_estat_df_lists_every_method_without_refitting(balanced):
    r = jm.mixed("y w i.arm i.trt || g:, reml", balanced)
    t = r.estat_df()
    assert list(t.columns) == ["Residual", "Repeated", "ANOVA", "Satterthwaite", "Kenward-Roger"]
    for method, col in [("repeated", "Repeated"), ("kroger", "Kenward-Roger")]:
        one = jm.mixed(f"y w i.arm i.trt || g:, reml dfmethod({method})", balanced)
        np.testing.assert_allclose(t[col], one.fixed["df"], rtol=1e-8)
    with pytest.raises(ModelError, match="REML"):
        jm.mixed("y w i.arm i.trt || g:", balanced).estat_df("kroger")


def _kr_parts_by_n_by_n(r):
    """Kenward-Roger's parts from their definitions with n × n matrices (V = Σ_r γ_r G_r):
    M = X̃ᵀV⁻¹X̃, ∂_rM = −X̃ᵀV⁻¹G_rV⁻¹X̃, ∂_r∂_sM = X̃ᵀV⁻¹(G_rV⁻¹G_s + G_sV⁻¹G_r)V⁻¹X̃,
    IE2_rs = tr(PG_rPG_s) with P = V⁻¹ − V⁻¹X̃M⁻¹X̃ᵀV⁻¹."""
    import jax.numpy as jnp
    from jaxmixed.engine import pls

    sh, des = r.engine.shape, r.design
    n = des.nobs
    Zs = []
    for f in des.factors:
        q = f.Z.shape[1]
        Zf = np.zeros((n, f.n_levels * q))
        for j in range(q):
            Zf[np.arange(n), f.codes * q + j] = f.Z[:, j]
        Zs.append(Zf)
    G = []
    for t in sh.terms:
        qf, (a, b) = des.factors[t.factor].Z.shape[1], t.cols
        for k in range(t.theta[1] - t.theta[0]):
            E = np.zeros((qf, qf))
            E[a:b, a:b] = np.asarray(t.structure.sigma_from_gamma(jnp.eye(t.theta[1] - t.theta[0])[k]))
            Zf = Zs[t.factor]
            G.append(Zf @ np.kron(np.eye(des.factors[t.factor].n_levels), E) @ Zf.T)
    G.append(np.eye(n))
    gamma = np.asarray(pls.gamma_of(np.asarray(r.params), np.asarray(r.sigma), sh))
    V = sum(g * Gr for g, Gr in zip(gamma, G))
    Vi = np.linalg.inv(V)
    X = np.asarray(des.fixed_basis[0])
    M = X.T @ Vi @ X
    T = [Vi @ Gr @ Vi for Gr in G]
    P = np.stack([-X.T @ Tr @ X for Tr in T], -1)
    k = len(G)
    Q = np.zeros(M.shape + (k, k))
    Pn = Vi - Vi @ X @ np.linalg.solve(M, X.T @ Vi)
    PG = [Pn @ Gr for Gr in G]
    IE2 = np.zeros((k, k))
    for a in range(k):
        for b in range(k):
            Q[:, :, a, b] = X.T @ (T[a] @ G[b] + T[b] @ G[a]) @ Vi @ X
            IE2[a, b] = np.sum(PG[a] * PG[b].T)
    return M, P, Q, IE2


@pytest.mark.parametrize("data, formula, check_autodiff", [
    ("sleepstudy", "Reaction ~ Days + (Days|Subject)", True),
    ("sleepstudy", "Reaction ~ Days + (1|Subject) + (0 + Days|Subject)", False),
    ("sleepstudy", "Reaction ~ Days + homdiag(1 + Days|Subject)", False),
    ("penicillin", "diameter ~ 1 + (1|plate) + (1|sample)", True),
    ("pig", "weight ~ week + homcs(week|id)", False),
    ("pig", "weight ~ week + diag(week|id) + (1|week)", True),
    ("pig", "weight ~ week + (week|week) + (1|id)", False),  # a boundary fit
])
def test_kenward_roger_closed_form_matches_n_by_n_definitions_and_autodiff(data, formula, check_autodiff):
    """Small dense models get Kenward-Roger's parts in closed form (pls_dense.kenward_roger_closed).
    They must equal the n × n definitions to rounding on every covariance structure, and the
    autodiff program (second derivatives of log|Σ| + log|XᵀΣ⁻¹X| through the factorisation) on a
    random slope and two crossed models (each costs an XLA compile, so not on every case). On the
    boundary fit (a correlation of ±1, Σ moved 1e-9 inside the cone) the autodiff path's
    derivatives through the near-singular γ → θ map lose ~4 digits (measured: 1e-4 relative in
    ∂²M); the closed form does not go through θ."""
    boundary = "week|week" in formula
    import jax
    from jaxmixed.engine import pls, pls_dense

    if boundary:
        with pytest.warns(Warning, match="boundary"):
            r = jm.fit(formula, _data(data))
    else:
        r = jm.fit(formula, _data(data))
    sh = r.engine.shape
    assert pls.closed_form_kr(sh)
    th, sg = np.asarray(r.params), np.asarray(r.sigma)
    closed = jax.jit(lambda t, s, a: pls_dense.kenward_roger_closed(pls.gamma_of(t, s, sh), a, sh))(th, sg, r.data)
    exact = _kr_parts_by_n_by_n(r)
    for c, e in zip(closed, exact):
        c = np.asarray(c)
        assert c.shape == e.shape
        np.testing.assert_allclose(c, e, rtol=0, atol=1e-10 * np.abs(e).max())
    if check_autodiff:
        auto = jax.jit(lambda t, s, a: pls._kenward_roger_autodiff(t, s, a, sh))(th, sg, r.data)
        for a, e in zip(auto, exact):
            np.testing.assert_allclose(np.asarray(a), e, rtol=0, atol=1e-9 * np.abs(e).max())
    # and the engine's call (the cached program) takes the closed form
    Phi, P, Q, IE2 = r.engine.kenward_roger_parts(r.params, r.sigma, r.data)
    np.testing.assert_allclose(IE2, exact[3], rtol=0, atol=1e-11 * np.abs(exact[3]).max())
