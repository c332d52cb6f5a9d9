"""Checks of the options every fit driver takes (method, level)."""

from __future__ import annotations

from jaxmixed.errors import ModelError


def method_is_reml(method: str) -> bool:
    """True for REML, False for ML (``"ml"`` or Stata's ``"mle"``); else a ModelError."""
    m = str(method).lower()
    if m in ("reml",):
        return True
    if m in ("ml", "mle"):
        return False
    raise ModelError(f"method must be 'reml' or 'ml', not {method!r}")


def check_level(level) -> float:
    if not (10.0 <= float(level) <= 99.99):
        raise ModelError(f"level must be between 10 and 99.99, not {level}")
    return float(level)
