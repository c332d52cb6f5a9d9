"""What every fit driver shares: checks of its options (method, level) and the notes of a fit."""

from __future__ import annotations

from jaxmixed.inference.tables import check_level  # noqa: F401 (the drivers import it from here)
from jaxmixed.errors import ModelError, warn

BOUNDARY_NOTE = ("boundary (singular) fit: a variance is zero or a correlation is ±1; "
                 "standard errors of the variance components are not reported")


def method_is_reml(method: str) -> bool:
    """True for REML, False for ML (``"ml"`` or Stata's ``"mle"``); else a ModelError."""
    m = str(method).lower()
    if m in ("reml",):
        return True
    if m in ("ml", "mle"):
        return False
    raise ModelError(f"method must be 'reml' or 'ml', not {method!r}")


def fit_notes(design, singular: bool, nonconverged: str | None, extra=()) -> list[str]:
    """The notes of a fit, in the report's order: rows dropped for missing values, columns
    omitted for collinearity, ``extra`` (a driver's own), the boundary note, and
    ``nonconverged`` (the reason, when the fit did not converge)."""
    notes = []
    if design.n_dropped:
        notes.append(f"{design.n_dropped} observation(s) dropped because of missing values")
    notes += [f"{name} omitted because of collinearity" for name in design.omitted]
    notes += list(extra)
    if singular:
        notes.append(BOUNDARY_NOTE)
    if nonconverged is not None:
        notes.append(nonconverged)
    return notes


def warn_notes(notes, prefixes=("boundary", "convergence")) -> None:
    """Boundary fits and non-convergence (and a driver's other ``prefixes``) are also visible
    warnings."""
    for note in notes:
        if note.startswith(tuple(prefixes)):
            warn(note)
