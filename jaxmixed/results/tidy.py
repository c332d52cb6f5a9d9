"""A fit as data frames and markup: ``tidy`` and ``glance`` (broom.mixed's columns), ``vcov``,
the Stata-style tables as HTML (Jupyter's ``_repr_html_``) and as LaTeX (``to_latex``)."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from jaxmixed.results.report import fixed_statistic, stata_g

TIDY_COLUMNS = ["effect", "group", "term", "estimate", "std_error", "statistic", "df", "p_value", "conf_low",
                "conf_high"]


def tidy(r) -> pd.DataFrame:
    """One row per parameter, broom.mixed's columns: effect ("fixed" | "ran_pars"), group
    (the level for variance parameters, "Residual" for the residual ones), term (the names of
    ``r.fixed`` and ``r.random``), estimate, std_error, statistic (z, or t with a df method), df
    (the df method's, else NaN), p_value, conf_low, conf_high."""
    f = r.fixed
    stat = fixed_statistic(r)
    fixed = pd.DataFrame({
        "effect": "fixed", "group": "", "term": list(f.index), "estimate": f.coef.to_numpy(),
        "std_error": f.se.to_numpy(), "statistic": f[stat].to_numpy(),
        "df": f["df"].to_numpy() if "df" in f.columns else np.nan, "p_value": f.p.to_numpy(),
        "conf_low": f.ci_lower.to_numpy(), "conf_high": f.ci_upper.to_numpy()})
    v = r.random
    ran = pd.DataFrame({
        "effect": "ran_pars", "group": [g if g else "Residual" for g in v.group], "term": list(v.name),
        "estimate": v.estimate.to_numpy(), "std_error": v.se.to_numpy(), "statistic": np.nan, "df": np.nan,
        "p_value": np.nan, "conf_low": v.ci_lower.to_numpy(), "conf_high": v.ci_upper.to_numpy()})
    return pd.concat([fixed, ran], ignore_index=True)[TIDY_COLUMNS]


def glance(r) -> pd.DataFrame:
    """One row: nobs, sigma, loglik, aic, bic, deviance (−2 loglik), df_residual (nobs minus
    the parameters AIC counts), method, converged, singular."""
    return pd.DataFrame([dict(nobs=r.nobs, sigma=r.sigma, loglik=r.loglik, aic=r.aic, bic=r.bic,
                              deviance=-2.0 * r.loglik, df_residual=r.nobs - r.n_params, method=r.method,
                              converged=r.converged, singular=r.singular)])


def vcov(r) -> pd.DataFrame:
    """The covariance matrix of the fixed-effects estimates, labelled by their names."""
    names = list(r.fixed.index)
    return pd.DataFrame(np.asarray(r.solution.cov_beta), index=names, columns=names)


# ---------------------------------------------------------------------------------------------
# markup


def _cell(x) -> str:
    return stata_g(float(x)) if isinstance(x, (float, np.floating, int, np.integer)) else html.escape(str(x))


def _html_table(caption: str, header: list[str], rows: list[list], cls: str) -> str:
    out = [f'<table class="jaxmixed {cls}">', f"<caption>{html.escape(caption)}</caption>", "<thead><tr>"]
    out += [f"<th>{html.escape(h)}</th>" for h in header]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def to_html(r) -> str:
    """The Stata-style report as HTML tables: the header, fixed effects, random-effects
    parameters, the LR test and the notes. Numbers as in the text report (Stata's %9.0g)."""
    lvl = f"{r.level:g}%"
    kind = "REML" if r.method == "reml" else "ML"
    ll = "Log restricted-likelihood" if r.method == "reml" else "Log likelihood"
    chi2, df, p = r.wald
    head = [["Number of obs", r.nobs], [ll, f"{r.loglik:.4f}"], [f"Wald chi2({df})", chi2], ["Prob > chi2", p]]
    for lev, g in r.groups.iterrows():
        head.append([f"Groups: {lev}", int(g.n_groups)])
    f = r.fixed
    st = fixed_statistic(r)
    fixed_rows = [[name, row.coef, row.se, row[st], row.p, row.ci_lower, row.ci_upper] for name, row in f.iterrows()]
    v = r.random
    random_rows = [[g if g else "Residual", n, e, s, lo, hi]
                   for g, n, e, s, lo, hi in zip(v.group, v.name, v.estimate, v.se, v.ci_lower, v.ci_upper)]
    parts = [
        '<div class="jaxmixed-fit">',
        _html_table(_title(r, kind), ["", ""], head, "header"),
        _html_table(f"Fixed effects ({_response(r)})",
                    ["", "Coef.", "Std. Err.", st, f"P>|{st}|", f"[{lvl} Conf.", "Interval]"], fixed_rows, "fixed"),
        _html_table("Random-effects parameters", ["Group", "Parameter", "Estimate", "Std. Err.",
                                                  f"[{lvl} Conf.", "Interval]"], random_rows, "random"),
    ]
    stat, ldf, lp, lkind = r.lr_vs_linear
    parts.append(f"<p>LR test vs. linear regression: {html.escape(lkind)} = {stat:.2f}, "
                 f"Prob {'>=' if lkind.startswith('chibar') else '>'} chi2 = {lp:.4f}</p>")
    if r.notes:
        parts.append("<ul class=\"notes\">" + "".join(f"<li>{html.escape(n)}</li>" for n in r.notes) + "</ul>")
    parts.append("</div>")
    return "".join(parts)


def _tex(x) -> str:
    if isinstance(x, (float, np.floating)):
        return stata_g(float(x))
    s = str(x)
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("$", r"\$"), ("{", r"\{"), ("}", r"\}")):
        s = s.replace(a, b) if a != "\\" else s.replace(a, "\x00")
    return s.replace("\x00", r"\textbackslash{}")


def _tex_table(header, rows, align) -> str:
    lines = [rf"\begin{{tabular}}{{{align}}}", r"\hline", " & ".join(_tex(h) for h in header) + r" \\", r"\hline"]
    lines += [" & ".join(_tex(c) for c in row) + r" \\" for row in rows]
    lines += [r"\hline", r"\end{tabular}"]
    return "\n".join(lines)


def to_latex(r) -> str:
    """The coefficient table and the random-effects table as LaTeX ``tabular`` environments."""
    lvl = f"{r.level:g}\\%"
    f = r.fixed
    st = fixed_statistic(r)
    fixed = _tex_table([_response(r), "Coef.", "Std. Err.", st, f"P>|{st}|", f"[{lvl}", "Conf. Interval]"],
                       [[n, row.coef, row.se, row[st], row.p, row.ci_lower, row.ci_upper] for n, row in f.iterrows()],
                       "lrrrrrr")
    v = r.random
    random = _tex_table(["Group", "Parameter", "Estimate", "Std. Err.", f"[{lvl}", "Conf. Interval]"],
                        [[g if g else "Residual", n, e, s, lo, hi]
                         for g, n, e, s, lo, hi in zip(v.group, v.name, v.estimate, v.se, v.ci_lower, v.ci_upper)],
                        "llrrrr")
    return fixed + "\n\n" + random + "\n"


def _response(r) -> str:
    """The response as the user wrote it (a GLMM's is read into a column of its own)."""
    return r.display.get("response") or r.design.response


def _title(r, kind: str) -> str:
    if getattr(r, "family", None) is not None:
        from jaxmixed.results.report import glmm_title

        return glmm_title(r)
    return f"Mixed-effects {kind} regression"
