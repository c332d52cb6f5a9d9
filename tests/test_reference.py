"""Acceptance: every seed model reproduces Stata's printed numbers (reference/seed_stata.json) and
the JSP models reproduce the independent fits on the public data (reference/jsp_public.json)."""

import math

import numpy as np
import pytest

from conftest import cached_fit


def agree(actual, expected, digits):
    """True when actual equals expected to `digits` significant digits: |a-e| ≤ 5·10^-digits·|e|."""
    if expected == 0:
        return abs(actual) < 10.0 ** (-digits)
    return abs(actual - expected) <= 5.0 * 10.0 ** (-digits) * abs(expected)


def check_rows(table, ref_rows, digits, lookup, loose=(), loose_digits=2):
    """Compare [estimate, se, lo, hi] rows; `lookup(key)` finds our row for a reference key."""
    failures = []
    for key, ref in ref_rows.items():
        ours = lookup(key)
        d = loose_digits if key in loose else digits
        for what, a, e in zip(("estimate", "se", "ci_lower", "ci_upper"), ours, ref):
            if not agree(a, e, d):
                failures.append(f"{key} {what}: {a:.7g} vs {e:.7g} ({d} digits)")
    assert not failures, "\n".join(failures)


def random_lookup(r, group_map=None):
    group_map = group_map or {}

    def lookup(key):
        if ": " in key:
            group, name = key.split(": ")
            group = group_map.get(group, group)
            rows = r.random[(r.random.group == group) & (r.random.name == name)]
        else:
            rows = r.random[r.random.name == key]
        assert len(rows) == 1, f"{key}: {len(rows)} rows in\n{r.random}"
        row = rows.iloc[0]
        return [row.estimate, row.se, row.ci_lower, row.ci_upper]

    return lookup


def fixed_lookup(r):
    def lookup(key):
        row = r.fixed.loc[key]
        return [row.coef, row.se, row.ci_lower, row.ci_upper]

    return lookup


PIG_FORMS = [
    ("xtmixed", "weight week || _all: R.id || _all: R.week"),
    ("xtmixed", "weight week || _all: R.id || week:"),
    ("xtmixed", "weight week || _all: R.week || id:"),
    ("fit", "weight ~ week + (1|id) + (1|week)"),
]


def pig_lookup(r, text):
    """Map the seed's names (sd(R.id), sd(R.week)) to the row of the same variance in each form."""
    base = random_lookup(r)
    alias = {
        "weight week || _all: R.id || week:": {"sd(R.week)": "week: sd(_cons)"},
        "weight week || _all: R.week || id:": {"sd(R.id)": "id: sd(_cons)"},
        "weight ~ week + (1|id) + (1|week)": {"sd(R.id)": "id: sd(_cons)", "sd(R.week)": "week: sd(_cons)"},
    }.get(text, {})
    return lambda key: base(alias.get(key, key))


@pytest.mark.parametrize("kind,text", PIG_FORMS)
def test_pig_crossed(kind, text, seed_ref):
    ref = seed_ref["pig_R_id_R_week"]
    r = cached_fit(kind, text, "pig")
    assert r.method == "reml" and r.nobs == ref["nobs"]
    assert abs(r.loglik - ref["loglik"]) <= 2e-4
    assert r.converged and not r.singular
    check_rows(r.fixed, ref["fixed"], 4, fixed_lookup(r))
    check_rows(r.random, ref["random"], 4, pig_lookup(r, text))
    assert agree(r.wald[0], ref["wald_chi2"], 4) and r.wald[1] == ref["wald_df"]
    stat, df, p, kind_ = r.lr_vs_linear
    assert abs(stat - ref["lr_vs_linear"]["stat"]) < 0.01 and df == 2 and kind_ == "chi2"


def test_pig_group_table(seed_ref):
    r = cached_fit("xtmixed", "weight week || _all: R.week || id:", "pig")
    for level, (n, lo, avg, hi) in seed_ref["pig_R_id_R_week"]["groups_for_R_week_then_id"].items():
        row = r.groups.loc[level]
        assert (row.n_groups, row["min"], round(row["mean"], 1), row["max"]) == (n, lo, avg, hi)
    text = str(r)
    assert "_all: Identity" in text and "sd(R.week)" in text and "id: Identity" in text


PROD = {
    "productivity_region_state": [
        ("xtmixed", "gsp private emp hwy water other unemp || region: || state:"),
        ("fit", "gsp ~ private + emp + hwy + water + other + unemp + (1|region) + (1|region:state)"),
    ],
    "productivity_region_slopes": [
        ("xtmixed", "gsp private emp hwy water other unemp || region: hwy unemp || state:, nolog nogroup nofetable"),
        ("fit", "gsp ~ private + emp + hwy + water + other + unemp + (1 + hwy + unemp || region) + (1|region:state)"),
    ],
    "productivity_region_identity_block": [
        ("xtmixed", "gsp private emp hwy water other unemp || region: hwy unemp, cov(identity) || region: || state:, nolog nogroup nofetable"),
        ("fit", "gsp ~ private + emp + hwy + water + other + unemp + homdiag(0 + hwy + unemp | region) + (1|region) + (1|region:state)"),
    ],
}


@pytest.mark.parametrize("key,kind,text", [(k, kd, t) for k, forms in PROD.items() for kd, t in forms])
def test_productivity(key, kind, text, seed_ref):
    ref = seed_ref[key]
    r = cached_fit(kind, text, "productivity")
    assert r.nobs == ref["nobs"] == 816
    assert abs(r.loglik - ref["loglik"]) <= 2e-4, r.loglik
    assert r.converged and not r.singular
    if "fixed" in ref:
        check_rows(r.fixed, ref["fixed"], 4, fixed_lookup(r))
    loose = [k for k in ref["random"] if k.startswith("region:")] if key == "productivity_region_slopes" else []
    group_map = {"state": "region:state"} if kind == "fit" else {}
    check_rows(r.random, ref["random"], 4, random_lookup(r, group_map), loose=loose)
    assert agree(r.wald[0], ref["wald_chi2"], 4) and r.wald[1] == ref["wald_df"]
    stat, df, _, kind_ = r.lr_vs_linear
    assert abs(stat - ref["lr_vs_linear"]["stat"]) < 0.01 and df == ref["lr_vs_linear"]["df"] and kind_ == "chi2"


def test_productivity_groups(seed_ref):
    r = cached_fit("xtmixed", PROD["productivity_region_state"][0][1], "productivity")
    for level, (n, lo, avg, hi) in seed_ref["productivity_region_state"]["groups"].items():
        row = r.groups.loc[level]
        assert (row.n_groups, row["min"], round(row["mean"], 1), row["max"]) == (n, lo, avg, hi)


JSP = {
    "ri_reml": [("fit", "math5 ~ math3c + (1|school)", {}), ("xtmixed", "math5 math3c || school:", {})],
    "slope_indep_reml": [("fit", "math5 ~ math3c + (1 + math3c || school)", {}),
                         ("xtmixed", "math5 math3c || school: math3c", {})],
}


@pytest.mark.parametrize("key,kind,text,kw", [(k, kd, t, kw) for k, forms in JSP.items() for kd, t, kw in forms])
def test_jsp_public(key, kind, text, kw, jsp_ref):
    ref = jsp_ref[key]
    r = cached_fit(kind, text, "jsp", **kw)
    assert abs(r.loglik - ref["loglik"]) <= 2e-4
    assert r.converged and not r.singular
    for name, (coef, se) in ref["fixed"].items():
        assert agree(r.fixed.loc[name, "coef"], coef, 4) and agree(r.fixed.loc[name, "se"], se, 4)
    check_rows(r.random, ref["random"], 4, random_lookup(r))
    assert abs(r.lr_vs_linear[0] - ref["lr_vs_linear_stat"]) < 0.01
    if key == "ri_reml":
        assert r.lr_vs_linear[3] == "chibar2(01)"
        assert math.isclose(r.lr_vs_linear[2], 0.5 * __import__("scipy").stats.chi2.sf(r.lr_vs_linear[0], 1))


@pytest.mark.parametrize("kind,text,kw", [
    ("fit", "math5 ~ math3c + (1 + math3c | school)", {"method": "ml", "variance": True}),
    ("xtmixed", "math5 math3c || school: math3c, cov(unstructured) variance mle", {}),
])
def test_jsp_unstructured_ml_is_singular(kind, text, kw, jsp_ref):
    ref = jsp_ref["slope_unstructured_ml"]
    r = cached_fit(kind, text, "jsp", **kw)
    assert r.method == "ml"
    assert abs(r.loglik - ref["loglik"]) <= 2e-4
    assert r.singular
    for name, (coef, se) in ref["fixed"].items():
        assert agree(r.fixed.loc[name, "coef"], coef, 4) and agree(r.fixed.loc[name, "se"], se, 4)
    est = r.random.set_index("name").estimate
    for name in ("var(math3c)", "var(_cons)", "var(Residual)"):
        assert agree(est[name], ref["estimates_only"][name], 3)
    # the correlation is -1: cov = -sd1*sd2
    cov = est["cov(math3c,_cons)"]
    assert agree(cov, -math.sqrt(est["var(math3c)"] * est["var(_cons)"]), 4)
    # no fake standard errors on the boundary
    assert r.random.se.isna().all() and r.random.ci_lower.isna().all()
    assert abs(r.lr_vs_linear[0] - ref["lr_vs_linear_stat"]) < 0.01
    assert "singular" in str(r)
