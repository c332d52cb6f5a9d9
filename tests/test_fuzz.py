"""Fuzzing the front ends: random formulas and random data frames.

Whatever goes in, ``jm.fit`` and ``jm.xtmixed`` either return a :class:`FitResult` with finite
numbers or raise a :class:`JaxmixedError`; nothing else escapes, and the only warnings are
:class:`JaxmixedWarning`.

Most random inputs fail while parsing or building the design, before any JIT compile. Inputs that
would reach the optimiser with a model shape (``engine.pls.ModelShape``) not seen before are fitted
only while a small compile budget lasts; the rest stop after the design is built (which still
checks everything up to the optimiser).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxmixed as jm
from jaxmixed import FitResult, JaxmixedError, JaxmixedWarning
from jaxmixed.data.design import build_design
from jaxmixed.data.pattern import build_pattern
from jaxmixed.engine.pls import shape_of

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

COMPILE_BUDGET = 6  # distinct model shapes the fuzz tests may send to the optimiser
SEEN: set = set()
STATS = {"fits": 0, "errors": 0, "design_only": 0}
MESSAGES: list = []  # the errors raised, for a look at what the fuzz exercised

NAMES = ["y", "x", "z", "g", "h", "s", "w", "nope"]
COLUMNS = ["y", "x", "z", "g", "h", "s", "w"]

# -- data frames -------------------------------------------------------------------------------

KINDS = ["float", "float", "float", "float_nan", "float_inf", "int", "few", "few", "bool", "str",
         "mixed", "all_nan", "const", "category", "huge", "tiny", "lists", "complex", "datetime", "none"]


def make_column(kind: str, n: int, rng: np.random.Generator):
    if kind == "float":
        return rng.normal(size=n)
    if kind == "float_nan":
        v = rng.normal(size=n)
        v[rng.random(n) < 0.3] = np.nan
        return v
    if kind == "float_inf":
        v = rng.normal(size=n)
        if n:
            v[rng.integers(n)] = rng.choice([np.inf, -np.inf])
        return v
    if kind == "int":
        return rng.integers(-5, 5, size=n)
    if kind == "few":
        return rng.integers(0, 3, size=n)
    if kind == "bool":
        return rng.random(n) < 0.5
    if kind == "str":
        return rng.choice(["a", "b", "c", ""], size=n)
    if kind == "mixed":
        return pd.Series([rng.choice([1, "a", 2.5, None, np.nan, True]) for _ in range(n)], dtype=object)
    if kind == "all_nan":
        return np.full(n, np.nan)
    if kind == "const":
        return np.full(n, 3.0)
    if kind == "category":
        return pd.Categorical(rng.choice(["u", "v"], size=n))
    if kind == "huge":
        return rng.normal(size=n) * 1e200
    if kind == "tiny":
        return rng.normal(size=n) * 1e-200
    if kind == "lists":
        return pd.Series([[1, 2]] * n, dtype=object)
    if kind == "complex":
        return rng.normal(size=n) + 1j
    if kind == "datetime":
        return pd.date_range("2020-01-01", periods=n, freq="D")
    if kind == "none":
        return pd.Series([None] * n, dtype=object)
    raise AssertionError(kind)


NICE = {"y": "float", "x": "float", "z": "float", "g": "few", "h": "str", "s": "str", "w": "float_nan"}


@st.composite
def frames(draw):
    """Hostile frames, and (half the time) mostly usable ones with a few bad columns."""
    nice = draw(st.integers(0, 2)) > 0
    n = draw(st.sampled_from([24, 24, 24, 48] if nice else [0, 1, 2, 3, 6, 12, 24]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    cols = {}
    for name in COLUMNS:
        if draw(st.integers(0, 19 if nice else 9)) == 0:  # sometimes the column is not there at all
            continue
        kind = NICE[name] if nice and draw(st.integers(0, 7)) else draw(st.sampled_from(KINDS))
        cols[name] = make_column(kind, n, rng)
    return pd.DataFrame(cols) if cols else pd.DataFrame(index=range(n))


# -- formulas ----------------------------------------------------------------------------------

FORMULA_TOKENS = NAMES + ["~", "~", "+", "+", "-", "*", ":", "/", "|", "||", "(", "(", ")", ")", "0", "1",
                          "2", "C(", "us(", "diag(", "homdiag(", "homcs(", "log(", ",", "`", "'", "$", "~~",
                          "Treatment(", "reference=", "_cons", ".5", "é", "\n"]


def _fixed_term():
    return st.one_of(st.sampled_from(["x", "z", "h"] * 3 + NAMES + ["0", "1"]),
                     st.builds("C({})".format, st.sampled_from(NAMES)),
                     st.builds(lambda a, b, op: f"{a}{op}{b}", st.sampled_from(NAMES), st.sampled_from(NAMES),
                               st.sampled_from([":", "*", "/"])))


@st.composite
def structured_formulas(draw):
    response = draw(st.sampled_from(["y"] * 8 + NAMES))
    fixed = draw(st.lists(_fixed_term(), min_size=0, max_size=3))
    randoms = []
    for _ in range(draw(st.integers(0, 2))):
        expr = draw(st.lists(st.sampled_from(["1"] * 6 + ["x", "z", "0", "-1"] + NAMES), min_size=1, max_size=3))
        group = draw(st.sampled_from(["g"] * 6 + ["h"] * 2 + NAMES + ["g:h", "g/h", "g:g"]))
        bar = draw(st.sampled_from(["|", "||"]))
        wrap = draw(st.sampled_from(["", "", "us", "diag", "homcs", "homdiag"]))
        term = f"({' + '.join(expr)} {bar} {group})"
        randoms.append(f"{wrap}{term}" if wrap else term)
    rhs = " + ".join(fixed + randoms) or draw(st.sampled_from(["", "1"]))
    return f"{response} ~ {rhs}"


formulas = st.one_of(st.lists(st.sampled_from(FORMULA_TOKENS), max_size=12).map(" ".join),
                     st.text(max_size=20), *[structured_formulas()] * 4)

STATA_TOKENS = (NAMES + ["i.h", "i.g", "c.x", "ib2.g", "ib(last).h", "R.s", "R.h", "||", "||", ":", ",", "#", "##",
                         "|", "(", ")", "_all:", "g:", "h:", "cov(un)", "cov(ex)", "cov(id)", "cov(ind)",
                         "cov(unstructured)", "cov(bogus)", "noc", "reml", "mle", "var", "level(90)",
                         "level(5)", "mixed", "xtmixed", "if", "nolog", "///", "x.", "3"])


@st.composite
def structured_stata(draw):
    fixed = draw(st.lists(st.sampled_from(NAMES + ["x", "z"] * 3 + ["i.h", "c.x", "i.g#c.x", "h##g", "ib1.g"]),
                          max_size=3))
    parts = [" ".join([draw(st.sampled_from(["y"] * 8 + NAMES))] + fixed)]
    if draw(st.booleans()):
        parts[0] += draw(st.sampled_from([", noc", ", mle", ", reml variance", ", level(90)"]))
    for _ in range(draw(st.integers(0, 2))):
        level = draw(st.sampled_from(["g"] * 4 + ["h", "s", "_all", "nope"]))
        cols = draw(st.lists(st.sampled_from(["x", "z"] + NAMES + ["R.h", "R.g"]), max_size=2))
        opts = draw(st.sampled_from(["", ", noc", ", cov(un)", ", cov(ex)", ", cov(id)", ", cov(unstructured)"]))
        parts.append(f"{level}: {' '.join(cols)}{opts}")
    return " || ".join(parts)


commands = st.one_of(st.lists(st.sampled_from(STATA_TOKENS), max_size=12).map(" ".join),
                     *[structured_stata()] * 3)

options = st.sampled_from([{}, {}, {}, {"method": "ml"}, {"method": "bogus"}, {"level": 5}, {"variance": True}])


# -- the check ---------------------------------------------------------------------------------

def _would_compile_new_shape(parse, text, data) -> bool:
    """Whether fitting would reach the optimiser with a model shape the budget cannot afford."""
    try:
        design = build_design(parse(text), data)
        key = shape_of(design, build_pattern(design))
    except Exception:  # noqa: BLE001 - the real call below reports whatever this was
        return False
    if key in SEEN:
        return False
    if len(SEEN) >= COMPILE_BUDGET:
        return True
    SEEN.add(key)
    return False


def _known(w) -> bool:
    """Known numpy noise, reported to the owners of those files: covariance.py takes log(0) for a
    zero variance on the boundary (η = -inf there on purpose). (inference.py's confidence bound
    exp(η + z·se) no longer overflows with a warning when se is huge: it is NaN.)"""
    if not issubclass(w.category, RuntimeWarning):
        return False
    msg = str(w.message)
    return w.filename.endswith("covariance.py") and ("divide by zero" in msg or "invalid value" in msg)


def check(front, parse, text, data, kw):
    if _would_compile_new_shape(parse, text, data):
        STATS["design_only"] += 1
        return
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            r = front(text, data, **kw)
        except JaxmixedError as e:
            STATS["errors"] += 1
            MESSAGES.append(f"{type(e).__name__}: {e.reason if hasattr(e, 'reason') else e}"[:90])
            assert str(e), "a jaxmixed error must say what is wrong"
            r = None
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"{type(e).__name__} escaped for {text!r}: {e}\n{data.dtypes}") from e
    others = [w for w in rec if not issubclass(w.category, JaxmixedWarning) and not _known(w)]
    assert not others, [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in others]
    if r is None:
        return
    STATS["fits"] += 1
    assert isinstance(r, FitResult)
    assert np.isfinite(r.loglik) and np.isfinite(r.sigma) and r.sigma > 0
    assert np.all(np.isfinite(r.beta))
    assert r.nobs + r.n_dropped == len(data)
    if r.singular:  # no fake standard errors on the boundary
        assert r.random.se.isna().all()
        assert any(n.startswith("boundary") for n in r.notes)
    if not r.converged:
        assert any(n.startswith("convergence") for n in r.notes)
    str(r)  # the report renders


@FUZZ
@given(text=formulas, data=frames(), kw=options)
def test_fuzz_formulas(text, data, kw):
    check(jm.fit, jm.parse_formula, text, data, kw)


@FUZZ
@given(text=commands, data=frames(), kw=st.sampled_from([{}, {}, {"method": "ml"}, {"bogus": 1}]))
def test_fuzz_stata(text, data, kw):
    check(jm.xtmixed, jm.parse_stata, text, data, kw)


PLAUSIBLE = [
    (jm.fit, "y ~ x + (1 | g)"), (jm.fit, "y ~ x + z + (1 + x | g)"), (jm.fit, "y ~ x + h + (1 | g)"),
    (jm.fit, "y ~ x + (1 | g) + (1 | h)"), (jm.fit, "y ~ 0 + h + x + (x || g)"),
    (jm.xtmixed, "y x || g:"), (jm.xtmixed, "y x i.h || g: x, cov(un)"), (jm.xtmixed, "y c.x#i.h || g: R.h"),
    (jm.xtmixed, "y x z || _all: R.h || g:"),
]
CORRUPTIONS = ["nan", "inf", "string", "none", "huge", "constant", "drop_rows", "one_group", "bool", "duplicate"]


@st.composite
def plausible(draw):
    """A model that fits the standard frame, and that frame with a few corruptions."""
    front, text = draw(st.sampled_from(PLAUSIBLE))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = 24
    d = pd.DataFrame({"y": rng.normal(size=n), "x": rng.normal(size=n), "z": rng.normal(size=n),
                      "g": np.repeat([1, 2, 3], 8), "h": np.tile(["a", "b"], 12)})
    d["y"] += d.g.to_numpy() * 0.5 + d.x
    for kind in draw(st.lists(st.sampled_from(CORRUPTIONS), max_size=3)):
        col = draw(st.sampled_from(list(d.columns)))
        rows = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=4))
        numeric = pd.api.types.is_numeric_dtype(d[col])
        if kind == "nan":
            d[col] = d[col].astype(float) if numeric else d[col].astype(object)
            d.loc[rows, col] = np.nan
        elif kind == "inf" and numeric:
            d[col] = d[col].astype(float)
            d.loc[rows, col] = np.inf
        elif kind == "string":
            d[col] = d[col].astype(object)
            d.loc[rows, col] = "oops"
        elif kind == "none":
            d[col] = d[col].astype(object)
            d.loc[rows, col] = None
        elif kind == "huge" and numeric:
            d[col] = d[col].astype(float) * 1e160
        elif kind == "constant":
            d[col] = d[col].iloc[0]
        elif kind == "drop_rows":
            d = d.drop(index=rows).reset_index(drop=True)
            n = len(d)
        elif kind == "one_group":
            d["g"] = 1
        elif kind == "bool":
            d[col] = d[col].astype(bool)
        elif kind == "duplicate":
            d["z"] = d["x"]
    return front, text, d


@FUZZ
@given(case=plausible(), method=st.sampled_from(["reml", "ml"]))
def test_fuzz_plausible_models_on_corrupted_data(case, method):
    front, text, data = case
    parse = jm.parse_formula if front is jm.fit else jm.parse_stata
    check(front, parse, text, data, {"method": method})


def test_fuzz_reached_the_optimiser():
    """The fuzz tests above are only worth something if some inputs got all the way through."""
    assert STATS["fits"] >= 50 and STATS["fits"] + STATS["design_only"] >= 100, STATS
    assert STATS["errors"] >= 300, STATS
