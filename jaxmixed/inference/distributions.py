"""The normal and χ² functions jaxmixed needs, as ``scipy.stats`` computes them, without it.

``import scipy.stats`` takes 0.5–0.7 s, a third of a small model's fresh-process fit; it builds
every distribution and pulls in scipy.optimize, scipy.spatial, scipy.interpolate and more.
``scipy.stats.norm.ppf``, ``norm.sf`` and ``chi2.sf`` are the ``scipy.special`` functions
``ndtri``, ``ndtr(-x)`` and ``chdtrc`` behind argument checks; these are the same calls with the
same checks (NaN for invalid arguments, the bounds of the support exactly), so the numbers are
identical (``tests/test_programs.py``). Used as ``from . import distributions as sps``.
"""

from __future__ import annotations

import numpy as np


def _special():
    from scipy import special  # ≈ 0.03 s once numpy and scipy.sparse are loaded; only when used

    return special


def preload() -> None:
    """Import what these functions need now (``jm.fit`` does it in a background thread)."""
    _special()


def _out(x):
    return x[()] if isinstance(x, np.ndarray) and x.ndim == 0 else x


class _Norm:
    """The standard normal distribution: ``ppf``, ``cdf``, ``sf``."""

    @staticmethod
    def ppf(q):
        q = np.asarray(q, dtype=float)
        with np.errstate(invalid="ignore"):
            out = _special().ndtri(q)  # ndtri(0) = -inf, ndtri(1) = inf, NaN outside [0, 1]
        return _out(np.where((q >= 0) & (q <= 1), out, np.nan))

    @staticmethod
    def cdf(x):
        return _out(_special().ndtr(np.asarray(x, dtype=float)))

    @staticmethod
    def sf(x):
        return _out(_special().ndtr(-np.asarray(x, dtype=float)))


class _Chi2:
    """The χ² distribution with ``df`` degrees of freedom: ``sf``."""

    @staticmethod
    def sf(x, df):
        x = np.asarray(x, dtype=float)
        df = np.asarray(df, dtype=float)
        with np.errstate(invalid="ignore"):
            inside = _special().chdtrc(df, np.where(x > 0, x, 1.0))
            out = np.where(x > 0, inside, 1.0)  # all the mass lies above a bound ≤ 0
            out = np.where((df > 0) & ~np.isnan(x), out, np.nan)
        return _out(out)


norm = _Norm()
chi2 = _Chi2()
