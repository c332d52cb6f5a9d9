"""The Stata-style text report of a FitResult (header, tables, tests, notes)."""

from __future__ import annotations

import math

import numpy as np

RULE = "-" * 78


def stata_g(x: float) -> str:
    """A number as Stata's %9.0g shows it: ≤ 7 significant digits, ≤ 8 characters, no leading 0."""
    if x is None or not np.isfinite(x):
        return "."
    if x == 0:
        return "0"
    a = abs(x)
    e = math.floor(math.log10(a))
    if e >= 7 or e < -7:
        s = f"{a:.3e}"
    else:
        dec = max(0, 6 - e if e >= 0 else min(7, 6 - e))
        s = f"{a:.{dec}f}"
        if "." in s:
            s = s.rstrip("0").rstrip(".")
        if s.startswith("0."):
            s = s[1:]
    return ("-" if x < 0 else "") + s


def _num(x, width, fmt):
    return f"{'.':>{width}}" if x is None or not np.isfinite(x) else f"{x:{width}{fmt}}"


_GLMM_TITLES = {("binomial", "logit"): "logistic", ("binomial", "probit"): "probit",
                ("binomial", "cloglog"): "complementary log-log", ("poisson", "log"): "Poisson",
                ("negbinomial", "log"): "negative binomial"}
_EFORM = {("binomial", "logit"): "Odds Ratio", ("poisson", "log"): "IRR", ("negbinomial", "log"): "IRR"}


def glmm_title(r) -> str:
    """"Mixed-effects logistic regression", ..., or "Mixed-effects GLM"."""
    what = _GLMM_TITLES.get((r.family, r.link))
    if what is None or r.display.get("title") == "meglm":
        return "Mixed-effects GLM"
    return f"Mixed-effects {what} regression"


def _family_word(r) -> str:
    from jaxmixed.model.family import family_of

    fam = family_of(r.family)
    if fam.name == "binomial":
        m = r.data.m
        return "Bernoulli" if bool(np.all(np.asarray(m) == 1)) else "binomial"
    return fam.title


def _header(r, show_groups: bool = True) -> list[str]:
    glmm = getattr(r, "family", None) is not None
    kind = "REML" if r.method == "reml" else "ML"
    ll_name = "Log restricted-likelihood" if r.method == "reml" else "Log likelihood"
    out = []
    left = glmm_title(r) if glmm else f"Mixed-effects {kind} regression"
    out.append(f"{left:<48}Number of obs      = {r.nobs:>9,}")
    g = r.groups
    if len(g) == 1 and show_groups:
        lev = g.index[0]
        row = g.iloc[0]
        out.append(f"{'Group variable: ' + str(lev):<48}Number of groups   = {int(row.n_groups):>9}")
        out.append("")
        out.append(f"{'':<48}Obs per group: min = {int(row['min']):>9}")
        out.append(f"{'':<48}               avg = {row['mean']:>9.1f}")
        out.append(f"{'':<48}               max = {int(row['max']):>9}")
    elif show_groups:
        out.append("")
        out.append("-" * 59)
        out.append(f"{'':16}|   No. of       Observations per Group")
        out.append(f"{' Group Variable':<16}|   Groups    Minimum    Average    Maximum")
        out.append("-" * 16 + "+" + "-" * 42)
        for lev, row in g.iterrows():
            out.append(f"{str(lev)[:15]:>15} | {int(row.n_groups):>8} {int(row['min']):>10} "
                       f"{row['mean']:>10.1f} {int(row['max']):>10}")
        out.append("-" * 59)
    if glmm:
        out.append("")
        if glmm_title(r) == "Mixed-effects GLM":
            out.append(f"Family: {_family_word(r)}")
            out.append(f"Link: {r.link}")
            out.append("")
        method = ("Laplace" if r.nagq == 1 else "Laplace, β in PIRLS (nAGQ = 0)" if r.nagq == 0 else
                  "mvaghermite" if r.method == "agq" else "ghermite")
        pts = f"Integration pts.   = {r.nagq:>9}" if r.nagq > 1 else ""
        out.append(f"{'Integration method: ' + method:<48}{pts}".rstrip())
    small = getattr(r, "small", None)
    if small is not None:  # Stata's dfmethod() header: the method, df min/avg/max, F(k, ddf)
        df = np.asarray(small.df, dtype=float)
        out.append(f"{'DF method: ' + small.title:<48}DF:           min = {df.min():>9.2f}")
        out.append(f"{'':<48}              avg = {df.mean():>9.2f}")
        out.append(f"{'':<48}              max = {df.max():>9.2f}")
    out.append("")
    if small is not None:
        ft = r.f_test
        if ft is None:
            out.append(f"{ll_name + ' = ' + f'{r.loglik:.4f}':<48}")
        else:
            head = f"F({ft.df1},{ft.df2:.2f})"
            out.append(f"{'':<48}{head:<19}= {_num(ft.stat, 9, '.2f')}")
            out.append(f"{ll_name + ' = ' + f'{r.loglik:.4f}':<48}Prob > F           = {_num(ft.p, 9, '.4f')}")
        return out
    chi2, df, p = r.wald
    out.append(f"{'':<48}{'Wald chi2(' + str(df) + ')':<19}= {_num(chi2, 9, '.2f')}")
    out.append(f"{ll_name + ' = ' + f'{r.loglik:.4f}':<48}Prob > chi2        = {_num(p, 9, '.4f')}")
    return out


def fixed_statistic(r) -> str:
    """The fixed-effects table's test statistic column: "t" with a df method, else "z"."""
    return "t" if "t" in r.fixed.columns else "z"


def _fixed(r) -> list[str]:
    lvl = f"{r.level:g}"
    out = [RULE]
    eform = bool(r.display.get("eform"))
    response = r.display.get("response") or r.design.response
    head = "     Coef."
    if eform:
        head = f"{_EFORM.get((r.family, r.link), 'exp(b)'):>10}"
    stat = fixed_statistic(r)
    out.append(f"{response[:12]:>12} | {head}   Std. Err.      {stat}    P>|{stat}|     [{lvl}% Conf. Interval]")
    out.append("-" * 13 + "+" + "-" * 64)
    for name, row in r.fixed.iterrows():
        coef, se, lo, hi = row.coef, row.se, row.ci_lower, row.ci_upper
        if eform:  # exp(b), its delta-method se, the exponentiated interval (Stata's or / irr)
            coef, se, lo, hi = np.exp(coef), np.exp(coef) * se, np.exp(lo), np.exp(hi)
        out.append(f"{str(name)[:12]:>12} | {stata_g(coef):>10} {stata_g(se):>10} {_num(row[stat], 8, '.2f')}"
                   f" {_num(row.p, 7, '.3f')}    {stata_g(lo):>10}  {stata_g(hi):>10}")
    out.append(RULE)
    return out


def _random(r) -> list[str]:
    lvl = f"{r.level:g}"
    sep = "-" * 29 + "+" + "-" * 48
    out = [RULE, f"  Random-effects Parameters  |   Estimate   Std. Err.     [{lvl}% Conf. Interval]", sep]
    rows = r.random.to_dict("records")
    pos = 0
    for tb in r.design.terms:  # one block per term, titled "level: Structure"
        title = f"{tb.term.label}: {tb.structure.title}"
        out.append(f"{title[:28]:<28} |")
        out += [_re_line(row) for row in rows[pos:pos + tb.structure.n_eta]]
        pos += tb.structure.n_eta
        out.append(sep)
    if getattr(r.engine, "residual_title", None):
        title = "Residual: " + r.engine.residual_title
        out.append(f"{title:<28} |" if len(title) <= 28 else title)
    rest = [_re_line(row) for row in rows[pos:]]
    if not rest and out[-1] == sep:  # (a GLMM without a scale: no residual rows after the terms)
        out.pop()
    out += rest
    out.append(RULE)
    return out


def _re_line(row) -> str:
    return (f"{row['name'][:27]:>27}  | {stata_g(row['estimate']):>10} {stata_g(row['se']):>10}"
            f"     {stata_g(row['ci_lower']):>10}  {stata_g(row['ci_upper']):>10}")


def _lr(r) -> list[str]:
    stat, df, p, kind = r.lr_vs_linear
    against = "linear regression"
    if getattr(r, "family", None) is not None:
        from jaxmixed.model.family import family_of

        what = _GLMM_TITLES.get((r.family, r.link))
        against = f"{what} model" if what else f"{family_of(r.family).glm_name} GLM"
    if kind == "chibar2(01)":
        return [f"LR test vs. {against}: chibar2(01) = {stat:8.2f} Prob >= chibar2 = {p:.4f}"]
    return [f"LR test vs. {against}:     chi2({df}) = {stat:8.2f}   Prob > chi2 = {p:.4f}",
            "",
            "Note: LR test is conservative and provided only for reference."]


def iteration_log(r) -> list[str]:
    name = "log restricted-likelihood" if r.method == "reml" else "log likelihood"
    if getattr(r, "family", None) is not None:
        return [f"Iteration {k}:   log likelihood = {ll:.4f}" for k, ll in enumerate(r.iterations) if np.isfinite(ll)]
    return [f"Iteration {k}:   {name} = {ll:.4f}" for k, ll in enumerate(r.iterations)]


def format_result(r, **display) -> str:
    """The report; options default to the fit's display settings (Stata's nolog, nogroup, ...)."""
    opts = {"log": True, "group": True, "fetable": True, "retable": True, "header": True, "lrtest": True}
    opts.update(r.display)
    opts.update(display)
    out: list[str] = []
    if opts["log"]:
        out += iteration_log(r) + ["", "Computing standard errors:", ""]
    if opts["header"]:
        out += _header(r, opts["group"]) + [""]
    if opts["fetable"]:
        out += _fixed(r) + [""]
    if opts["retable"]:
        out += _random(r)
    if opts["lrtest"]:
        out += _lr(r)
    for note in r.notes:
        out += [f"Note: {note}."]
    return "\n".join(out)
