"""Data sets shipped with jaxmixed (see README.md in this folder for their provenance).

- ``pig``: weights of 48 pigs in 9 weeks (Diggle et al.), Stata's ``pig.dta``.
- ``productivity``: 48 US states in 9 regions, 1970-1986 (Munnell 1990; Baltagi and Pinnoi 1995).
- ``jsp``: Junior School Project, 887 pupils in 48 schools (Mortimore et al. 1988).
- ``cbpp``: contagious bovine pleuropneumonia cases out of herd size, 15 herds in 4 periods
  (Lesnoff et al. 2004; lme4's ``cbpp``).
- ``verbagg``: verbal aggression responses, 316 persons × 24 items (De Boeck and Wilson 2004;
  lme4's ``VerbAgg``).
- ``contraception``: contraceptive use of 1,934 women in 60 districts of Bangladesh (1988
  Bangladesh Fertility Survey; mlmRev's ``Contraception``).
"""

from __future__ import annotations

from importlib import resources

import pandas as pd

from jaxmixed.errors import DataError

NAMES = ("pig", "productivity", "jsp", "cbpp", "verbagg", "contraception")
# columns read as labels (R factors stored as numbers in the CSV)
_LABELS = {"cbpp": ("herd", "period"), "verbagg": ("id", "item"), "contraception": ("woman", "district", "livch")}


def load(name: str) -> pd.DataFrame:
    """Return a fresh copy of a shipped data set as a DataFrame."""
    if name not in NAMES:
        raise DataError(f"unknown data set {name!r}; available: {', '.join(NAMES)}")
    with resources.files(__package__).joinpath(f"{name}.csv").open("r") as fh:
        return pd.read_csv(fh, dtype={c: str for c in _LABELS.get(name, ())})


def provenance() -> str:
    """The README text that says where each data set comes from."""
    return resources.files(__package__).joinpath("README.md").read_text()
