"""Residual structures within the lowest-level panel (Stata's ``residuals()``; nlme's
``correlation=`` and ``weights=varIdent``).

A structure says how the errors of one panel (the observations of one lowest-level group) covary:

    Cov(ε_j, ε_l) = s_{v(j)} s_{v(l)} ρ(j, l)      for j, l in the same panel, 0 otherwise

with s_v the residual sd of variance group v (one group, one per ``by`` level, or one per time
point for unstructured / banded) and ρ the structure's correlation (1 on the diagonal).

    independent   ρ = [j = l]                                   (``by``: heteroskedastic)
    exchangeable  ρ = r for j ≠ l
    ar p          ρ = acf of a stationary AR(p) at lag |t_j − t_l| (partial autocorrelations in (−1,1))
    ma q          ρ = acf of an MA(q) at lag |t_j − t_l| (0 beyond q)
    toeplitz q    ρ = r_k at lag k ≤ q, 0 beyond
    exponential   ρ = r^{|t_j − t_l|}, 0 < r < 1, continuous time
    unstructured  ρ = C[t_j, t_l], one sd per time point
    banded q      as unstructured with C = 0 beyond q time points

Build one with ``jm.ar(1, time="week")``, ``jm.independent(by="week")``, ... or Stata's
``residuals(ar 1, t(week))``.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxmixed.errors import FormulaError, ModelError

KINDS = ("independent", "exchangeable", "ar", "ma", "toeplitz", "exponential", "unstructured", "banded")
TITLES = {"independent": "Independent", "exchangeable": "Exchangeable", "ar": "AR({})", "ma": "MA({})",
          "toeplitz": "Toeplitz({})", "exponential": "Exponential", "unstructured": "Unstructured",
          "banded": "Banded({})"}
NEEDS_TIME = ("ar", "ma", "toeplitz", "exponential", "unstructured", "banded")
HAS_ORDER = ("ar", "ma", "toeplitz", "banded")


@dataclass(frozen=True)
class ResidualStructure:
    kind: str = "independent"
    order: int = 0
    time: str | None = None
    by: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ModelError(f"unknown residual structure {self.kind!r}; one of {', '.join(KINDS)}")
        if self.kind in HAS_ORDER and self.order < 1:
            raise ModelError(f"residual structure {self.kind} needs an order ≥ 1")
        if self.kind in NEEDS_TIME and self.time is None:
            raise ModelError(f"residual structure {self.kind} needs a time variable (time=... / t())")

    @property
    def is_default(self) -> bool:
        """Independent, homoskedastic: the cross-product engine handles it."""
        return self.kind == "independent" and self.by is None

    @property
    def title(self) -> str:
        t = TITLES[self.kind].format(self.order)
        return f"{t}, by {self.by}" if self.by else t

    @property
    def variables(self) -> list[str]:
        return [v for v in (self.time, self.by) if v is not None]


def independent(by: str | None = None) -> ResidualStructure:
    return ResidualStructure("independent", by=by)


def exchangeable(by: str | None = None) -> ResidualStructure:
    return ResidualStructure("exchangeable", by=by)


def ar(p: int = 1, time: str | None = None, by: str | None = None) -> ResidualStructure:
    return ResidualStructure("ar", int(p), time, by)


def ma(q: int = 1, time: str | None = None, by: str | None = None) -> ResidualStructure:
    return ResidualStructure("ma", int(q), time, by)


def toeplitz(q: int = 1, time: str | None = None, by: str | None = None) -> ResidualStructure:
    return ResidualStructure("toeplitz", int(q), time, by)


def exponential(time: str | None = None, by: str | None = None) -> ResidualStructure:
    return ResidualStructure("exponential", 0, time, by)


def unstructured(time: str | None = None, by: str | None = None) -> ResidualStructure:
    return ResidualStructure("unstructured", 0, time, by)


def banded(q: int = 1, time: str | None = None, by: str | None = None) -> ResidualStructure:
    return ResidualStructure("banded", int(q), time, by)


_STATA_KINDS = {"independent": 3, "exchangeable": 2, "ar": 2, "ma": 2, "toeplitz": 3,
                "exponential": 3, "unstructured": 2, "banded": 3}


def from_stata(words: list[tuple[str, str, int]], text: str) -> ResidualStructure:
    """Read the argument of ``residuals(...)``: tokens (kind, value, pos) such as
    ``ar 1, t(week)`` or ``independent, by(week)``."""
    if not words or words[0][0] != "name":
        pos = words[0][2] if words else len(text)
        raise FormulaError("residuals() needs a structure: independent, exchangeable, ar #, ma #, "
                           "toeplitz #, exponential, unstructured or banded #", text, pos)
    kind_word, pos0 = words[0][1], words[0][2]
    kind = next((k for k, n in _STATA_KINDS.items() if len(kind_word) >= n and k.startswith(kind_word)), None)
    if kind is None:
        raise FormulaError(f"unknown residual structure {kind_word!r}", text, pos0)
    i, order = 1, 0
    if i < len(words) and words[i][0] == "num":
        order = int(float(words[i][1]))
        i += 1
    opts = {}
    if i < len(words):
        if words[i][0] != ",":
            raise FormulaError("expected ',' before the options of residuals()", text, words[i][2])
        i += 1
        while i < len(words):
            if words[i][0] != "name":
                raise FormulaError("expected t(varname) or by(varname)", text, words[i][2])
            name = words[i][1]
            key = "time" if name in ("t", "time") else "by" if name == "by" else None
            if key is None or i + 3 > len(words) - 1 or words[i + 1][0] != "(" or words[i + 3][0] != ")" \
                    or words[i + 2][0] != "name":
                raise FormulaError(f"unknown or malformed residuals() option {name!r}; "
                                   "use t(varname) or by(varname)", text, words[i][2])
            opts[key] = words[i + 2][1]
            i += 4
    if kind in HAS_ORDER and order < 1:
        raise FormulaError(f"residuals({kind} #) needs an order, e.g. residuals({kind} 1, t(time))", text, pos0)
    if kind in NEEDS_TIME and "time" not in opts:
        raise FormulaError(f"residuals({kind}) needs t(varname)", text, pos0)
    return ResidualStructure(kind, order, opts.get("time"), opts.get("by"))
