"""A fit as data frames and markup: tidy, glance, vcov, HTML (Jupyter) and LaTeX."""

from __future__ import annotations

from html.parser import HTMLParser

import numpy as np
import pytest

from conftest import cached_fit


class _Tables(HTMLParser):
    """The cells of every <table>, by its class."""

    def __init__(self):
        super().__init__()
        self.tables, self._cls, self._row, self._cell = {}, None, None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._cls = dict(attrs).get("class", "").split()[-1]
            self.tables[self._cls] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._cls:
            self.tables[self._cls].append(self._row)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _num(text: str) -> float:
    return float("nan") if text == "." else float(text)


@pytest.fixture(scope="module")
def fit():
    return cached_fit("fit", "math5 ~ math3 + (1 + math3 | school)", "jsp")


def test_tidy_matches_the_tables(fit):
    t = fit.tidy()
    assert list(t.columns) == ["effect", "group", "term", "estimate", "std_error", "statistic", "df", "p_value",
                               "conf_low", "conf_high"]
    fx = t[t.effect == "fixed"].set_index("term")
    np.testing.assert_array_equal(fx.estimate.to_numpy(), fit.fixed.coef.to_numpy())
    np.testing.assert_array_equal(fx.std_error.to_numpy(), fit.fixed.se.to_numpy())
    np.testing.assert_array_equal(fx.p_value.to_numpy(), fit.fixed.p.to_numpy())
    assert list(fx.index) == list(fit.fixed.index)
    rp = t[t.effect == "ran_pars"]
    assert list(rp.term) == list(fit.random.name) and list(rp.group) == ["school"] * 3 + ["Residual"]
    np.testing.assert_array_equal(rp.estimate.to_numpy(), fit.random.estimate.to_numpy())
    np.testing.assert_array_equal(rp.conf_high.to_numpy(), fit.random.ci_upper.to_numpy())


def test_glance_and_vcov(fit):
    g = fit.glance().iloc[0]
    assert g.nobs == fit.nobs and g.loglik == fit.loglik and g.aic == fit.aic and g.bic == fit.bic
    assert g.deviance == -2 * fit.loglik and g.df_residual == fit.nobs - fit.n_params and g.method == "reml"
    v = fit.vcov()
    assert list(v.index) == list(fit.fixed.index) == list(v.columns)
    np.testing.assert_allclose(np.sqrt(np.diag(v.to_numpy())), fit.fixed.se.to_numpy(), rtol=1e-14)


def test_html_report_renders_the_numbers_of_the_fit(fit):
    p = _Tables()
    p.feed(fit._repr_html_())
    rows = p.tables["fixed"][1:]
    assert [r[0] for r in rows] == list(fit.fixed.index)
    for r, (_, ref) in zip(rows, fit.fixed.iterrows()):
        got = [_num(x) for x in r[1:]]
        want = [ref.coef, ref.se, ref.z, ref.p, ref.ci_lower, ref.ci_upper]
        np.testing.assert_allclose(got, want, rtol=5e-7, atol=5e-8)  # %9.0g: 7 significant digits
    rand = p.tables["random"][1:]
    assert [r[1] for r in rand] == list(fit.random.name)
    np.testing.assert_allclose([_num(r[2]) for r in rand], fit.random.estimate.to_numpy(), rtol=5e-7)
    head = dict((r[0], r[1]) for r in p.tables["header"][1:])
    assert int(head["Number of obs"]) == fit.nobs and float(head["Log restricted-likelihood"]) == round(fit.loglik, 4)


def test_latex_tables(fit):
    tex = fit.to_latex()
    assert tex.count(r"\begin{tabular}") == 2 and r"\_cons" in tex and "sd(math3)" in tex
    from jaxmixed.results.report import stata_g

    for v in (*fit.fixed.coef, *fit.fixed.se, *fit.random.estimate):
        assert stata_g(v) in tex
