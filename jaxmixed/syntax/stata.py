"""Stata ``xtmixed`` / ``mixed`` command syntax -> :class:`~jaxmixed.terms.ModelSpec`.

A hand-written tokenizer and recursive-descent parser for the model part of a Stata command::

    command  := [ "xtmixed" | "mixed" ] fe_eq { "||" re_eq } END
    fe_eq    := depvar { fterm } [ "," options ]
    fterm    := factor { "#" factor }  |  factor { "##" factor }
    factor   := [ op "." ] varname
    op       := "i" | "c" | "ib" INT | "ib(first)" | "ib(last)" | "ib(freq)" | "ibn"
    re_eq    := levelvar ":" ( "R." varname | { varname } ) [ "," options ]
    levelvar := varname | "_all"
    options  := { optname [ "(" args ")" ] }

Fixed part (Stata's factor-variable rules): a lone unprefixed ``x`` is continuous, ``i.x`` and
``ib3.x`` categorical (base level 3; ``ib(first)``/``ib(last)``/``ib(freq)`` store
``"first"``/``"last"``/``"freq"``, the most frequent level; ``ibn.x`` no base level, ``"none"``),
``c.x`` continuous; inside ``a#b`` an unprefixed variable is categorical; ``a##b`` is the full
factorial ``a b a#b`` (``a##b##c``: ``a b c a#b a#c b#c a#b#c``). Identical terms are kept once.

Random part: equations are listed from the highest level down. The k-th equation's group is the
distinct level variables (``_all`` excluded) up to and including its own; consecutive equations
at one level share it, and only the last of them (not counting ``R.`` equations) gets the
implicit ``_cons``. ``R.v`` (alone in its equation) is an identity-covariance intercept on the
level's group plus ``v``. The default covariance is ``independent``; an equation with a single
column is always ``identity`` (the structures coincide there). ``_all`` (one group, ``()``) may
only precede the other levels, and a level may not reappear after a different one.

Options are matched with Stata's minimum abbreviations (``noc``onstant, ``cov``ariance,
``var``iance, ``stddev``iations, ...). In a random equation ``covariance()`` and ``noconstant``
belong to the equation and every other (global) option goes to ``ModelSpec.options``; the same
holds after the fixed part, where ``noconstant`` drops the fixed intercept. A leading ``mixed``
or ``xtmixed`` word is always read as the command name, never as the dependent variable.
Every failure is a :class:`~jaxmixed.errors.FormulaError` pointing at the offending position.
"""

from __future__ import annotations

import re
from itertools import combinations
from typing import NamedTuple

from jaxmixed.errors import FormulaError
from jaxmixed.model.spec import CONS, Factor, FixedTerm, Level, ModelSpec, RandomTerm

__all__ = ["parse_stata"]

# the me* commands and the (family, link) each fixes (meglm: its family() and link() options)
ME_COMMANDS = {"melogit": ("bernoulli", "logit"), "meprobit": ("bernoulli", "probit"),
               "mecloglog": ("bernoulli", "cloglog"), "mepoisson": ("poisson", "log"),
               "menbreg": ("nbinomial", "log"), "meglm": (None, None)}
_COMMANDS = ("xtmixed", "mixed", *ME_COMMANDS)
_TOKEN = re.compile(
    r"(?P<ws>\s+|///[^\n]*(?:\n|$))"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<num>\d+(?:\.\d*)?|\.\d+)"
    r"|(?P<op>\|\||##|[#:,().])"
)
# option name -> (minimum abbreviation length, takes an argument)
_OPTIONS = {
    "noconstant": (3, False),
    "covariance": (3, True),
    "reml": (4, False),
    "mle": (2, False),
    "variance": (3, False),
    "stddeviations": (6, False),
    "log": (3, False),
    "nolog": (5, False),
    "nogroup": (4, False),
    "nofetable": (5, False),
    "noretable": (5, False),
    "noheader": (5, False),
    "nolrtest": (4, False),
    "level": (1, True),
    "residuals": (3, True),
    "dfmethod": (3, True),
    # generalized linear mixed models (meglm and the me* commands)
    "family": (2, True),
    "link": (4, True),
    "binomial": (5, True),
    "offset": (6, True),
    "exposure": (3, True),
    "intpoints": (6, True),
    "intmethod": (7, True),
    "or": (2, False),
    "irr": (3, False),
    "eform": (5, False),
}
_INTMETHODS = {"mvaghermite": 2, "ghermite": 2, "laplace": 2, "mcaghermite": 2}
_DFMETHODS = {"residual": 3, "repeated": 3, "anova": 3, "satterthwaite": 3, "kroger": 2}
# global option -> (ModelSpec.options key, value); level() is handled separately
_GLOBAL = {
    "reml": ("method", "reml"),
    "mle": ("method", "ml"),
    "variance": ("variance", True),
    "stddeviations": ("variance", False),
    "log": ("log", True),
    "nolog": ("log", False),
    "nogroup": ("group", False),
    "nofetable": ("fetable", False),
    "noretable": ("retable", False),
    "noheader": ("header", False),
    "nolrtest": ("lrtest", False),
}
# covariance structure -> minimum abbreviation length
_VARTYPES = {"identity": 2, "independent": 3, "exchangeable": 2, "unstructured": 2}


class _Tok(NamedTuple):
    kind: str  # "name", "num", "||", "#", "##", ":", ",", "(", ")", ".", "bad", "end"
    value: str
    pos: int


class _Opt(NamedTuple):
    name: str  # canonical option name
    word: str  # as written
    args: tuple[_Tok, ...] | None  # None: written without parentheses
    pos: int


class _Equation(NamedTuple):
    level: str
    pos: int
    columns: tuple[str, ...]
    rterm: tuple[str, int] | None  # (varname, position) for ``R.varname``
    options: tuple[_Opt, ...]


def parse_stata(command: str) -> ModelSpec:
    """Read a Stata ``xtmixed``/``mixed`` command into a :class:`ModelSpec` (``syntax="stata"``).

    ``ModelSpec.options`` always holds ``"command"`` (``"xtmixed"``, ``"mixed"`` or None) and,
    only when given, ``method`` (``"ml"``/``"reml"``), ``variance`` (True for ``variance``,
    False for ``stddeviations``), ``level`` (float), ``log``, ``group``, ``fetable``,
    ``retable``, ``header`` and ``lrtest`` (False for the ``no...`` forms).

    Raises :class:`FormulaError` (with the position of the problem) for anything it cannot read.
    """
    if not isinstance(command, str):
        raise FormulaError(f"a Stata command must be a string, not {type(command).__name__}")
    return _Parser(command).parse()


def _abbrev(word: str, table: dict) -> str | None:
    """The name in ``table`` (name -> min length or (min length, ...)) that ``word`` abbreviates."""
    for name, spec in table.items():
        minimum = spec[0] if isinstance(spec, tuple) else spec
        if len(word) >= minimum and name.startswith(word):
            return name
    return None


def _takes_constant(eqs: list[_Equation], k: int) -> bool:
    """Whether equation ``k`` gets the implicit ``_cons``: only the last equation of a run of
    consecutive equations at one level does (``R.`` equations cannot carry it, so it goes to the
    last equation that is not one)."""
    for later in eqs[k + 1:]:
        if later.level != eqs[k].level:
            break
        if later.rterm is None:
            return False
    return True


def _describe(tok: _Tok) -> str:
    return "end of command" if tok.kind == "end" else repr(tok.value)


def _tokenize(text: str) -> list[_Tok]:
    toks, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:  # reported when the parser reaches it, so earlier errors come first
            toks.append(_Tok("bad", text[pos], pos))
            break
        kind = m.lastgroup
        if kind != "ws":
            toks.append(_Tok(m.group() if kind == "op" else kind, m.group(), pos))
        pos = m.end()
    toks.append(_Tok("end", "", len(text)))
    return toks


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0
        self.options: dict = {}
        self.written: dict[str, str] = {}  # options key -> the option word that set it

    # -- token helpers -------------------------------------------------------------------------
    def peek(self, k: int = 0) -> _Tok:
        tok = self.toks[min(self.i + k, len(self.toks) - 1)]
        if tok.kind == "bad":
            hint = " (use '||' between equations)" if tok.value == "|" else ""
            self.error(f"unexpected character {tok.value!r}{hint}", tok.pos)
        return tok

    def next(self) -> _Tok:
        tok = self.peek()
        self.i = min(self.i + 1, len(self.toks) - 1)
        return tok

    def error(self, message: str, pos: int):
        raise FormulaError(message, self.text, pos)

    def expect(self, kind: str, what: str) -> _Tok:
        tok = self.peek()
        if tok.kind != kind:
            self.error(f"expected {what}, found {_describe(tok)}", tok.pos)
        return self.next()

    def varname(self, what: str, allow_all: bool = False) -> tuple[str, int]:
        tok = self.expect("name", what)
        if tok.value in ("if", "in"):
            self.error("if/in qualifiers are not supported; subset the data instead", tok.pos)
        if tok.value == CONS or (tok.value == "_all" and not allow_all):
            self.error(f"{tok.value} cannot be used as a variable name here", tok.pos)
        return tok.value, tok.pos

    # -- grammar -------------------------------------------------------------------------------
    def parse(self) -> ModelSpec:
        if self.peek().kind == "end":
            self.error("empty command", 0)
        cmd, first = None, self.peek()
        if first.kind == "name" and first.value in _COMMANDS and self.peek(1).kind != ".":
            cmd = self.next().value
        self.options["command"] = cmd
        response, intercept, fixed = self.fixed_equation()
        equations = []
        while self.peek().kind == "||":
            self.next()
            equations.append(self.random_equation())
        tok = self.peek()
        if tok.kind != "end":
            self.error(f"unexpected {_describe(tok)}", tok.pos)
        random, levels = self.build_random(equations)
        return ModelSpec(response=response, intercept=intercept, fixed=fixed, random=random,
                         levels=levels, syntax="stata", text=self.text, options=self.options)

    def fixed_equation(self) -> tuple[str, bool, tuple[FixedTerm, ...]]:
        tok = self.peek()
        if tok.kind != "name" or self.peek(1).kind in (".", "#", "##"):
            msg = "missing dependent variable"
            if tok.kind == "name":
                msg = "the dependent variable must be a plain variable name"
            self.error(msg, tok.pos)
        response, _ = self.varname("the dependent variable")
        terms: list[FixedTerm] = []
        while self.peek().kind not in (",", "||", "end"):
            for term in self.fixed_term():
                if term not in terms:
                    terms.append(term)
        intercept = True
        for opt in self.option_list():
            if opt.name == "noconstant":
                intercept = False
            elif opt.name == "covariance":
                self.error("covariance() belongs to a random-effects equation", opt.pos)
            else:
                self.apply_global(opt)
        return response, intercept, tuple(terms)

    def fixed_term(self) -> list[FixedTerm]:
        factors = [self.factor()]
        ops: list[_Tok] = []
        while self.peek().kind in ("#", "##"):
            ops.append(self.next())
            factors.append(self.factor())
        if not ops:  # a lone variable: continuous unless i./ib.
            var, cat, base = factors[0]
            return [FixedTerm((Factor(var, bool(cat), base),))]
        for op in ops:
            if op.kind != ops[0].kind:
                self.error("cannot mix '#' and '##' in one term", op.pos)
        fs = [Factor(var, True if cat is None else cat, base) for var, cat, base in factors]
        if ops[0].kind == "#":
            return [FixedTerm(tuple(fs))]
        return [FixedTerm(tuple(fs[j] for j in combo))
                for r in range(1, len(fs) + 1) for combo in combinations(range(len(fs)), r)]

    def factor(self) -> tuple[str, bool | None, object]:
        """One variable with its operator: (name, categorical or None if unprefixed, base)."""
        tok = self.peek()
        if tok.kind == "(":
            self.error("parenthesised variable lists are not supported", tok.pos)
        if tok.kind != "name":
            self.error(f"expected a variable name, found {_describe(tok)}", tok.pos)
        if tok.value == "ib" and self.peek(1).kind == "(":
            self.next()
            self.next()
            arg = self.peek()
            if arg.kind != "name" or arg.value not in ("first", "last", "freq"):
                self.error("ib() takes 'first', 'last' or 'freq'; use ib#.x for a base value #", arg.pos)
            self.next()
            self.expect(")", "')'")
            self.expect(".", "'.' after ib(...)")
            return self.varname("a variable name after 'ib(...).'")[0], True, arg.value
        if self.peek(1).kind != ".":
            return self.varname("a variable name")[0], None, None
        op = tok.value
        self.next()
        self.next()
        if self.peek().kind == "(":
            self.error("parenthesised variable lists are not supported", self.peek().pos)
        m = re.fullmatch(r"ib(\d+)", op)
        if op == "i":
            cat, base = True, None
        elif op == "c":
            cat, base = False, None
        elif m:
            cat, base = True, int(m.group(1))
        elif op == "ibn":
            cat, base = True, "none"
        elif op in ("L", "F", "D", "S") or re.fullmatch(r"[LFDS]\d+", op):
            self.error(f"time-series operator '{op}.' is not supported; add the lagged, lead or differenced "
                       "variable to the data as a column", tok.pos)
        elif op == "R":
            self.error("R.varname is only allowed in a random-effects equation", tok.pos)
        else:
            self.error(f"unknown factor-variable operator '{op}.'", tok.pos)
        return self.varname(f"a variable name after '{op}.'")[0], cat, base

    def random_equation(self) -> _Equation:
        tok = self.peek()
        if tok.kind == ":":
            self.error("missing level variable before ':'", tok.pos)
        if tok.kind != "name":
            self.error(f"expected 'levelvar:' after '||', found {_describe(tok)}", tok.pos)
        level, lpos = self.varname("a level variable", allow_all=True)
        colon = self.peek()
        if colon.kind != ":":
            self.error(f"expected ':' after level variable {level!r}, found {_describe(colon)}",
                       colon.pos)
        self.next()
        columns: list[str] = []
        rterm = None
        while self.peek().kind not in (",", "||", "end"):
            tok = self.peek()
            if rterm is not None:
                self.error(f"R.{rterm[0]} must be alone in its equation", tok.pos)
            if tok.kind in ("#", "##"):
                self.error("interactions are not allowed in random-effects equations", tok.pos)
            if tok.kind == "name" and self.peek(1).kind == ".":
                if tok.value != "R":
                    self.error(f"operator '{tok.value}.' is not allowed in a random-effects "
                               "equation (only R.varname is)", tok.pos)
                if columns:
                    self.error(f"R.{self.peek(2).value} must be alone in its equation", tok.pos)
                self.next()
                self.next()
                rterm = (self.varname("a variable name after 'R.'")[0], tok.pos)
                continue
            if tok.kind != "name":
                self.error(f"unexpected {_describe(tok)}", tok.pos)
            var, pos = self.varname("a variable name")
            if var in columns:
                self.error(f"variable {var!r} repeated in the equation", pos)
            columns.append(var)
        return _Equation(level, lpos, tuple(columns), rterm, tuple(self.option_list()))

    def option_list(self) -> list[_Opt]:
        """``, opt opt(args) ...`` up to the next ``||`` or the end; nothing if no comma."""
        if self.peek().kind != ",":
            return []
        self.next()
        out = []
        while self.peek().kind not in ("||", "end"):
            tok = self.peek()
            if tok.kind != "name":
                self.error(f"unexpected {_describe(tok)} in options", tok.pos)
            self.next()
            args = None
            if self.peek().kind == "(":
                lparen, args, depth = self.next(), [], 1
                while True:
                    arg = self.peek()
                    if arg.kind in ("end", "||"):
                        self.error("unclosed '('", lparen.pos)
                    self.next()
                    depth += {"(": 1, ")": -1}.get(arg.kind, 0)
                    if depth == 0:
                        break
                    args.append(arg)
                args = tuple(args)
            name = _abbrev(tok.value, _OPTIONS)
            if name is None:
                self.error(f"unknown option {tok.value!r}", tok.pos)
            if _OPTIONS[name][1] and not args:
                self.error(f"option {name}() needs an argument", tok.pos)
            if not _OPTIONS[name][1] and args is not None:
                self.error(f"option {name} takes no argument", tok.pos)
            out.append(_Opt(name, tok.value, args, tok.pos))
        return out

    # -- options -------------------------------------------------------------------------------
    def apply_global(self, opt: _Opt) -> None:
        if opt.name == "residuals":
            from jaxmixed.model.residuals import from_stata

            words = [(t.kind, t.value, t.pos) for t in opt.args]
            if "residuals" in self.options:
                self.error("residuals() given twice", opt.pos)
            self.options["residuals"] = from_stata(words, self.text)
            self.written["residuals"] = opt.word
            return
        if opt.name in ("family", "link", "binomial", "offset", "exposure", "intpoints", "intmethod",
                        "or", "irr", "eform"):
            key, value = self.glm_option(opt)
        elif opt.name == "dfmethod":
            args = opt.args or ()
            name = _abbrev(args[0].value, _DFMETHODS) if len(args) == 1 and args[0].kind == "name" else None
            if name is None:
                self.error("dfmethod() takes one of residual, repeated, anova, satterthwaite or kroger",
                           args[0].pos if args else opt.pos)
            key, value = "dfmethod", name
        elif opt.name == "level":
            arg = opt.args[0]
            if len(opt.args) != 1 or arg.kind != "num" or not 10 <= float(arg.value) <= 99.99:
                self.error("level() needs a number between 10 and 99.99", arg.pos)
            key, value = "level", float(arg.value)
        else:
            key, value = _GLOBAL[opt.name]
        if key in self.options and self.options[key] != value:
            self.error(f"option {opt.word} conflicts with {self.written[key]}", opt.pos)
        self.options[key] = value
        self.written[key] = opt.word

    def glm_option(self, opt: _Opt) -> tuple[str, object]:
        """(options key, value) of a GLMM option: family(name [n|varname]), link(name),
        binomial(n|varname), offset(varname), exposure(varname), intpoints(#),
        intmethod(mvaghermite|ghermite|laplace), or / irr / eform."""
        args = opt.args or ()
        if opt.name in ("or", "irr", "eform"):
            return "eform", True
        if opt.name == "family":
            if args[0].kind != "name":
                self.error("family() needs a family name such as bernoulli, binomial, poisson, nbinomial, "
                           "gamma or gaussian", args[0].pos)
            fam = args[0].value.lower()
            if len(args) > 1:
                if fam != "binomial" or len(args) != 2 or args[1].kind not in ("num", "name"):
                    self.error("only family(binomial n) or family(binomial varname) takes a second word", args[1].pos)
                self.options["binomial_n"] = float(args[1].value) if args[1].kind == "num" else args[1].value
            return "family", fam
        if opt.name == "binomial":
            if len(args) != 1 or args[0].kind not in ("num", "name"):
                self.error("binomial() needs the number of trials or the variable holding them", opt.pos)
            return "binomial_n", float(args[0].value) if args[0].kind == "num" else args[0].value
        if opt.name in ("offset", "exposure"):
            if len(args) != 1 or args[0].kind != "name":
                self.error(f"{opt.name}() needs one variable name", opt.pos)
            return opt.name, args[0].value
        if opt.name == "intpoints":
            if len(args) != 1 or args[0].kind != "num" or not float(args[0].value).is_integer() \
                    or not 1 <= int(float(args[0].value)) <= 128:
                self.error("intpoints() needs a whole number between 1 and 128", opt.pos)
            return "nagq", int(float(args[0].value))
        if opt.name == "intmethod":
            word = args[0].value if len(args) == 1 and args[0].kind == "name" else ""
            name = _abbrev(word, _INTMETHODS)
            if name is None:
                self.error("intmethod() takes mvaghermite, ghermite or laplace", opt.pos)
            if name == "mcaghermite":
                self.error("intmethod(mcaghermite) is not offered: use mvaghermite (the default) or laplace", opt.pos)
            return "intmethod", name
        if len(args) != 1 or args[0].kind != "name":
            self.error("link() needs one link name: identity, log, logit, probit, cloglog or inverse", opt.pos)
        return "link", args[0].value.lower()

    def covariance(self, opt: _Opt) -> str:
        arg = opt.args[0]
        if len(opt.args) != 1 or arg.kind != "name":
            self.error("covariance() takes one of identity, independent, exchangeable, "
                       "unstructured", arg.pos)
        vartype = _abbrev(arg.value, _VARTYPES)
        if vartype is None:
            self.error(f"unknown covariance structure {arg.value!r}", arg.pos)
        return vartype

    # -- assembly ------------------------------------------------------------------------------
    def build_random(self, eqs: list[_Equation]):
        nest: list[str] = []
        groups: dict[str, tuple[str, ...]] = {}
        random = []
        for k, eq in enumerate(eqs):
            prev = eqs[k - 1].level if k else None
            if eq.level != prev and eq.level in groups:
                self.error(f"level {eq.level!r} appears again after another level; equations at "
                           "one level must be consecutive", eq.pos)
            if eq.level == "_all" and nest:
                self.error("_all must come before the other levels", eq.pos)
            if eq.level != "_all" and eq.level != prev:
                nest.append(eq.level)
            group = tuple(nest)
            groups.setdefault(eq.level, () if eq.level == "_all" else group)
            last_at_level = _takes_constant(eqs, k)
            cov, cov_opt, nocons = None, None, None
            for opt in eq.options:
                if opt.name == "covariance":
                    value = self.covariance(opt)
                    if cov is not None and value != cov:
                        self.error(f"conflicting covariance({cov}) and ({value})", opt.pos)
                    cov, cov_opt = value, opt
                elif opt.name == "noconstant":
                    nocons = opt
                else:
                    self.apply_global(opt)
            if eq.rterm is not None:
                var, pos = eq.rterm
                if cov not in (None, "identity"):
                    self.error(f"R.{var} implies cov(identity); cov({cov}) is not allowed",
                               cov_opt.pos)
                if nocons is not None:
                    self.error(f"noconstant is not allowed with R.{var}", nocons.pos)
                random.append(RandomTerm(group + (var,), (CONS,), "identity", eq.level,
                                         (f"R.{var}",)))
                continue
            columns = eq.columns + ((CONS,) if last_at_level and nocons is None else ())
            if not columns:
                why = ("noconstant removed the constant" if nocons is not None
                       else "only the last equation at a level gets the constant")
                self.error(f"equation '{eq.level}:' has no random effects ({why})", eq.pos)
            cov = "identity" if len(columns) == 1 else (cov or "independent")
            random.append(RandomTerm(group, columns, cov, eq.level))
        levels = tuple(Level(label, group) for label, group in groups.items())
        return tuple(random), levels
