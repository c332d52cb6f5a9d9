"""Data sets shipped with jaxmixed (see README.md in this folder for their provenance).

- ``pig``: weights of 48 pigs in 9 weeks (Diggle et al.), Stata's ``pig.dta``.
- ``productivity``: 48 US states in 9 regions, 1970-1986 (Munnell 1990; Baltagi and Pinnoi 1995).
- ``jsp``: Junior School Project, 887 pupils in 48 schools (Mortimore et al. 1988).
"""

from __future__ import annotations

from importlib import resources

import pandas as pd

from jaxmixed.errors import DataError

NAMES = ("pig", "productivity", "jsp")


def load(name: str) -> pd.DataFrame:
    """Return a fresh copy of a shipped data set as a DataFrame."""
    if name not in NAMES:
        raise DataError(f"unknown data set {name!r}; available: {', '.join(NAMES)}")
    with resources.files(__package__).joinpath(f"{name}.csv").open("r") as fh:
        return pd.read_csv(fh)


def provenance() -> str:
    """The README text that says where each data set comes from."""
    return resources.files(__package__).joinpath("README.md").read_text()
