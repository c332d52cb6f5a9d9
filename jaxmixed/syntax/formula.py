"""Reading lme4 / glmmTMB-style model formulas into a :class:`~jaxmixed.terms.ModelSpec`.

A hand-written tokenizer and recursive-descent parser; every malformed input raises
:class:`~jaxmixed.errors.FormulaError` with the character position of the problem.

Grammar (``:`` binds tighter than ``*`` and ``/``, which bind tighter than ``+`` and ``-``)::

    formula   := NAME '~' sum EOF
    sum       := ['+' | '-'] product (('+' | '-') product)*
    product   := interact (('*' | '/') interact)*
    interact  := atom (':' atom)*
    atom      := '0' | '1'                                  intercept off / on
               | NAME                                       a variable
               | 'C' '(' NAME [',' contrast] ')'            a categorical variable
               | '(' sum ')'                                grouping, e.g. (a + b):c
               | '(' rexpr ('|' | '||') group ')'           random-effects term
               | COVFUN '(' rexpr '|' group ')'             COVFUN: us, diag, homdiag, homcs
    contrast  := 'Treatment' ['(' [['reference' '='] literal] ')']
    literal   := ['-'] NUMBER | STRING
    rexpr     := ['+' | '-'] ritem (('+' | '-') ritem)*
    ritem     := '0' | '1' | NAME | NAME '(' ... ')'           a variable, or an expression (formulaic)
    group     := names ('/' names)*                         a/b: a and a:b (nesting)
    names     := NAME (':' NAME)*                           a:b: the joint levels of a and b

NAME is identifier-like (letters, digits, ``_``, and ``.`` after the first character) or
back-quoted (`` `odd name` ``). Random-effects terms may only appear directly in the top-level sum.

Semantics: ``a*b`` is ``a + b + a:b`` (terms of one ``*`` chain ordered by degree, as R does);
``a/b`` is ``a + a:b``; ``0``, ``+ 0`` or ``- 1`` drop the fixed intercept and ``1`` restores it
(the last one written wins); duplicate fixed terms are dropped (``a:b`` equals ``b:a``), keeping
the first. In a random term the intercept is implied unless ``0`` or ``- 1`` is given; its
columns are the slopes as written, then ``"_cons"``. ``|`` and ``us()`` give an unstructured
covariance, ``||`` and ``diag()`` an independent one, ``homdiag()`` identity and ``homcs()``
exchangeable; a one-column term is always ``"identity"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from jaxmixed.errors import FormulaError
from jaxmixed.model.spec import CONS, Factor, FixedTerm, Level, ModelSpec, RandomTerm

__all__ = ["parse_formula"]

#: covariance wrappers and the structure each one means
COV_FUNCTIONS = {"us": "unstructured", "diag": "independent", "homdiag": "identity", "homcs": "exchangeable"}
_SUPPORTED = "(expr | g), (expr || g), us(expr | g), diag(expr | g), homdiag(expr | g), homcs(expr | g)"

_TOKEN_RE = re.compile(
    r"""(?P<ws>\s+)
      | (?P<name>\.?[^\W\d][\w.]*)
      | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
      | (?P<bq>`[^`]*`)
      | (?P<string>'[^']*'|"[^"]*")
      | (?P<op>\|\||[~+\-*:/|(),=])""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class _Token:
    kind: str  # "name", "number", "string", "eof", or the operator itself ("~", "||", "(", ...)
    value: str
    pos: int
    quoted: bool = False  # a back-quoted name: never a function, never a keyword

    def describe(self) -> str:
        return "end of formula" if self.kind == "eof" else f"'{self.value}'"


@dataclass
class _Item:
    """One summand of a sum: fixed terms, an intercept switch, or random-effects terms."""

    kind: str  # "terms" (value: list of factor tuples), "intercept" (bool), "random" (RandomTerms)
    value: object
    pos: int


def _tokenize(text: str) -> list[_Token]:
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            ch = text[pos]
            if ch in "`'\"":
                raise FormulaError(f"unterminated {ch}quoted{ch}", text, pos)
            raise FormulaError(f"unexpected character {ch!r}", text, pos)
        kind, value = m.lastgroup, m.group()
        if kind == "bq":
            if not value[1:-1].strip():
                raise FormulaError("empty back-quoted name", text, pos)
            tokens.append(_Token("name", value[1:-1], pos, quoted=True))
        elif kind == "string":
            tokens.append(_Token("string", value[1:-1], pos))
        elif kind == "op":
            tokens.append(_Token(value, value, pos))
        elif kind != "ws":
            tokens.append(_Token(kind, value, pos))
        pos = m.end()
    tokens.append(_Token("eof", "", len(text)))
    return tokens


def _interact(left: list[tuple], right: list[tuple]) -> list[tuple]:
    """All products of a term on the left with a term on the right (left varies fastest, as in R)."""
    return [lt + tuple(f for f in rt if f not in lt) for rt in right for lt in left]


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0
        self.random_expressions: list[str] = []  # random slopes written as expressions, e.g. log(x)

    # -- helpers ---------------------------------------------------------------------------
    def peek(self, k: int = 0) -> _Token:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def advance(self) -> _Token:
        tok = self.peek()
        self.i = min(self.i + 1, len(self.toks) - 1)
        return tok

    def fail(self, message: str, pos: int):
        raise FormulaError(message, self.text, pos)

    def is_call(self) -> bool:
        return self.peek().kind == "name" and not self.peek().quoted and self.peek(1).kind == "("

    def bar_inside(self, i: int) -> bool:
        """Whether the parenthesis at token ``i`` holds a ``|`` or ``||`` at its own depth."""
        depth = 0
        for tok in self.toks[i:]:
            if tok.kind == "(":
                depth += 1
            elif tok.kind == ")":
                depth -= 1
                if depth == 0:
                    return False
            elif tok.kind in ("|", "||") and depth == 1:
                return True
        return False

    def check_name(self, tok: _Token) -> str:
        if tok.value == CONS:
            self.fail(f"'{CONS}' is reserved for the intercept and cannot be a variable name", tok.pos)
        return tok.value

    # -- formula and fixed part ------------------------------------------------------------
    def parse(self) -> ModelSpec:
        tok = self.peek()
        if tok.kind == "~":
            self.fail("missing response: the formula must start with a column name before '~'", tok.pos)
        if tok.kind != "name" or self.is_call():
            self.fail(f"the response must be a column name, found {tok.describe()}", tok.pos)
        response = self.check_name(self.advance())
        tok = self.peek()
        if tok.kind != "~":
            if not any(t.kind == "~" for t in self.toks):
                self.fail("missing '~' between the response and the predictors", tok.pos)
            self.fail(f"the response must be a single column name; unexpected {tok.describe()}", tok.pos)
        self.advance()
        items = self.parse_sum(top=True)
        tok = self.peek()
        if tok.kind != "eof":
            if tok.kind == ")":
                self.fail("unmatched ')'", tok.pos)
            if tok.kind in ("|", "||"):
                self.fail(f"'{tok.kind}' must be inside parentheses: write (expr {tok.kind} group)", tok.pos)
            if tok.kind == "~":
                self.fail("a formula has only one '~'", tok.pos)
            self.fail(f"unexpected {tok.describe()}: expected '+', '-' or the end of the formula", tok.pos)
        return self.build(response, items)

    def parse_sum(self, top: bool) -> list[_Item]:
        items, sign = [], "+"
        if self.peek().kind in ("+", "-"):
            sign = self.advance().kind
        while True:
            item = self.parse_product(top)
            if sign == "-":
                if item.kind != "intercept":
                    self.fail("only the intercept can be removed with '-' (write '- 1')", item.pos)
                item.value = not item.value
            items.append(item)
            if self.peek().kind not in ("+", "-"):
                return items
            sign = self.advance().kind

    def need_terms(self, item: _Item, op: _Token) -> list[tuple]:
        if item.kind == "intercept":
            self.fail(f"'{op.kind}' cannot be applied to the intercept (0 or 1)", item.pos)
        if item.kind == "random":
            self.fail(f"'{op.kind}' cannot be applied to a random-effects term", item.pos)
        return item.value

    def parse_product(self, top: bool) -> _Item:
        left = self.parse_interact(top)
        while self.peek().kind in ("*", "/"):
            op = self.advance()
            lt = self.need_terms(left, op)
            rt = self.need_terms(self.parse_interact(top), op)
            if op.kind == "*":
                terms = sorted(lt + rt + _interact(lt, rt), key=len)  # stable: by degree
            else:  # a/b = a + a:b, with all the variables of the left side
                outer = tuple(dict.fromkeys(f for t in lt for f in t))
                terms = lt + _interact([outer], rt)
            left = _Item("terms", terms, left.pos)
        return left

    def parse_interact(self, top: bool) -> _Item:
        left = self.parse_atom(top)
        while self.peek().kind == ":":
            op = self.advance()
            lt = self.need_terms(left, op)
            rt = self.need_terms(self.parse_atom(top), op)
            left = _Item("terms", _interact(lt, rt), left.pos)
        return left

    def parse_atom(self, top: bool) -> _Item:
        tok = self.peek()
        if tok.kind == "number":
            self.advance()
            if tok.value not in ("0", "1"):
                self.fail(f"unexpected number {tok.value}: only 0 and 1 (the intercept) are allowed", tok.pos)
            return _Item("intercept", tok.value == "1", tok.pos)
        if tok.kind == "name":
            if self.is_call():
                return self.parse_call(top)
            self.advance()
            return _Item("terms", [(Factor(self.check_name(tok)),)], tok.pos)
        if tok.kind == "(":
            if self.bar_inside(self.i):
                if not top:
                    self.fail("a random-effects term cannot be nested inside parentheses", tok.pos)
                return self.parse_random(tok.pos, None)
            self.advance()
            items = self.parse_sum(top=False)
            close = self.peek()
            hint = "; a random-effects term is written (expr | group)"
            if close.kind != ")":
                self.fail(f"expected ')' to close the '(' at position {tok.pos}, found {close.describe()}"
                          + (hint if close.kind in ("name", "number") else ""), close.pos)
            self.advance()
            terms = []
            for item in items:
                if item.kind != "terms":
                    self.fail("the intercept (0 or 1) cannot appear inside parentheses" + hint, item.pos)
                terms += item.value
            return _Item("terms", terms, tok.pos)
        self.fail(f"expected a term (a variable, C(...), 0, 1 or '('), found {tok.describe()}", tok.pos)

    def parse_call(self, top: bool) -> _Item:
        name = self.peek()
        if name.value == "C":
            return self.parse_categorical()
        if name.value in COV_FUNCTIONS:
            if not top:
                self.fail(f"{name.value}() cannot be nested inside parentheses", name.pos)
            if not self.bar_inside(self.i + 1):
                self.fail(f"{name.value}() must wrap a random-effects term: {name.value}(expr | group)",
                          name.pos)
            self.advance()
            return self.parse_random(name.pos, name.value)
        if self.bar_inside(self.i + 1):
            self.fail(f"unsupported covariance structure '{name.value}()'; supported: {_SUPPORTED}", name.pos)
        self.fail(f"unknown function '{name.value}()': only C(x) and the covariance wrappers "
                  f"{', '.join(COV_FUNCTIONS)} are supported (create transformed variables as columns)",
                  name.pos)

    def parse_categorical(self) -> _Item:
        start = self.advance().pos
        self.advance()  # "("
        tok = self.peek()
        if tok.kind != "name" or self.is_call():
            self.fail(f"C() takes a plain column name, found {tok.describe()}", tok.pos)
        var = self.check_name(self.advance())
        base = None
        if self.peek().kind == ",":
            self.advance()
            base = self.parse_contrast()
        close = self.peek()
        if close.kind != ")":
            self.fail(f"expected ')' to close C(, found {close.describe()}", close.pos)
        self.advance()
        return _Item("terms", [(Factor(var, True, base),)], start)

    def parse_contrast(self) -> object:
        tok = self.peek()
        if tok.kind != "name" or tok.value != "Treatment":
            self.fail("only treatment contrasts are supported: C(x, Treatment(reference=...))", tok.pos)
        self.advance()
        if self.peek().kind != "(":
            return None
        self.advance()
        base = None
        if self.peek().kind != ")":
            if self.peek().kind == "name" and self.peek().value == "reference" and self.peek(1).kind == "=":
                self.advance(), self.advance()
            base = self.parse_literal()
        close = self.peek()
        if close.kind != ")":
            self.fail(f"expected ')' to close Treatment(, found {close.describe()}", close.pos)
        self.advance()
        return base

    def parse_literal(self) -> object:
        negative = self.peek().kind == "-"
        if negative:
            self.advance()
        tok = self.advance()
        if tok.kind == "string" and not negative:
            return tok.value
        if tok.kind == "number":
            value = int(tok.value) if tok.value.isdigit() else float(tok.value)
            return -value if negative else value
        self.fail(f"expected a number or a quoted string as the reference level, found {tok.describe()}",
                  tok.pos)

    # -- random part -----------------------------------------------------------------------
    def parse_random(self, start: int, func: str | None) -> _Item:
        opening = self.advance()  # "("
        slopes, intercept = self.parse_random_expr()
        bar = self.advance()  # parse_random_expr stops only at "|" or "||"
        if func is not None and bar.kind == "||":
            self.fail(f"'||' cannot be used inside {func}(); write {func}(expr | group)", bar.pos)
        nesting = self.parse_group(bar)
        close = self.peek()
        if close.kind != ")":
            self.fail(f"expected ')' to close the random-effects term opened at position {opening.pos}, "
                      f"found {close.describe()}", close.pos)
        self.advance()
        columns = tuple(slopes) + ((CONS,) if intercept else ())
        if not columns:
            self.fail("a random-effects term needs at least one column (it has neither an intercept "
                      "nor a slope)", opening.pos)
        if len(columns) == 1:
            cov = "identity"
        elif func is None:
            cov = "unstructured" if bar.kind == "|" else "independent"
        else:
            cov = COV_FUNCTIONS[func]
        terms = [RandomTerm(group=g, columns=columns, cov=cov, label=":".join(g)) for g in nesting]
        return _Item("random", terms, start)

    def parse_random_expr(self) -> tuple[list[str], bool]:
        slopes: list[str] = []
        intercept, sign = True, "+"
        if self.peek().kind in ("+", "-"):
            sign = self.advance().kind
        while True:
            tok = self.peek()
            if tok.kind == "number" and tok.value in ("0", "1"):
                intercept = (tok.value == "1") != (sign == "-")
            elif tok.kind == "name" and self.is_call() and tok.value not in COV_FUNCTIONS and tok.value != "C":
                # an expression such as log(x) or scale(x): evaluated by formulaic into one column
                depth, j = 0, self.i + 1
                while True:
                    t = self.toks[j]
                    if t.kind == "eof":
                        self.fail(f"unclosed '(' after '{tok.value}'", self.toks[self.i + 1].pos)
                    depth += t.kind == "("
                    depth -= t.kind == ")"
                    if depth == 0:
                        break
                    j += 1
                expr = self.text[tok.pos:self.toks[j].pos + 1]
                if sign == "-":
                    self.fail("only the intercept can be removed with '-' (write '- 1')", tok.pos)
                if expr in slopes:
                    self.fail(f"'{expr}' appears twice in the random-effects term", tok.pos)
                slopes.append(expr)
                self.random_expressions.append(expr)
                self.i = j
            elif tok.kind == "name" and self.is_call():
                self.fail(f"random slopes must be plain variable names; '{tok.value}(...)' is not "
                          "allowed in a random-effects term", tok.pos)
            elif tok.kind == "name":
                if sign == "-":
                    self.fail("only the intercept can be removed with '-' (write '- 1')", tok.pos)
                if tok.value in slopes:
                    self.fail(f"'{tok.value}' appears twice in the random-effects term", tok.pos)
                slopes.append(self.check_name(tok))
            else:
                self.fail(f"expected a random slope variable, 0 or 1, found {tok.describe()}", tok.pos)
            self.advance()
            tok = self.peek()
            if tok.kind in ("|", "||"):
                return slopes, intercept
            if tok.kind in (":", "*", "/"):
                self.fail(f"interactions ('{tok.kind}') are not supported in a random-effects term; "
                          "create the product as a column", tok.pos)
            if tok.kind not in ("+", "-"):
                self.fail(f"expected '+', '-', '|' or '||' in the random-effects term, found "
                          f"{tok.describe()}", tok.pos)
            sign = self.advance().kind

    def parse_group(self, bar: _Token) -> list[tuple[str, ...]]:
        """``a/b:c`` -> [("a",), ("a", "b", "c")]: one group per nesting level."""
        groups: list[tuple[str, ...]] = []
        names: list[str] = []
        after = bar
        while True:
            tok = self.peek()
            if tok.kind != "name" or self.is_call():
                what = "empty grouping" if tok.kind in (")", "eof") else f"found {tok.describe()}"
                self.fail(f"expected a grouping variable after '{after.kind}' ({what})", tok.pos)
            if tok.value in names:
                self.fail(f"grouping variable '{tok.value}' appears twice", tok.pos)
            names.append(self.check_name(self.advance()))
            if self.peek().kind not in (":", "/"):
                groups.append(tuple(names))
                return groups
            after = self.advance()
            if after.kind == "/":
                groups.append(tuple(names))

    # -- assembly --------------------------------------------------------------------------
    def build(self, response: str, items: list[_Item]) -> ModelSpec:
        intercept = True
        fixed: dict[frozenset, FixedTerm] = {}
        random: list[RandomTerm] = []
        used: dict[tuple[str, ...], set[str]] = {}  # columns already random at each group
        for item in items:
            if item.kind == "intercept":
                intercept = item.value
            elif item.kind == "terms":
                for factors in item.value:
                    fixed.setdefault(frozenset(factors), FixedTerm(tuple(factors)))
            else:
                for term in item.value:
                    clash = used.setdefault(term.group, set()) & set(term.columns)
                    if clash:
                        self.fail(f"random effect '{sorted(clash)[0]}' at level '{term.label or '_all'}' "
                                  "is given twice", item.pos)
                    used[term.group] |= set(term.columns)
                    random.append(term)
        levels = tuple(Level(":".join(g), g) for g in dict.fromkeys(t.group for t in random))
        return ModelSpec(response=response, intercept=intercept, fixed=tuple(fixed.values()),
                         random=tuple(random), levels=levels, syntax="formula", text=self.text,
                         options=_expression_options(self.random_expressions))


def _identifiers(text: str) -> list[str]:
    """The identifiers of an expression that may be data columns: not functions, keywords or
    argument names (formulaic does not list the variables inside stateful transforms)."""
    bare = re.sub(r"'[^']*'|\"[^\"]*\"", " ", text)
    found = [m.group(0) for m in re.finditer(r"(?<![\w.])[A-Za-z_][\w.]*(?![\w.]*\s*[(=])", bare)
             if m.group(0) not in ("True", "False", "None")]
    return list(dict.fromkeys(found))


def _expression_options(expressions) -> dict:
    """Options for random slopes written as expressions (evaluated by formulaic in the design)."""
    if not expressions:
        return {}
    return {"random_expressions": tuple(expressions),
            "random_candidates": tuple(dict.fromkeys(v for e in expressions for v in _identifiers(e)))}


def parse_formula(text: str) -> ModelSpec:
    """Parse an lme4-style formula such as ``"y ~ x + (1 + x | g)"`` into a :class:`ModelSpec`.

    Raises :class:`FormulaError` (with the position of the problem) for anything malformed.
    A formula without random-effects terms is returned as is; the fitting layer decides.

    Expressions in the fixed part or the response that this parser does not know (``I(x**2)``,
    R's ``I(x^2)``, ``log(x)``, ``np.log(x)``, ``poly(x, 2)``, ``scale(x)``, ``center(x)``,
    splines, ``C(x, Treatment("b"))``, ``log(y) ~ ...``) go to formulaic (:func:`_with_formulaic`):
    the random-effects terms stay with this parser, the fixed part and the response become a
    formulaic formula in ``spec.options["fixed_formula"]``.
    """
    if not isinstance(text, str):
        raise FormulaError(f"a formula must be a string, not {type(text).__name__}")
    if not text.strip():
        raise FormulaError("empty formula", text, 0)
    try:
        return _Parser(text).parse()
    except FormulaError as err:
        if not _wants_formulaic(text, err):
            raise
        return _with_formulaic(text, err)


# ---------------------------------------------------------------------------------------------
# expressions through formulaic


def _top_level_split(text: str):
    """(lhs, fixed part, [random-effects term texts]) of a formula, or None when its brackets
    or '~' do not allow the split (the parser's own message is then the better one)."""
    depth, tilde = 0, None
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "~" and depth == 0:
            if tilde is not None:
                return None
            tilde = i
    if tilde is None or depth != 0:
        return None
    lhs, rhs = text[:tilde].strip(), text[tilde + 1:]
    randoms, keep, i = [], [], 0
    while i < len(rhs):
        m = re.match(r"(us|diag|homdiag|homcs)?\s*\(", rhs[i:])
        start_ok = not rhs[:i].rstrip() or rhs[:i].rstrip()[-1] in "+-~"
        if m and start_ok:
            j, depth, bar = i + m.end() - 1, 0, False
            for k in range(j, len(rhs)):
                depth += rhs[k] == "("
                depth -= rhs[k] == ")"
                if rhs[k] == "|" and depth == 1:
                    bar = True
                if depth == 0:
                    break
            if bar:
                randoms.append(rhs[i:k + 1].strip())
                i = k + 1
                continue
        keep.append(rhs[i])
        i += 1
    fixed = "".join(keep)
    # drop the '+' signs left around the removed terms
    fixed = re.sub(r"(\+\s*)+(?=\+|$)", "", fixed.strip())
    fixed = re.sub(r"^\s*\+", "", fixed).strip()
    return lhs, fixed, randoms


_EXPRESSION = re.compile(r"[A-Za-z_][\w.]*\s*\(|\*\*|\^")


def _wants_formulaic(text: str, err: FormulaError) -> bool:
    """A formula this parser refused that holds an expression it does not know (a function
    call, ``**`` or ``^``) in the fixed part or the response, while its random-effects terms
    are plain: formulaic reads the fixed part instead."""
    split = _top_level_split(text)
    if split is None or not split[2]:
        return False
    lhs, fixed, _ = split
    plain_lhs = re.fullmatch(r"[A-Za-z_.][\w.]*|`[^`]*`", lhs) is not None
    return (not plain_lhs and bool(lhs)) or bool(_EXPRESSION.search(fixed))


def _with_formulaic(text: str, err: FormulaError) -> ModelSpec:
    split = _top_level_split(text)
    if split is None:
        raise err
    lhs, fixed, randoms = split
    if not randoms:
        raise err
    try:
        import formulaic
    except ImportError:  # pragma: no cover - a declared dependency
        raise err from None
    # R's I(x^2) is Python's I(x**2) (^ is Python's exclusive or)
    fixed_text = re.sub(r"\^", "**", fixed) if fixed else "1"
    lhs_text = re.sub(r"\^", "**", lhs)
    formula_text = f"{lhs_text} ~ {fixed_text}"
    try:
        parsed = formulaic.Formula(formula_text)
        lhs_vars = sorted(formulaic.Formula(f"{lhs_text} ~ 1").required_variables)
        rhs_vars = sorted(formulaic.Formula(fixed_text).required_variables)
    except Exception as exc:  # noqa: BLE001 - formulaic's own errors, as a FormulaError
        raise FormulaError(f"the fixed part cannot be read: {str(exc).splitlines()[0]}", text, 0) from None
    if not lhs_vars:
        raise FormulaError("the response must use a column of the data", text, 0)
    parser = _Parser(f"{lhs_vars[0]} ~ 0 + " + " + ".join(randoms))
    ours = parser.parse()
    del parsed
    # formulaic does not list the variables inside stateful transforms (poly, scale, bs, ...):
    # every other identifier that is not a function, keyword or argument name may be a column
    candidates = [v for v in _identifiers(fixed_text) if v not in rhs_vars]
    return ModelSpec(response=lhs_text.strip(), intercept=False, fixed=(), random=ours.random, levels=ours.levels,
                     syntax="formula", text=text,
                     options={"fixed_formula": formula_text, "fixed_variables": tuple(rhs_vars),
                              "fixed_candidates": tuple(dict.fromkeys(candidates)),
                              "response_variables": tuple(lhs_vars), **ours.options})


# ---------------------------------------------------------------------------------------------
# GLMM parts of a formula: cbind(successes, failures) responses and offset(...) terms

#: the column name a GLMM's response is read from once its expression is evaluated
RESPONSE_COLUMN = "_jm_response"


def _closing(text: str, start: int) -> int:
    """Index of the ')' matching the '(' at ``start`` (-1 if none)."""
    depth = 0
    for k in range(start, len(text)):
        depth += text[k] == "("
        depth -= text[k] == ")"
        if depth == 0:
            return k
    return -1


def _split_args(inner: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in inner:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def glm_parts(text: str):
    """(formula, response, offsets) of a GLMM formula: ``formula`` with the response replaced by
    :data:`RESPONSE_COLUMN` and every top-level ``offset(expr)`` term removed; ``response`` the
    response text, or (successes, failures) expressions for ``cbind(s, f)``; ``offsets`` the
    offset expressions. FormulaError (with the position) for a malformed ``cbind`` or
    ``offset``."""
    if not isinstance(text, str):
        raise FormulaError(f"a formula must be a string, not {type(text).__name__}")
    depth, tilde = 0, None
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "~" and depth == 0:
            tilde = i
            break
    if tilde is None:
        raise FormulaError("a formula needs '~' between the response and the model", text, len(text))
    lhs, rhs = text[:tilde].strip(), text[tilde + 1:]
    if not lhs:
        raise FormulaError("the formula has no response before '~'", text, 0)
    response = lhs
    m = re.fullmatch(r"cbind\s*\((.*)\)", lhs, flags=re.S)
    if m:
        args = _split_args(m.group(1))
        if len(args) != 2 or not all(args):
            raise FormulaError("cbind() needs two arguments: cbind(successes, failures)", text, text.index("cbind"))
        response = (args[0], args[1])
    offsets, keep, i = [], [], 0
    while i < len(rhs):
        mo = re.match(r"offset\s*\(", rhs[i:])
        before = "".join(keep).rstrip()
        if mo and (not before or before[-1] in "+~"):
            j = _closing(rhs, i + mo.end() - 1)
            if j < 0:
                raise FormulaError("unclosed '(' in offset()", text, tilde + 1 + i)
            expr = rhs[i + mo.end():j].strip()
            if not expr:
                raise FormulaError("offset() needs an expression", text, tilde + 1 + i)
            offsets.append(expr)
            while keep and keep[-1].isspace():
                keep.pop()
            if keep and keep[-1] == "+":
                keep.pop()
            i = j + 1
            continue
        keep.append(rhs[i])
        i += 1
    rest = "".join(keep).strip()
    rest = re.sub(r"^\+\s*", "", rest)
    if not rest:
        rest = "1"
    return f"{RESPONSE_COLUMN} ~ {rest}", response, offsets
