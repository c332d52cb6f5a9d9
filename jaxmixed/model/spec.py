"""The internal model description that both front ends (lme4 formulas, Stata syntax) produce.

A :class:`ModelSpec` says which variables enter the fixed part and how the random effects are
structured; it holds no data. ``design.build_design`` turns it and a DataFrame into arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CONS = "_cons"

COV_TYPES = ("identity", "independent", "exchangeable", "unstructured")
COV_TITLES = {
    "identity": "Identity",
    "independent": "Independent",
    "exchangeable": "Exchangeable",
    "unstructured": "Unstructured",
}


@dataclass(frozen=True)
class Factor:
    """One variable inside a fixed-effects term.

    ``categorical``: True for ``C(x)`` / ``i.x`` (treatment contrasts, first level the base),
    False for ``c.x`` (numeric, error if not), None to decide from the column's dtype
    (numeric -> continuous, anything else -> categorical, as R does for factors).
    """

    var: str
    categorical: bool | None = None
    base: object | None = None  # base level for categorical factors (``ib3.x``); None: first level


@dataclass(frozen=True)
class FixedTerm:
    """A product of factors: ``x``, ``a:b``, ``C(g)``, ``i.g#c.x``."""

    factors: tuple[Factor, ...]


@dataclass(frozen=True)
class RandomTerm:
    """One random-effects equation.

    group:    the variables whose joint levels define the groups (``()`` = one group, Stata ``_all``).
    columns:  the covariates carrying random coefficients, ``"_cons"`` for the intercept; in the
              order they are reported (Stata's: slopes in the order written, ``_cons`` last).
    cov:      one of ``COV_TYPES``.
    label:    the level name shown in reports: ``school``, ``region:state``, ``_all``.
    display:  the names shown inside ``sd(...)``; defaults to ``columns`` (``R.id`` for factor
              notation, which the front ends normalise to an intercept on the joint group).
    """

    group: tuple[str, ...]
    columns: tuple[str, ...]
    cov: str
    label: str
    display: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.cov not in COV_TYPES:
            raise ValueError(f"unknown covariance structure {self.cov!r}")
        if not self.columns:
            raise ValueError("a random-effects term needs at least one column")
        if self.display is None:
            object.__setattr__(self, "display", self.columns)

    @property
    def q(self) -> int:
        return len(self.columns)


@dataclass(frozen=True)
class Level:
    """A grouping level for the observations-per-group summary."""

    label: str
    group: tuple[str, ...]


@dataclass(frozen=True)
class ModelSpec:
    """Everything a front end says about a model; no data."""

    response: str
    intercept: bool
    fixed: tuple[FixedTerm, ...]
    random: tuple[RandomTerm, ...]
    levels: tuple[Level, ...]
    syntax: str = "formula"  # "formula" or "stata"
    text: str = ""
    options: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def variables(self) -> list[str]:
        """Every data column the model reads (for the missing-value filter)."""
        fixed_formula = self.options.get("fixed_formula")
        out: list[str] = list(self.options.get("response_variables", ())) if fixed_formula else [self.response]
        for t in self.fixed:
            out += [f.var for f in t.factors]
        out += list(self.options.get("fixed_variables", ()))
        for r in self.random:
            exprs = self.options.get("random_expressions", ())
            out += list(r.group) + [c for c in r.columns if c != CONS and c not in exprs]
        res = self.options.get("residuals")
        if res is not None:
            out += res.variables
        seen: dict[str, None] = {}
        for v in out:
            seen.setdefault(v, None)
        return list(seen)
