"""Tests of the lme4-style formula parser (jaxmixed.formula.parse_formula)."""

import pytest

from jaxmixed.errors import FormulaError
from jaxmixed.syntax.formula import parse_formula
from jaxmixed.model.spec import CONS, Factor, FixedTerm, Level, ModelSpec, RandomTerm


def fx(*names):
    """A fixed term of plain (dtype-decided) variables."""
    return FixedTerm(tuple(Factor(n) for n in names))


def re_(group, columns, cov):
    group = tuple(group.split(":")) if isinstance(group, str) else tuple(group)
    return RandomTerm(group=group, columns=tuple(columns), cov=cov, label=":".join(group))


def lv(label):
    return Level(label, tuple(label.split(":")))


def fails(text, pos, *words):
    with pytest.raises(FormulaError) as info:
        parse_formula(text)
    err = info.value
    assert err.pos == pos, (err.pos, str(err))
    assert err.text == text
    for w in words:
        assert w in err.reason, err.reason
    return err


# -- the examples of the spec --------------------------------------------------------------


def test_two_crossed_intercepts():
    text = "weight ~ week + (1|id) + (1|week)"
    spec = parse_formula(text)
    assert spec == ModelSpec(
        response="weight",
        intercept=True,
        fixed=(fx("week"),),
        random=(re_("id", [CONS], "identity"), re_("week", [CONS], "identity")),
        levels=(lv("id"), lv("week")),
        syntax="formula",
        text=text,
    )
    assert spec.options == {}
    assert spec.random[0].display == (CONS,)
    assert spec.variables == ["weight", "week", "id"]


def test_random_slope_unstructured():
    spec = parse_formula("math5 ~ math3c + (1 + math3c | school)")
    assert spec.response == "math5"
    assert spec.intercept is True
    assert spec.fixed == (fx("math3c"),)
    assert spec.random == (re_("school", ["math3c", CONS], "unstructured"),)
    assert spec.levels == (lv("school"),)


def test_double_bar_independent():
    spec = parse_formula("math5 ~ math3c + (1 + math3c || school)")
    assert spec.random == (re_("school", ["math3c", CONS], "independent"),)


def test_productivity_nested_independent():
    spec = parse_formula("gsp ~ private + emp + hwy + water + other + unemp + "
                         "(1 + hwy + unemp || region) + (1|region:state)")
    assert spec.fixed == tuple(fx(v) for v in ["private", "emp", "hwy", "water", "other", "unemp"])
    assert spec.random == (
        re_("region", ["hwy", "unemp", CONS], "independent"),
        re_(("region", "state"), [CONS], "identity"),
    )
    assert spec.random[1].label == "region:state"
    assert spec.levels == (lv("region"), lv("region:state"))


def test_productivity_homdiag():
    spec = parse_formula("gsp ~ private + emp + hwy + water + other + unemp + "
                         "homdiag(0 + hwy + unemp | region) + (1|region) + (1|region:state)")
    assert spec.random == (
        re_("region", ["hwy", "unemp"], "identity"),
        re_("region", [CONS], "identity"),
        re_("region:state", [CONS], "identity"),
    )
    assert spec.levels == (lv("region"), lv("region:state"))


def test_nesting_slash_equals_explicit():
    a = parse_formula("y ~ x + (1|a/b)")
    b = parse_formula("y ~ x + (1|a) + (1|a:b)")
    assert a.random == b.random == (re_("a", [CONS], "identity"), re_("a:b", [CONS], "identity"))
    assert a.levels == b.levels == (lv("a"), lv("a:b"))
    assert a.fixed == b.fixed and a.intercept == b.intercept


def test_three_level_nesting_keeps_columns_and_cov():
    spec = parse_formula("y ~ (1 + x | a/b/c)")
    assert spec.random == tuple(re_(g, ["x", CONS], "unstructured") for g in ["a", "a:b", "a:b:c"])
    assert [t.label for t in spec.random] == ["a", "a:b", "a:b:c"]
    spec = parse_formula("y ~ (1 | a/b:c)")
    assert [t.group for t in spec.random] == [("a",), ("a", "b", "c")]


def test_no_intercept_anywhere():
    spec = parse_formula("y ~ 0 + x + (x - 1 | g)")
    assert spec.intercept is False
    assert spec.fixed == (fx("x"),)
    assert spec.random == (re_("g", ["x"], "identity"),)


def test_star_and_categorical():
    spec = parse_formula("y ~ a*b + C(f) + (1|g)")
    assert spec.fixed == (fx("a"), fx("b"), fx("a", "b"), FixedTerm((Factor("f", True),)))
    assert spec.intercept is True


def test_leading_minus_one():
    spec = parse_formula("y ~ -1 + x + (1|g)")
    assert spec.intercept is False
    assert spec.fixed == (fx("x"),)


# -- fixed part ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, intercept", [
    ("y ~ x", True), ("y ~ 1 + x", True), ("y ~ x - 1", False), ("y ~ x + 0", False),
    ("y ~ 0 + x", False), ("y ~ x - 1 + 1", True), ("y ~ x - 0", True), ("y ~ 1", True),
    ("y ~ 0", False),
])
def test_intercept_rules(text, intercept):
    spec = parse_formula(text)
    assert spec.intercept is intercept
    assert spec.random == () and spec.levels == ()  # no random part is not an error here


def test_three_way_star_order():
    spec = parse_formula("y ~ a*b*c")
    assert spec.fixed == (fx("a"), fx("b"), fx("c"), fx("a", "b"), fx("a", "c"), fx("b", "c"),
                          fx("a", "b", "c"))


def test_colon_and_grouping():
    assert parse_formula("y ~ a:b").fixed == (fx("a", "b"),)
    assert parse_formula("y ~ (a + b):c").fixed == (fx("a", "c"), fx("b", "c"))
    assert parse_formula("y ~ (a + b)*c").fixed == (fx("a"), fx("b"), fx("c"), fx("a", "c"),
                                                    fx("b", "c"))
    assert parse_formula("y ~ a/b").fixed == (fx("a"), fx("a", "b"))


def test_duplicates_removed_keep_first():
    spec = parse_formula("y ~ b + a*b + b:a + a + (1|g)")
    assert spec.fixed == (fx("b"), fx("a"), fx("a", "b"))
    assert parse_formula("y ~ x + x").fixed == (fx("x"),)


def test_categorical_bases():
    def factor(text):
        (term,) = parse_formula(text).fixed
        (f,) = term.factors
        return f
    assert factor("y ~ C(x)") == Factor("x", True, None)
    assert factor("y ~ C(x, Treatment(reference=3))") == Factor("x", True, 3)
    assert factor("y ~ C(x, Treatment(3))") == Factor("x", True, 3)
    assert factor("y ~ C(x, Treatment(2.5))") == Factor("x", True, 2.5)
    assert factor("y ~ C(x, Treatment(-1))") == Factor("x", True, -1)
    assert factor("y ~ C(x, Treatment('b'))") == Factor("x", True, "b")
    assert factor('y ~ C(x, Treatment(reference="low"))') == Factor("x", True, "low")
    assert factor("y ~ C(x, Treatment)") == Factor("x", True, None)
    assert type(factor("y ~ C(x, Treatment(3))").base) is int
    spec = parse_formula("y ~ C(f):x")
    assert spec.fixed == (FixedTerm((Factor("f", True), Factor("x"))),)


def test_names_backquotes_and_dots():
    spec = parse_formula("`log y` ~ x.1 + `odd name` + _z + (1 + `my slope` | `the group`)")
    assert spec.response == "log y"
    assert spec.fixed == (fx("x.1"), fx("odd name"), fx("_z"))
    assert spec.random == (re_(("the group",), ["my slope", CONS], "unstructured"),)
    # a back-quoted C is a variable, not a function call: `C`(x) is then trailing garbage
    fails("y ~ `C`(x)", 7, "unexpected")


def test_whitespace_is_irrelevant():
    a = parse_formula("y~x+(1+x||g)")
    b = parse_formula("  y  ~\n  x +  ( 1 + x || g )  ")
    assert a.random == b.random and a.fixed == b.fixed


# -- random part ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, columns", [
    ("y ~ (1|g)", [CONS]), ("y ~ (x|g)", ["x", CONS]), ("y ~ (1 + x + z|g)", ["x", "z", CONS]),
    ("y ~ (x + 1 + z|g)", ["x", "z", CONS]), ("y ~ (0 + x|g)", ["x"]), ("y ~ (x - 1|g)", ["x"]),
    ("y ~ (-1 + x + z|g)", ["x", "z"]), ("y ~ (x + z + 0|g)", ["x", "z"]),
])
def test_random_columns(text, columns):
    (term,) = parse_formula(text).random
    assert term.columns == tuple(columns)


@pytest.mark.parametrize("text, cov", [
    ("y ~ (1 + x | g)", "unstructured"), ("y ~ us(1 + x | g)", "unstructured"),
    ("y ~ (1 + x || g)", "independent"), ("y ~ diag(1 + x | g)", "independent"),
    ("y ~ homdiag(1 + x | g)", "identity"), ("y ~ homcs(1 + x | g)", "exchangeable"),
    ("y ~ us(1 | g)", "identity"), ("y ~ homcs(0 + x | g)", "identity"), ("y ~ (x - 1 || g)", "identity"),
])
def test_covariance_structures(text, cov):
    (term,) = parse_formula(text).random
    assert term.cov == cov


def test_interaction_group_and_levels_order():
    spec = parse_formula("y ~ (1|b) + (1|a:b) + (0 + x|b) + (1|a)")
    assert [t.group for t in spec.random] == [("b",), ("a", "b"), ("b",), ("a",)]
    assert spec.levels == (lv("b"), lv("a:b"), lv("a"))


def test_variables_cover_all_columns():
    spec = parse_formula("y ~ a*C(f) + (1 + x || g/h)")
    assert spec.variables == ["y", "a", "f", "g", "x", "h"]


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("text, pos, words", [
    # the spec's examples
    ("y ~ x + (1|", 11, ["grouping variable"]),
    ("y x + (1|g)", 2, ["missing '~'"]),
    ("y ~ x + (1 g)", 11, ["')'", "(expr | group)"]),
    ("y ~ x + cs(1|g)", 8, ["cs()", "us(", "diag(", "homdiag(", "homcs("]),
    ("y ~ (C(x)|g)", 5, ["plain variable"]),
    ("~ x", 0, ["response"]),
    ("y ~ x + (1|g))", 13, ["unmatched ')'"]),
    # response and '~'
    ("", 0, ["empty"]),
    ("y ~", 3, ["expected a term", "end of formula"]),
    ("y ~ x ~ z", 6, ["one '~'"]),
    ("y z ~ x", 2, ["single column"]),
    ("log(y) ~ x", 0, ["response"]),
    ("1 ~ x", 0, ["response"]),
    # parentheses and bars
    ("y ~ (x + z", 10, ["')'"]),
    ("y ~ (x + (1|g)", 9, ["nested"]),
    ("y ~ x + 1|g", 9, ["inside parentheses"]),
    ("y ~ x + (1|)", 11, ["empty grouping"]),
    ("y ~ x + (1|g:)", 13, ["after ':'"]),
    ("y ~ x + (1|a/)", 13, ["after '/'"]),
    ("y ~ x + (1|g h)", 13, ["')'"]),
    ("y ~ x + (|g)", 9, ["found '|'"]),
    ("y ~ ()", 5, ["expected a term"]),
    ("y ~ x + (1|g:g)", 13, ["twice"]),
    ("y ~ ((1|g))", 5, ["nested"]),
    ("y ~ (1 + x)", 5, ["intercept", "(expr | group)"]),
    # functions
    ("y ~ x + ar1(1|g)", 8, ["ar1()", "supported"]),
    ("y ~ log(x)", 4, ["log()"]),
    ("y ~ us(x)", 4, ["us(expr | group)"]),
    ("y ~ homdiag(1 + x || g)", 18, ["'||'"]),
    ("y ~ C(x, Sum)", 9, ["Treatment"]),
    ("y ~ C(x, Treatment(reference=a))", 29, ["number or a quoted string"]),
    ("y ~ C(1)", 6, ["column name"]),
    ("y ~ C(x", 7, ["close C("]),
    ("y ~ (1 | log(g))", 9, ["grouping variable"]),
    # random expressions
    ("y ~ (0 | g)", 4, ["at least one column"]),
    ("y ~ (1 - 1 - 0 + 0 | g)", 4, ["at least one column"]),
    ("y ~ (x:z | g)", 6, ["interactions"]),
    ("y ~ (x*z | g)", 6, ["interactions"]),
    ("y ~ (x + x | g)", 9, ["twice"]),
    ("y ~ (1 + x - z | g)", 13, ["only the intercept"]),
    ("y ~ (2 | g)", 5, ["found '2'"]),
    ("y ~ (1 + _cons | g)", 9, ["reserved"]),
    ("y ~ (1 | g) + (1 + x | g)", 14, ["'_cons'", "twice"]),
    ("y ~ (1 | a/b) + (1 | a)", 16, ["twice"]),
    # fixed part
    ("y ~ x - z", 8, ["only the intercept"]),
    ("y ~ x + 2", 8, ["only 0 and 1"]),
    ("y ~ x:1", 6, ["':'", "intercept"]),
    ("y ~ x*(1|g)", 6, ["random-effects term"]),
    ("y ~ (1|g):x", 4, ["random-effects term"]),
    ("y ~ x + + z", 8, ["expected a term"]),
    ("y ~ x $ z", 6, ["unexpected character"]),
    ("y ~ `x", 4, ["unterminated"]),
    ("y ~ ``", 4, ["empty back-quoted"]),
    ("y ~ x z", 6, ["unexpected 'z'"]),
])
def test_errors(text, pos, words):
    fails(text, pos, *words)


def test_error_message_shows_caret():
    err = fails("y ~ x + (1 g)", 11)
    lines = str(err).splitlines()
    assert lines[1].strip() == "y ~ x + (1 g)"
    assert lines[2].index("^") - lines[1].index("y") == 11
    assert isinstance(err, ValueError)


def test_non_string_input():
    with pytest.raises(FormulaError):
        parse_formula(None)


@pytest.mark.parametrize("text", [
    "y ~ x + (1|g)"[:i] for i in range(len("y ~ x + (1|g)")) if i not in (5, 6)
] + ["y ~ (((", "y ~ )))", "y ~ C(", "y ~ C(x,", "y ~ C(x, Treatment(", "y ~ us(", "y ~ us(1|",
     "y ~ (1|a/b/", "(", "|", "~", "y ~ -", "y ~ (1 + |g)", "y ~ C(x, Treatment(reference=))"])
def test_truncated_inputs_raise_formula_error_only(text):
    with pytest.raises(FormulaError):
        parse_formula(text)
