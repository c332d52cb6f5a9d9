"""The normal and χ² functions jaxmixed needs, as ``scipy.stats`` computes them, without it.

``import scipy.stats`` takes 0.5–0.7 s, a third of a small model's fresh-process fit; it builds
every distribution and pulls in scipy.optimize, scipy.spatial, scipy.interpolate and more.
``scipy.stats.norm.ppf``, ``norm.sf`` and ``chi2.sf`` are the ``scipy.special`` functions
``ndtri``, ``ndtr(-x)`` and ``chdtrc`` behind argument checks (``t`` and ``f`` likewise ``stdtr``,
``stdtrit`` and ``fdtrc``); these are the same calls with the same checks (NaN for invalid arguments, the bounds of the support exactly), so the numbers are
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


class _T:
    """Student's t distribution with ``df`` degrees of freedom: ``sf`` and ``ppf`` (df = inf:
    the normal)."""

    @staticmethod
    def sf(x, df):
        x = np.asarray(x, dtype=float)
        df = np.asarray(df, dtype=float)
        with np.errstate(invalid="ignore"):
            out = np.where(np.isinf(df), _special().ndtr(-x), _special().stdtr(np.where(df > 0, df, 1.0), -x))
            out = np.where(df > 0, out, np.nan)
        return _out(out)

    @staticmethod
    def ppf(q, df):
        q = np.asarray(q, dtype=float)
        df = np.asarray(df, dtype=float)
        with np.errstate(invalid="ignore"):
            out = np.where(np.isinf(df), _special().ndtri(q), _special().stdtrit(np.where(df > 0, df, 1.0), q))
            out = np.where((df > 0) & (q >= 0) & (q <= 1), out, np.nan)
        return _out(out)


class _F:
    """The F distribution with (``df1``, ``df2``) degrees of freedom: ``sf`` (df2 = inf: χ²(df1)/df1)."""

    @staticmethod
    def sf(x, df1, df2):
        x = np.asarray(x, dtype=float)
        df1 = np.asarray(df1, dtype=float)
        df2 = np.asarray(df2, dtype=float)
        with np.errstate(invalid="ignore"):
            pos = np.where(x > 0, x, 1.0)
            inside = np.where(np.isinf(df2), _special().chdtrc(df1, df1 * pos),
                              _special().fdtrc(df1, np.where(np.isinf(df2), 1.0, df2), pos))
            out = np.where(x > 0, inside, 1.0)
            out = np.where((df1 > 0) & (df2 > 0) & ~np.isnan(x), out, np.nan)
        return _out(out)


norm = _Norm()
chi2 = _Chi2()
t = _T()
f = _F()
