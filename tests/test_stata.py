"""Tests for jaxmixed.stata: Stata xtmixed/mixed syntax -> ModelSpec."""

import pytest

from jaxmixed.errors import FormulaError
from jaxmixed.syntax.stata import parse_stata
from jaxmixed.model.spec import CONS, Factor, FixedTerm, Level, ModelSpec, RandomTerm


def cont(*names):
    """Fixed terms for plain continuous regressors."""
    return tuple(FixedTerm((Factor(n, False),)) for n in names)


def term(*factors):
    return FixedTerm(tuple(factors))


def spec(text, response, fixed, random, levels, intercept=True):
    return ModelSpec(response=response, intercept=intercept, fixed=fixed, random=random,
                     levels=levels, syntax="stata", text=text)


GSP = ("private", "emp", "hwy", "water", "other", "unemp")


# -- the seed talk's commands --------------------------------------------------------------------

def test_jsp_random_intercept():
    text = "xtmixed math5 math3 || school:"
    s = parse_stata(text)
    assert s == spec(text, "math5", cont("math3"),
                     (RandomTerm(("school",), (CONS,), "identity", "school"),),
                     (Level("school", ("school",)),))
    assert s.options == {"command": "xtmixed"}
    assert s.random[0].display == (CONS,)


def test_jsp_random_slope_independent():
    text = "math5 math3 || school: math3"
    s = parse_stata(text)
    assert s == spec(text, "math5", cont("math3"),
                     (RandomTerm(("school",), ("math3", CONS), "independent", "school"),),
                     (Level("school", ("school",)),))
    assert s.options == {"command": None}


def test_jsp_unstructured_variance_mle():
    text = "xtmixed math5 math3 || school: math3, cov(unstructured) variance mle"
    s = parse_stata(text)
    assert s.random == (RandomTerm(("school",), ("math3", CONS), "unstructured", "school"),)
    assert s.options == {"command": "xtmixed", "variance": True, "method": "ml"}


def test_productivity_nested():
    text = "xtmixed gsp private emp hwy water other unemp || region: || state:, nolog"
    s = parse_stata(text)
    assert s == spec(text, "gsp", cont(*GSP),
                     (RandomTerm(("region",), (CONS,), "identity", "region"),
                      RandomTerm(("region", "state"), (CONS,), "identity", "state")),
                     (Level("region", ("region",)), Level("state", ("region", "state"))))
    assert s.options == {"command": "xtmixed", "log": False}


def test_productivity_region_slopes():
    text = ("gsp private emp hwy water other unemp || region: hwy unemp || state:, "
            "nolog nogroup nofetable")
    s = parse_stata(text)
    assert s.fixed == cont(*GSP)
    assert s.random == (
        RandomTerm(("region",), ("hwy", "unemp", CONS), "independent", "region"),
        RandomTerm(("region", "state"), (CONS,), "identity", "state"),
    )
    assert s.levels == (Level("region", ("region",)), Level("state", ("region", "state")))
    assert s.options == {"command": None, "log": False, "group": False, "fetable": False}


def test_productivity_repeated_level():
    text = ("gsp private emp hwy water other unemp || region: hwy unemp, cov(identity) "
            "|| region: || state:, nolog nogroup nofetable")
    s = parse_stata(text)
    assert s == spec(text, "gsp", cont(*GSP),
                     (RandomTerm(("region",), ("hwy", "unemp"), "identity", "region"),
                      RandomTerm(("region",), (CONS,), "identity", "region"),
                      RandomTerm(("region", "state"), (CONS,), "identity", "state")),
                     (Level("region", ("region",)), Level("state", ("region", "state"))))
    assert s.options == {"command": None, "log": False, "group": False, "fetable": False}


def test_pig_crossed_r_terms():
    text = "xtmixed weight week || _all: R.id || _all: R.week"
    s = parse_stata(text)
    assert s == spec(text, "weight", cont("week"),
                     (RandomTerm(("id",), (CONS,), "identity", "_all", ("R.id",)),
                      RandomTerm(("week",), (CONS,), "identity", "_all", ("R.week",))),
                     (Level("_all", ()),))
    assert [r.display for r in s.random] == [("R.id",), ("R.week",)]


def test_pig_r_then_level():
    text = "weight week || _all: R.id || week:"
    s = parse_stata(text)
    assert s.random == (RandomTerm(("id",), (CONS,), "identity", "_all", ("R.id",)),
                        RandomTerm(("week",), (CONS,), "identity", "week"))
    assert s.random[1].display == (CONS,)
    assert s.levels == (Level("_all", ()), Level("week", ("week",)))


def test_pig_r_week_then_id():
    s = parse_stata("weight week || _all: R.week || id:")
    assert s.random == (RandomTerm(("week",), (CONS,), "identity", "_all", ("R.week",)),
                        RandomTerm(("id",), (CONS,), "identity", "id"))
    assert s.levels == (Level("_all", ()), Level("id", ("id",)))


def test_mixed_command_word():
    s = parse_stata("mixed y x || g:, reml")
    assert s.options == {"command": "mixed", "method": "reml"}
    assert s.response == "y"
    assert s.syntax == "stata" and s.text == "mixed y x || g:, reml"


# -- fixed part ----------------------------------------------------------------------------------

def test_factor_variables():
    s = parse_stata("y i.f c.x#i.g, noconstant || id:")
    assert s.intercept is False
    assert s.fixed == (term(Factor("f", True)), term(Factor("x", False), Factor("g", True)))
    assert s.random == (RandomTerm(("id",), (CONS,), "identity", "id"),)


def test_unprefixed_in_interaction_is_categorical():
    s = parse_stata("y a#b x || id:")
    assert s.fixed == (term(Factor("a", True), Factor("b", True)), term(Factor("x", False)))


def test_base_levels():
    s = parse_stata("y ib3.x ib(first).f ib(last).g || id:")
    assert s.fixed == (term(Factor("x", True, base=3)), term(Factor("f", True, base="first")),
                       term(Factor("g", True, base="last")))


def test_full_factorial():
    s = parse_stata("y a##c.x || id:")
    a, x = Factor("a", True), Factor("x", False)
    assert s.fixed == (term(a), term(x), term(a, x))


def test_three_way_factorial_order():
    s = parse_stata("y a##b##c || id:")
    a, b, c = (Factor(v, True) for v in "abc")
    assert s.fixed == (term(a), term(b), term(c), term(a, b), term(a, c), term(b, c),
                       term(a, b, c))


def test_duplicate_terms_kept_once():
    s = parse_stata("y c.x##c.x x || id:")
    x = Factor("x", False)
    assert s.fixed == (term(x), term(x, x))


@pytest.mark.parametrize("word", ["noconstant", "nocons", "nocon", "noc"])
def test_noconstant_abbreviations(word):
    assert parse_stata(f"y x, {word} || g:").intercept is False


def test_no_regressors_and_no_random_part():
    s = parse_stata("y || g:")
    assert s.fixed == () and s.intercept is True
    s = parse_stata("y x, nocons")
    assert s.random == () and s.levels == () and s.intercept is False


def test_line_continuation_and_whitespace():
    s = parse_stata("xtmixed math5 math3 ///\n  ||  school :\tmath3")
    assert s.random == (RandomTerm(("school",), ("math3", CONS), "independent", "school"),)


# -- random part ---------------------------------------------------------------------------------

@pytest.mark.parametrize("word,cov", [
    ("id", "identity"), ("ident", "identity"), ("identity", "identity"),
    ("ind", "independent"), ("indep", "independent"),
    ("ex", "exchangeable"), ("exch", "exchangeable"),
    ("un", "unstructured"), ("uns", "unstructured"),
])
def test_covariance_abbreviations(word, cov):
    s = parse_stata(f"y x || g: x z, cov({word})")
    assert s.random[0].cov == cov
    s = parse_stata(f"y x || g: x z, covariance({word})")
    assert s.random[0].cov == cov


def test_single_column_is_identity():
    s = parse_stata("y x || g: x, nocons cov(unstructured)")
    assert s.random == (RandomTerm(("g",), ("x",), "identity", "g"),)


def test_equation_noconstant_keeps_fixed_intercept():
    s = parse_stata("y x || g: x z, nocons")
    assert s.intercept is True
    assert s.random == (RandomTerm(("g",), ("x", "z"), "independent", "g"),)


def test_three_levels_and_repeats():
    s = parse_stata("y x || a: || b: x || b: z, cov(ex) || c:")
    assert s.random == (
        RandomTerm(("a",), (CONS,), "identity", "a"),
        RandomTerm(("a", "b"), ("x",), "identity", "b"),
        RandomTerm(("a", "b"), ("z", CONS), "exchangeable", "b"),
        RandomTerm(("a", "b", "c"), (CONS,), "identity", "c"),
    )
    assert s.levels == (Level("a", ("a",)), Level("b", ("a", "b")), Level("c", ("a", "b", "c")))


def test_r_term_nested_under_level():
    s = parse_stata("y x || school: || school: R.class || pupil:")
    assert s.random == (
        RandomTerm(("school",), (CONS,), "identity", "school"),
        RandomTerm(("school", "class"), (CONS,), "identity", "school", ("R.class",)),
        RandomTerm(("school", "pupil"), (CONS,), "identity", "pupil"),
    )
    assert s.levels == (Level("school", ("school",)), Level("pupil", ("school", "pupil")))


def test_constant_goes_to_last_non_r_equation_at_level():
    s = parse_stata("y x || s: x || s: R.c")
    assert s.random == (RandomTerm(("s",), ("x", CONS), "independent", "s"),
                        RandomTerm(("s", "c"), (CONS,), "identity", "s", ("R.c",)))
    s = parse_stata("y x || _all: R.id || _all:")
    assert s.random == (RandomTerm(("id",), (CONS,), "identity", "_all", ("R.id",)),
                        RandomTerm((), (CONS,), "identity", "_all"))


def test_r_term_accepts_identity():
    s = parse_stata("y x || _all: R.id, cov(identity)")
    assert s.random[0].cov == "identity" and s.random[0].group == ("id",)


def test_all_with_plain_variables():
    s = parse_stata("y x || _all: x z, cov(un)")
    assert s.random == (RandomTerm((), ("x", "z", CONS), "unstructured", "_all"),)
    assert s.levels == (Level("_all", ()),)


def test_variables_lists_everything():
    s = parse_stata("gsp private hwy || region: hwy unemp || state:")
    assert s.variables == ["gsp", "private", "hwy", "region", "unemp", "state"]


# -- global options ------------------------------------------------------------------------------

def test_all_global_options():
    s = parse_stata("y x || g:, ml stddev level(90) log nogroup nofetable noretable noheader "
                    "nolrtest")
    assert s.options == {"command": None, "method": "ml", "variance": False, "level": 90.0,
                         "log": True, "group": False, "fetable": False, "retable": False,
                         "header": False, "lrtest": False}
    assert isinstance(s.options["level"], float)


@pytest.mark.parametrize("opts,expected", [
    ("mle", {"method": "ml"}), ("ml", {"method": "ml"}), ("reml", {"method": "reml"}),
    ("var", {"variance": True}), ("variance", {"variance": True}),
    ("stddev", {"variance": False}), ("stddeviations", {"variance": False}),
    ("level(99.5)", {"level": 99.5}), ("l(80)", {"level": 80.0}),
    ("nolog", {"log": False}), ("", {}),
])
def test_global_option_forms(opts, expected):
    assert parse_stata(f"y x || g:, {opts}").options == {"command": None, **expected}


def test_global_options_in_earlier_equations_and_fixed_part():
    s = parse_stata("y x, nolog || a: x, cov(un) reml || b:, variance")
    assert s.options == {"command": None, "log": False, "method": "reml", "variance": True}
    assert s.random[0].cov == "unstructured"
    assert s.intercept is True


def test_repeated_same_option_is_fine():
    assert parse_stata("y x || g:, nolog nolog").options["log"] is False


# -- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,pos,fragment", [
    ("", 0, "empty command"),
    ("   ", 0, "empty command"),
    ("y x || :", 7, "missing level variable"),
    ("y x || g", 8, "expected ':'"),
    ("y x || g: R.h x", 14, "R.h must be alone"),
    ("y x || g: x R.h", 12, "R.h must be alone"),
    ("y x || _all: R.id, cov(un)", 19, "R.id implies cov(identity)"),
    ("y x || _all: R.id, cov(ind)", 19, "R.id implies cov(identity)"),
    ("y x || _all: R.id, cov(ex)", 19, "R.id implies cov(identity)"),
    ("y x || _all: R.id, nocons", 19, "noconstant"),
    ("y x || g:, cov(foo)", 15, "unknown covariance structure 'foo'"),
    ("y x || g:, cov(i)", 15, "unknown covariance structure"),
    ("y x || g:, cov(un", 14, "unclosed '('"),
    ("y x || g:, cov(un || h:", 14, "unclosed '('"),
    ("y x || g:, cov()", 11, "needs an argument"),
    ("y x || g:, cov", 11, "needs an argument"),
    ("y x || g:, bogus", 11, "unknown option 'bogus'"),
    ("y x || g:, no", 11, "unknown option 'no'"),
    ("y x || g:, nolog(1)", 11, "takes no argument"),
    ("y x || g:, residuals(ar 1)", 21, "needs t(varname)"),
    ("y x || g:, residuals(bogus)", 21, "unknown residual structure"),
    ("y x || g:, level(5)", 17, "level()"),
    ("y x || g:, level(abc)", 17, "level()"),
    ("y x || g:, reml mle", 16, "conflicts with reml"),
    ("y x || g:, var stddev", 15, "conflicts"),
    ("y x || g:, cov(un) cov(ex)", 19, "conflicting covariance"),
    ("y x || g:, nocons", 7, "no random effects"),
    ("y x || g: || g:", 7, "no random effects"),
    ("y x || g: x, nolog )", 19, "unexpected ')'"),
    ("y x || g: x : z", 12, "unexpected ':'"),
    ("y x ||", 6, "expected 'levelvar:'"),
    ("y x | g:", 4, "'||'"),
    ("y x [fw=w] || g:", 4, "unexpected character '['"),
    ("|| g:", 0, "missing dependent variable"),
    ("xtmixed || g:", 8, "missing dependent variable"),
    ("mixed", 5, "missing dependent variable"),
    (", nocons", 0, "missing dependent variable"),
    ("i.y x || g:", 0, "plain variable name"),
    ("y x if z > 1 || g:", 4, "if/in"),
    ("y _cons || g:", 2, "_cons"),
    ("y x || g: _cons", 10, "_cons"),
    ("y x || g: _all", 10, "_all"),
    ("y x || g: i.x", 10, "operator 'i.'"),
    ("y x || g: c.x", 10, "operator 'c.'"),
    ("y x || g: a#b", 11, "interactions"),
    ("y x || g: x x", 12, "repeated"),
    ("y R.x || g:", 2, "random-effects equation"),
    ("y L.x || g:", 2, "time-series operator 'L.' is not supported"),
    ("y i.(a b) || g:", 4, "parenthesised"),
    ("y ib(#2).x || g:", 5, "ib()"),
    ("y a#b##c || g:", 5, "cannot mix"),
    ("y x, cov(un) || g:", 5, "random-effects equation"),
    ("y x || g: || h: || g:", 19, "consecutive"),
    ("y x || g: || _all: R.id", 13, "_all must come before"),
    ("y x # || g:", 6, "expected a variable name"),
])
def test_errors(text, pos, fragment):
    with pytest.raises(FormulaError) as info:
        parse_stata(text)
    err = info.value
    assert fragment in err.reason
    assert err.text == text
    assert err.pos == pos
    assert "^" in str(err)


def test_error_is_value_error_and_shows_caret():
    with pytest.raises(ValueError) as info:
        parse_stata("y x || g:, bogus")
    lines = str(info.value).splitlines()
    assert lines[1].strip() == "y x || g:, bogus"
    assert lines[2].index("^") == lines[1].index("bogus")


def test_non_string_rejected():
    with pytest.raises(FormulaError):
        parse_stata(None)


@pytest.mark.parametrize("text", [
    "y x ||| g:", "y x || g:, level(95", "y x || g:, level(95 90)", "y x || g: R.",
    "y ib(first)x", "y x || g:,, nolog", "y ((x))", "y x || 3:", "3 x", "y x || g: x, cov(un)) ",
    "y x || g:, cov(un un)", "y x,, || g:", "y x || g: R.(a)", "y x || g:, cov(3)", "y . x",
    "y x || g: x, ml(", "y x || g:: x", "y x || g: x, nolog || ", "y\tx || g:, l()",
])
def test_malformed_raise_formula_error(text):
    with pytest.raises(FormulaError) as info:
        parse_stata(text)
    assert info.value.pos is not None and 0 <= info.value.pos <= len(text)


def test_trailing_comma_is_empty_option_list():
    assert parse_stata("y x || g: R.x,").random == (
        RandomTerm(("g", "x"), (CONS,), "identity", "g", ("R.x",)),)
