"""jaxmixed's exceptions and warnings: every user-facing failure is one of these."""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class JaxmixedError(Exception):
    """Base class of every error jaxmixed raises on purpose."""


class FormulaError(JaxmixedError, ValueError):
    """A model formula (lme4 or Stata syntax) that cannot be read.

    The message shows the formula with a caret under the offending position.
    """

    def __init__(self, message: str, text: str | None = None, pos: int | None = None):
        self.reason = message
        self.text = text
        self.pos = pos
        if text is not None and pos is not None:
            pos = max(0, min(pos, len(text)))
            message = f"{message} (at position {pos})\n    {text}\n    {' ' * pos}^"
        super().__init__(message)


class DataError(JaxmixedError, ValueError):
    """Data that do not fit the model: unknown or unusable columns, too few groups, ..."""


class ModelError(JaxmixedError, ValueError):
    """A model that cannot be fitted as specified (conflicting options, no random effects, ...)."""


class JaxmixedWarning(UserWarning):
    """A visible warning about a fit (non-convergence, boundary fit, dropped columns)."""


def warn(message: str) -> None:
    """Issue a :class:`JaxmixedWarning` attributed to the first caller outside jaxmixed."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is warn's caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep):
        level += 1
        frame = frame.f_back
    warnings.warn(message, JaxmixedWarning, stacklevel=level)


def integer_argument(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int when it is an integer ≥ ``minimum`` (2 and 2.0 are, 2.5 and "2" are
    not), else a ModelError naming the argument."""
    try:
        as_int = int(value)
    except (TypeError, ValueError):
        as_int = minimum - 1
    if as_int < minimum or as_int != value:
        need = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
        raise ModelError(f"{name} must be {need}, not {value!r}")
    return as_int
