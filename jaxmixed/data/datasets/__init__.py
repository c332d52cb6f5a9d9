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
- ``sleepstudy``: reaction times of 18 subjects over 10 days of sleep deprivation (Belenky et
  al. 2003; lme4's ``sleepstudy``).
- ``orthodont_unbal``: nlme's ``Orthodont`` (Potthoff and Roy 1964) without every fifth row, an
  unbalanced design; ``Sex`` a categorical with R's level order (Male, Female).
- ``penicillin``: inhibition-zone diameters of 6 samples on 24 plates, crossed (Davies and
  Goldsmith 1972; lme4's ``Penicillin``).
"""

from __future__ import annotations

from importlib import resources

import pandas as pd

from jaxmixed.errors import DataError

NAMES = ("pig", "productivity", "jsp", "cbpp", "verbagg", "contraception", "sleepstudy", "orthodont_unbal",
         "penicillin")
# columns read as labels (R factors stored as numbers in the CSV)
_LABELS = {"cbpp": ("herd", "period"), "verbagg": ("id", "item"), "contraception": ("woman", "district", "livch"),
           "sleepstudy": ("Subject",)}
# categorical columns with R's level order (the first level is the reference level)
_ORDERED = {"orthodont_unbal": {"Sex": ["Male", "Female"]}}


def load(name: str) -> pd.DataFrame:
    """Return a fresh copy of a shipped data set as a DataFrame."""
    if name not in NAMES:
        raise DataError(f"unknown data set {name!r}; available: {', '.join(NAMES)}")
    with resources.files(__package__).joinpath(f"{name}.csv").open("r") as fh:
        df = pd.read_csv(fh, dtype={c: str for c in _LABELS.get(name, ())})
    for col, levels in _ORDERED.get(name, {}).items():
        df[col] = pd.Categorical(df[col], categories=levels)
    return df


def provenance() -> str:
    """The README text that says where each data set comes from."""
    return resources.files(__package__).joinpath("README.md").read_text()
