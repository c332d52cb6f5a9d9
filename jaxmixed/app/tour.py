"""The seed talk's session, model by model, on the shipped data (``jaxmixed tour``).

``run(out_dir)`` fits every model of the talk, collects the Stata-style reports, the BLUP list
for the first ten schools, the lrtest comparisons and the group summaries, writes the plots into
``out_dir`` and returns the whole text; the command line prints it.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from jaxmixed.data import datasets
from jaxmixed.inference.compare import lrtest
from jaxmixed.api.fit import fit, mixed, xtmixed
from jaxmixed.api.glmm import meglm

JSP_NOTE = """\
Note on the JSP data. The talk used Stata's own copy of the Junior School Project data. The
public release shipped here (jaxmixed.datasets.load("jsp")) has the same 887 pupils in the same
48 schools (5 / 18.5 / 62 pupils per school) but different score values, so the JSP numbers
below differ from the talk's. Stata's copy evidently has math3 centred at its mean; we use
math3c = math3 - mean(math3). On the public data the unstructured ML fit is on the boundary
(corr = -1), which jaxmixed reports as a singular fit without standard errors. The school codes
of the public data skip 10, so "the first ten schools" are 1-9 and 11.
"""


def _section(title: str) -> list[str]:
    return ["", "=" * 78, title, "=" * 78, ""]


def _cmd(text: str) -> list[str]:
    return [f". {text}", ""]


_JSP_RI = "xtmixed math5 math3c || school:"
_JSP_SLOPE = "xtmixed math5 math3c || school: math3c"
_JSP_US = "xtmixed math5 math3c || school: math3c, cov(unstructured) variance mle"
_JSP_RI_ML = "math5 math3c || school:, mle"
_JSP_SLOPE_ML = "math5 math3c || school: math3c, mle"
_PROD = ("xtmixed gsp private emp hwy water other unemp || region: || state:, nolog",
         "xtmixed gsp private emp hwy water other unemp || region: hwy unemp || state:, nolog nogroup nofetable",
         "xtmixed gsp private emp hwy water other unemp || region: hwy unemp, cov(identity) || region: "
         "|| state:, nolog nogroup nofetable")
_PIG = ("xtmixed weight week || _all: R.id || _all: R.week", "xtmixed weight week || _all: R.id || week:, nolog",
        "xtmixed weight week || _all: R.week || id:, nolog")
_PIG_FORMULA = "weight ~ week + (1|id) + (1|week)"
_CBPP_LAPLACE = "meglm incidence i.period || herd:, family(binomial size) link(logit) intmethod(laplace) nolog"
_CBPP_AGQ = "meglm incidence i.period || herd:, family(binomial size) link(logit) intpoints(25) or nolog"
_CBPP_FORMULA = "cbind(incidence, size - incidence) ~ period + (1|herd)"
_SLEEP_KR = "mixed Reaction Days || Subject: Days, reml cov(unstructured) dfmethod(kroger) nolog"
_ORTHO = "distance ~ age*Sex + (1|Subject)"


def _chains() -> list[list[tuple]]:
    """The tour's fits as (function, command or formula, data set, keyword arguments), in
    chains: a chain's fits run one after the other (a later one reuses the programs of the
    first), the chains two at a time (:func:`_start`). A fit's command names its result."""
    return [
        [(xtmixed, _JSP_RI, "jsp", {}), (xtmixed, _JSP_RI_ML, "jsp", {})],
        [(xtmixed, _JSP_SLOPE, "jsp", {}), (xtmixed, _JSP_SLOPE_ML, "jsp", {})],
        [(xtmixed, _JSP_US, "jsp", {})],
        *[[(xtmixed, cmd, "productivity", {})] for cmd in _PROD],
        [(xtmixed, _PIG[0], "pig", {}), (xtmixed, _PIG[1], "pig", {}), (fit, _PIG_FORMULA, "pig", {})],
        [(xtmixed, _PIG[2], "pig", {})],
        [(meglm, _CBPP_LAPLACE, "cbpp", {}), (fit, _CBPP_FORMULA, "cbpp", {"family": "binomial"})],
        [(meglm, _CBPP_AGQ, "cbpp", {})],
        [(mixed, _SLEEP_KR, "sleepstudy", {})],
        [(fit, _ORTHO, "orthodont_unbal", {"dfmethod": "satterthwaite"})],
    ]


def _start(data: dict, pool) -> tuple[dict, list]:
    """Every fit of the tour started on ``pool``: (command -> Future of its result, the pool's
    tasks). A model's first fit spends most of its time tracing and compiling its programs,
    and XLA's compiles (which release the GIL) of two models at once take little longer than
    one on two cores; the numbers are those of one fit at a time (the same programs)."""
    from concurrent.futures import Future

    chains = _chains()
    futures = {cmd: Future() for chain in chains for _, cmd, _, _ in chain}

    def run_chain(chain):
        for k, (fun, cmd, name, kwargs) in enumerate(chain):
            try:
                futures[cmd].set_result(fun(cmd, data[name], **kwargs))
            except BaseException as e:  # noqa: BLE001 - raised where the tour needs this fit
                for _, later, _, _ in chain[k:]:  # this fit and the chain's later ones
                    futures[later].set_exception(e)
                return

    return futures, [pool.submit(run_chain, chain) for chain in chains]


def run(out_dir: str | Path = "jaxmixed_tour") -> str:
    """Run the tour; write plots under ``out_dir``; return the full text."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out: list[str] = ["jaxmixed tour: the xtmixed talk, model by model, on the shipped data."]
    data = {name: datasets.load(name) for name in
            ("jsp", "productivity", "pig", "cbpp", "sleepstudy", "orthodont_unbal")}
    jsp = data["jsp"]
    jsp["math3c"] = jsp.math3 - jsp.math3.mean()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="jaxmixed-tour") as pool:
        fits, tasks = _start(data, pool)
        try:
            out += _report(fits, data, out_dir)
        finally:
            for task in tasks:  # after an error above, the chains not started yet are dropped
                task.cancel()
    out += _section("Done")
    out += [f"Tour finished in {time.perf_counter() - t0:.1f} s; plots in {out_dir}/."]
    return "\n".join(out)


def _report(fits: dict, data: dict, out_dir: Path) -> list[str]:
    """The tour's text, section by section, each fit's result taken from ``fits`` in turn."""
    from jaxmixed.results import plots

    out: list[str] = []
    jsp = data["jsp"]

    # ---- One-level models ------------------------------------------------------------------
    out += _section("ONE-LEVEL MODELS: Junior School Project (math5 on math3, pupils in schools)")
    out += JSP_NOTE.splitlines() + [""]
    cmd = _JSP_RI
    out += _cmd(cmd)
    ri = fits[cmd].result()
    out += [str(ri)]

    out += _section("Adding a random slope")
    cmd = _JSP_SLOPE
    out += _cmd(cmd)
    slope = fits[cmd].result()
    out += [str(slope), ""]
    out += _cmd("lrtest (random intercept, REML) (random slope, REML)  -- same fixed effects")
    lr = lrtest(ri, slope)
    out += [f"LR chi2({lr.df}) = {lr.stat:.2f}   Prob > chi2 = {lr.p:.4f}", f"Note: {lr.note}." if lr.note else ""]

    out += _section("Predict: BLUPs and the school lines")
    out += _cmd("predict r1 r0, reffects ; gen b0 = _b[_cons] + r0 ; gen b1 = _b[math3c] + r1")
    se = slope.blups(se=True)["school"]
    lines = school_lines(slope)
    first = [s for s, _, _ in lines]
    out += ["  school          b0          b1     se(r0)     se(r1)", "  " + "-" * 52]
    for s, b0, b1 in lines:
        out.append(f"  {s:>6}  {b0:>10.7g}  {b1:>10.7g}  {se.loc[s, '_cons']:>9.4g}  {se.loc[s, 'math3c']:>9.4g}")
    out += [""]
    out += _cmd("predict math5hat, fitted ; twoway connected math5hat math3c if school<=10, connect(L)")
    p1 = plots.fitted_lines(slope, "math3c", "school", jsp, groups=first, path=out_dir / "fitted_lines.png")
    p2 = plots.caterpillar(slope, "school", "_cons", path=out_dir / "caterpillar_school.png")
    p3 = plots.residuals_vs_fitted(slope, path=out_dir / "residuals_vs_fitted.png")
    out += [f"wrote {_path(p)}" for p in (p1, p2, p3)]

    out += _section("Covariance structures: unstructured, variances, ML")
    cmd = _JSP_US
    out += _cmd(cmd)
    us = fits[cmd].result()
    out += [str(us), ""]
    out += _section("ML or REML? lrtest on ML fits")
    ri_ml, slope_ml = fits[_JSP_RI_ML].result(), fits[_JSP_SLOPE_ML].result()
    for small, big, name in ((ri_ml, slope_ml, "random intercept vs independent slope"),
                             (slope_ml, us, "independent slope vs unstructured")):
        t = lrtest(small, big)
        out += [f"lrtest {name} (ML): LR chi2({t.df}) = {t.stat:.2f}   Prob > chi2 = {t.p:.4f}"
                + (f"\n  Note: {t.note}." if t.note else "")]
    out += ["", "AIC / BIC (ML): " + ", ".join(
        f"{n}: {m.aic:.2f} / {m.bic:.2f}" for n, m in (("intercept", ri_ml), ("slope", slope_ml), ("unstructured", us)))]
    out += ["", "estat icc (random intercept, REML):", ri.icc().to_string()]

    # ---- Two-level models -------------------------------------------------------------------
    out += _section("TWO-LEVEL MODELS: productivity, states nested in regions")
    for cmd in _PROD:
        out += _cmd(cmd)
        out += [str(fits[cmd].result()), ""]

    # ---- Crossed effects --------------------------------------------------------------------
    out += _section("FACTOR NOTATION: crossed effects, pigs weighed in nine weeks")
    for cmd in _PIG:
        out += _cmd(cmd)
        out += [str(fits[cmd].result()), ""]
    formula = _PIG_FORMULA
    r = fits[formula].result()
    out += [f"The same model in lme4 syntax, jm.fit({formula!r}):",
            f"  log restricted-likelihood = {r.loglik:.4f}, sd(id) = {r.random.estimate.iloc[0]:.6g}, "
            f"sd(week) = {r.random.estimate.iloc[1]:.6g}, sd(Residual) = {r.random.estimate.iloc[2]:.6g}"]
    # ---- The talk's future, made real: GLMMs -------------------------------------------------
    out += _section("A GLIMPSE AT THE FUTURE, NOW: family() and link() (cbpp, cases out of herd size)")
    cmd = _CBPP_LAPLACE
    out += _cmd(cmd)
    lap = fits[cmd].result()
    out += [str(lap), ""]
    cmd = _CBPP_AGQ
    out += _cmd(cmd)
    agq = fits[cmd].result()
    out += [str(agq), ""]
    formula = _CBPP_FORMULA
    r = fits[formula].result()
    out += [f"The Laplace fit in lme4 syntax, jm.fit({formula!r}, family='binomial'):",
            f"  log likelihood = {r.loglik:.4f} (lme4's glmer stops at -92.0266; the exact optimum, glmmTMB's, "
            "is -92.0263), sd(herd) = " + f"{r.random.estimate.iloc[0]:.6g}",
            f"  estat icc (latent logistic scale): {lap.icc().iloc[0, 0]:.4f}"]
    # ---- The talk's other future item: small-sample degrees of freedom ----------------------
    out += _section("A GLIMPSE AT THE FUTURE, NOW: degrees of freedom (sleepstudy, 18 subjects)")
    cmd = _SLEEP_KR
    out += _cmd(cmd)
    kr = fits[cmd].result()
    out += [str(kr), ""]
    ft = kr.test("Days")
    out += [". test Days", "", " ( 1)  Days = 0", "",
            f"       F({ft.df1}, {ft.df2:.2f}) = {ft.stat:8.2f}", f"            Prob > F = {ft.p:10.4f}", ""]
    formula = _ORTHO
    r = fits[formula].result()
    out += [f"lmerTest's type III table in lme4 syntax, jm.fit({formula!r}, dfmethod='satterthwaite').anova(3):",
            r.anova(3).to_string(float_format=lambda v: f"{v:.6g}"), ""]
    return out


def _path(p) -> str:
    if isinstance(p, (tuple, list)):
        p = p[0]
    return str(p)


def school_lines(result, n: int = 10):
    """(school, b0, b1) for the first n schools: fixed effects plus BLUPs (the talk's list)."""
    b = result.blups()["school"]
    first = sorted(b.index)[:n]
    b0 = result.fixed.loc["_cons", "coef"] + b.loc[first, "_cons"].to_numpy()
    slope = [c for c in b.columns if c != "_cons"][0]
    b1 = result.fixed.loc[slope, "coef"] + b.loc[first, slope].to_numpy()
    return list(zip(first, np.asarray(b0), np.asarray(b1)))
