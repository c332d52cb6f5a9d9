"""Every ``JAXMIXED_*`` environment variable, read in one place.

jaxmixed reads its environment variables here and nowhere else: :func:`from_environment` parses
them into a frozen :class:`Settings` (pure: it only reads the mapping it is given, and a value it
cannot read falls back to the default), and :func:`current` returns the settings of this
process, read once when jaxmixed is imported. Set the variables before ``import jaxmixed``.

=============================  ====================  =====================================================
variable                       field                 meaning (default)
=============================  ====================  =====================================================
``JAXMIXED_KEEP_XLA_FLAGS``    ``keep_xla_flags``    ``1``: never touch ``XLA_FLAGS`` (off: on a jaxlib
                                                     known to hang, see :data:`HANGING_JAXLIB`, jaxmixed
                                                     adds ``--xla_cpu_multi_thread_eigen=false`` unless
                                                     you set that flag yourself)
``JAXMIXED_CACHE_DIR``         ``cache_dir``         folder of JAX's persistent compilation cache (unset:
                                                     ``$XDG_CACHE_HOME/jaxmixed/jax``, that is
                                                     ``~/.cache/jaxmixed/jax``)
``JAXMIXED_NO_CACHE``          ``no_cache``          ``1``: leave the compilation cache off (off)
``JAXMIXED_BLAS_THREADS``      ``blas_threads``      threads of SciPy's OpenBLAS *inside a fit*; ``0``
                                                     leaves OpenBLAS alone (1)
``JAXMIXED_EXIT_GC``           ``exit_gc``           ``1``: the ``jaxmixed`` command leaves interpreter
                                                     shutdown alone instead of ``gc.freeze()`` at exit
                                                     (off)
``JAXMIXED_FAST_COMPILE``      ``fast_compile``      ``0``: compile every program with XLA's default
                                                     options (on: small programs are compiled at XLA's
                                                     optimisation level 0, the others with its classic
                                                     loop emitters, see
                                                     :mod:`jaxmixed.runtime.programs`)
``JAXMIXED_KEEP_EXECUTABLES``  ``keep_executables``  ``0``: keep only traced programs on disk, not XLA's
                                                     CPU executables of them (on: see
                                                     :mod:`jaxmixed.runtime.programs`, "Executables")
=============================  ====================  =====================================================

Switches read ``1``/``true``/``yes``/``on`` as on and ``0``/``false``/``no``/``off`` or empty as
off (any case); anything else is the default. ``JAXMIXED_BLAS_THREADS`` takes an integer ≥ 0;
anything else is the default. See :mod:`jaxmixed.runtime` for what the cache, BLAS and exit
settings do.

**XLA_FLAGS.** XLA's CPU runtime in jaxlib 0.10 can wedge its Eigen thread pool and never return
a result (seen here in ``while_loop`` programs; jax-ml/jax#25861 and others); running Eigen's
operations on the calling thread avoids it. :func:`apply_xla_flags` (run by ``import jaxmixed``
before it imports JAX, because XLA reads the flags when its backend starts) therefore adds
``--xla_cpu_multi_thread_eigen=false`` to ``XLA_FLAGS``, but only on the jaxlib versions of
:data:`HANGING_JAXLIB`, only when the flag is not set already and not with
``JAXMIXED_KEEP_XLA_FLAGS=1``, and says so once, at INFO level on the ``"jaxmixed"`` logger.
:func:`xla_flags_to_add` is the pure decision. Nothing here imports JAX.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import re
from collections.abc import Mapping

__all__ = [
    "ENVIRONMENT_VARIABLES", "HANGING_JAXLIB", "Settings", "apply_xla_flags", "current",
    "from_environment", "is_hanging_jaxlib", "jaxlib_version", "xla_flags_to_add",
]

log = logging.getLogger("jaxmixed")


@dataclasses.dataclass(frozen=True)
class Settings:
    """jaxmixed's environment variables, parsed (see the module docstring's table)."""

    #: ``JAXMIXED_KEEP_XLA_FLAGS``: never touch ``XLA_FLAGS``
    keep_xla_flags: bool = False
    #: ``JAXMIXED_CACHE_DIR``: the compilation cache's folder (None: the default folder)
    cache_dir: str | None = None
    #: ``JAXMIXED_NO_CACHE``: leave JAX's persistent compilation cache off
    no_cache: bool = False
    #: ``JAXMIXED_BLAS_THREADS``: SciPy's OpenBLAS threads inside a fit (0: leave it alone)
    blas_threads: int = 1
    #: ``JAXMIXED_EXIT_GC``: the command line leaves shutdown alone (no ``gc.freeze()`` at exit)
    exit_gc: bool = False
    #: ``JAXMIXED_FAST_COMPILE``: programs compiled with XLA's quicker options
    fast_compile: bool = True
    #: ``JAXMIXED_KEEP_EXECUTABLES``: CPU executables of the kept programs kept on disk too
    keep_executables: bool = True


#: field of :class:`Settings` -> the environment variable it is read from
ENVIRONMENT_VARIABLES = {
    "keep_xla_flags": "JAXMIXED_KEEP_XLA_FLAGS",
    "cache_dir": "JAXMIXED_CACHE_DIR",
    "no_cache": "JAXMIXED_NO_CACHE",
    "blas_threads": "JAXMIXED_BLAS_THREADS",
    "exit_gc": "JAXMIXED_EXIT_GC",
    "fast_compile": "JAXMIXED_FAST_COMPILE",
    "keep_executables": "JAXMIXED_KEEP_EXECUTABLES",
}

_ON = frozenset({"1", "true", "yes", "on"})
_OFF = frozenset({"", "0", "false", "no", "off"})
_DEFAULTS = Settings()


def _switch(environ: Mapping[str, str], field: str) -> bool:
    raw = environ.get(ENVIRONMENT_VARIABLES[field])
    if raw is None:
        return getattr(_DEFAULTS, field)
    value = raw.strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    return getattr(_DEFAULTS, field)


def _threads(environ: Mapping[str, str]) -> int:
    raw = (environ.get(ENVIRONMENT_VARIABLES["blas_threads"]) or "").strip()
    try:
        n = int(raw)
    except ValueError:
        return _DEFAULTS.blas_threads
    return n if n >= 0 else _DEFAULTS.blas_threads


def from_environment(environ: Mapping[str, str] = os.environ) -> Settings:
    """The :class:`Settings` that ``environ`` describes. Pure: reads ``environ`` only, never
    changes anything, never raises for a bad value (it falls back to the default)."""
    cache_dir = (environ.get(ENVIRONMENT_VARIABLES["cache_dir"]) or "").strip() or None
    return Settings(
        keep_xla_flags=_switch(environ, "keep_xla_flags"),
        cache_dir=cache_dir,
        no_cache=_switch(environ, "no_cache"),
        blas_threads=_threads(environ),
        exit_gc=_switch(environ, "exit_gc"),
        fast_compile=_switch(environ, "fast_compile"),
        keep_executables=_switch(environ, "keep_executables"),
    )


_CURRENT = from_environment()


def current() -> Settings:
    """This process's settings, read from ``os.environ`` once, when jaxmixed was imported."""
    return _CURRENT


# ------------------------------------------------------------------------------ XLA_FLAGS

#: (major, minor) versions of jaxlib whose CPU runtime was seen to hang in its Eigen thread pool
HANGING_JAXLIB = ((0, 10),)
_EIGEN_FLAG = "xla_cpu_multi_thread_eigen"
_ADD = "--xla_cpu_multi_thread_eigen=false"
_said = False


def _major_minor(version) -> tuple[int, int] | None:
    if version is None:
        return None
    if isinstance(version, str):
        m = re.match(r"\s*(\d+)\.(\d+)", version)
        return (int(m.group(1)), int(m.group(2))) if m else None
    try:
        return int(version[0]), int(version[1])
    except (TypeError, ValueError, IndexError):
        return None


def jaxlib_version() -> str | None:
    """The installed jaxlib's version string, from its package metadata (JAX is not imported);
    None when it cannot be read."""
    try:
        return importlib.metadata.version("jaxlib")
    except Exception:  # noqa: BLE001 - not installed, or unreadable metadata
        return None


def is_hanging_jaxlib(version) -> bool:
    """Whether jaxlib ``version`` (``"0.10.2"``, ``(0, 10)``, ...) is in :data:`HANGING_JAXLIB`."""
    return _major_minor(version) in HANGING_JAXLIB


def xla_flags_to_add(jaxlib_version, current_flags: str | None, keep: bool) -> tuple[str, ...]:
    """The flags jaxmixed adds to ``XLA_FLAGS`` (pure): ``--xla_cpu_multi_thread_eigen=false``
    when ``jaxlib_version`` is known to hang, ``current_flags`` does not set that flag already
    and ``keep`` (``JAXMIXED_KEEP_XLA_FLAGS``) is off; else none."""
    if keep or not is_hanging_jaxlib(jaxlib_version) or _EIGEN_FLAG in (current_flags or ""):
        return ()
    return (_ADD,)


def apply_xla_flags(environ=os.environ, settings: Settings | None = None, version=None) -> tuple[str, ...]:
    """Add :func:`xla_flags_to_add`'s flags to ``environ["XLA_FLAGS"]`` and say so (once per
    process, INFO on the ``"jaxmixed"`` logger). Returns the flags added. Must run before JAX's
    backend starts; ``import jaxmixed`` runs it before importing JAX."""
    global _said
    settings = current() if settings is None else settings
    version = jaxlib_version() if version is None else version
    flags = environ.get("XLA_FLAGS", "")
    add = xla_flags_to_add(version, flags, settings.keep_xla_flags)
    if add:
        environ["XLA_FLAGS"] = " ".join([flags.strip(), *add]).strip()
        if not _said:
            _said = True
            log.info("added %s to XLA_FLAGS: XLA's CPU runtime in jaxlib %s can hang in its Eigen "
                     "thread pool (jax-ml/jax#25861); set the flag yourself or "
                     "JAXMIXED_KEEP_XLA_FLAGS=1 to leave XLA_FLAGS alone", " ".join(add), version)
    return add
