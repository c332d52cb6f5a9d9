"""Process-level settings that make fits fast: JAX's persistent compilation cache, BLAS threads,
and the command line's exit. Every environment variable is read by :mod:`jaxmixed.settings`.

jaxmixed is meant to be embedded in other JAX programs, so importing it changes as little of the
process as it can: the compilation cache below (a JAX setting, documented here), and on jaxlib
versions known to hang one flag in ``XLA_FLAGS`` (:mod:`jaxmixed.settings`). BLAS threads are
changed only while a fit runs, and only the ``jaxmixed`` command freezes the collector at exit.

**Compilation cache.** A small model's first fit in a fresh process is dominated by compiling
its programs. jaxmixed turns on JAX's persistent compilation cache when it is imported, in
``$JAXMIXED_CACHE_DIR`` or else ``$XDG_CACHE_HOME/jaxmixed/jax`` (``~/.cache/jaxmixed/jax``),
with a minimum compile time of 0 s so that every program is kept; the next process loads the
compiled programs instead of compiling them again. It is left alone when

- the environment variable ``JAXMIXED_NO_CACHE=1`` is set (before importing jaxmixed), or
- JAX's cache was already configured by the user (``jax_compilation_cache_dir`` set).

At run time: ``jaxmixed.runtime.disable_compilation_cache()`` / ``enable_compilation_cache(path)``
and ``compilation_cache_dir()``. The cache is trusted code: do not point it at a directory that
others can write to. JAX consults it only after tracing a program, so :mod:`jaxmixed.runtime.programs`
keeps the traced programs of a fit beside it (``jaxmixed-programs/``), on and off with it: a
fresh process then neither traces nor compiles them.

**BLAS threads.** JAX's CPU Cholesky and triangular solves call the OpenBLAS that SciPy ships.
With more than one thread, OpenBLAS spins waiting for its workers; jaxmixed's programs interleave
those calls with XLA's own operations, which run on the calling thread
(``--xla_cpu_multi_thread_eigen=false``, see :mod:`jaxmixed.settings`), and on this project's
2-core machine a fit of InstEval (one 1,142² panel) took 2.7–3.0 s with OpenBLAS's default two
threads against 1.9–2.3 s with one, quiet or loaded (a lone 1,142² Cholesky went from 52 ms to
1,079 ms under load). So ``jm.fit`` (``fit_spec``) runs with SciPy's OpenBLAS at one thread and
puts the caller's setting back when it returns (:func:`fit_blas_threads`, through
`threadpoolctl <https://github.com/joblib/threadpoolctl>`_, imported at the first fit; nested and
concurrent fits share one save/restore). Only SciPy's bundled OpenBLAS (``scipy.libs/``) is
limited, or, where SciPy has none of its own, every BLAS threadpoolctl finds; NumPy's own OpenBLAS
is left alone. ``JAXMIXED_BLAS_THREADS=n`` runs fits at n threads instead, and
``JAXMIXED_BLAS_THREADS=0`` leaves OpenBLAS alone in fits too; neither changes anything outside a
fit. ``set_blas_threads(n)`` sets it for the whole process, at your call. If threadpoolctl is
missing or finds no library, fits run with whatever OpenBLAS has. jaxmixed never keeps
threadpoolctl's OpenBLAS "controlling thread" (threadpoolctl ≥ 3.8) after it has set a value, so
your own ``threadpool_limits`` keep working from any thread. (Batched small factorisations no
longer call LAPACK, see :mod:`jaxmixed.engine.kernels`, so one thread cannot stall them as it once
did.)

**Exit.** A process that has imported JAX, pandas and SciPy spends 0.2–0.3 s after its last
statement in the garbage collector's passes over every object of those libraries. The ``jaxmixed``
command (``jaxmixed.app.cli.main``, also ``python -m jaxmixed``) registers an ``atexit`` hook that
freezes the objects still alive then (``gc.freeze()``, :func:`freeze_gc_at_exit`), which makes
those passes empty: exit takes ≈ 0.04 s. Everything else about shutdown is unchanged (other
``atexit`` hooks, buffers flushed, objects freed by reference counting); only objects kept alive by
reference cycles are no longer collected at exit, which CPython does not promise anyway (their
``__del__`` may not run). ``JAXMIXED_EXIT_GC=1`` leaves shutdown alone. Importing jaxmixed as a
library registers nothing; a program of your own may call :func:`freeze_gc_at_exit` itself.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import glob
import importlib.util
import os
import threading

import jax

from jaxmixed import settings

_DEFAULT_SUBDIR = os.path.join("jaxmixed", "jax")


def default_cache_dir() -> str:
    """``$JAXMIXED_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxmixed/jax`` (``~/.cache/jaxmixed/jax``)."""
    env = settings.current().cache_dir
    if env:
        return os.path.expanduser(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, _DEFAULT_SUBDIR)


def _reset():
    from jax.experimental.compilation_cache import compilation_cache as cc

    cc.reset_cache()


def enable_compilation_cache(path: str | None = None) -> str:
    """Turn JAX's persistent compilation cache on, in ``path`` (default: :func:`default_cache_dir`).

    Every program is cached (minimum compile time 0 s). Returns the directory used."""
    path = os.path.expanduser(path) if path else default_cache_dir()
    os.makedirs(path, mode=0o700, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _reset()
    return path


def disable_compilation_cache() -> None:
    """Turn JAX's persistent compilation cache off for this process."""
    jax.config.update("jax_enable_compilation_cache", False)
    _reset()


def compilation_cache_dir() -> str | None:
    """The persistent cache directory in use, or None when the cache is off."""
    if not jax.config.jax_enable_compilation_cache:
        return None
    return jax.config.jax_compilation_cache_dir


def _scipy_openblas_paths() -> list[str]:
    """SciPy's bundled OpenBLAS (``site-packages/scipy.libs/*openblas*``), loaded if it is not yet
    (JAX loads it at its first LAPACK call, inside the fit), without importing SciPy."""
    try:
        spec = importlib.util.find_spec("scipy")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.origin:
        return []
    libs = os.path.join(os.path.dirname(os.path.dirname(spec.origin)), "scipy.libs")
    paths = []
    for path in sorted(glob.glob(os.path.join(libs, "*openblas*.so*")) + glob.glob(os.path.join(libs, "*openblas*.dylib"))):
        try:
            ctypes.CDLL(path)  # already loaded: the same library, found by threadpoolctl below
            paths.append(os.path.realpath(path))
        except OSError:
            pass
    return paths


_blas_cache = None
_blas_lock = threading.Lock()


def _blas():
    """threadpoolctl's controller of the BLAS that JAX's CPU LAPACK calls use (SciPy's bundled
    OpenBLAS, else every BLAS loaded), found once; None without threadpoolctl."""
    global _blas_cache
    with _blas_lock:
        if _blas_cache is None:
            try:
                from threadpoolctl import ThreadpoolController

                paths = _scipy_openblas_paths()
                every = ThreadpoolController()
                own = [lc.filepath for lc in every.lib_controllers
                       if lc.user_api == "blas" and os.path.realpath(lc.filepath) in paths]
                _blas_cache = every.select(filepath=own) if own else every.select(user_api="blas")
            except Exception:  # noqa: BLE001 - threading is an optimisation, never an error
                _blas_cache = False
        return _blas_cache or None


def _release_openblas_control() -> None:
    """Give up threadpoolctl's OpenBLAS controlling thread if this thread holds it (≥ 3.8: only
    that thread's settings take effect), so that the caller's own ``threadpool_limits`` work."""
    try:
        import threadpoolctl

        threadpoolctl.OpenBLASController.clear_controlling_thread()
    except Exception:  # noqa: BLE001 - older threadpoolctl: no controlling thread
        pass


def blas_libraries() -> list[dict]:
    """threadpoolctl's ``info()`` of the libraries :func:`fit_blas_threads` and
    :func:`set_blas_threads` act on (empty when there are none or threadpoolctl is missing)."""
    ctl = _blas()
    return ctl.info() if ctl is not None else []


def set_blas_threads(n: int) -> bool:
    """Set SciPy's OpenBLAS (used by JAX's CPU linear algebra) to ``n`` threads, for the whole
    process. Returns True when a library was found and set."""
    ctl = _blas()
    if ctl is None or not ctl.lib_controllers:
        return False
    try:
        for lc in ctl.lib_controllers:
            lc.set_num_threads(int(n))
    finally:
        _release_openblas_control()
    return True


def fit_threads() -> int | None:
    """OpenBLAS threads while a fit runs: ``FIT_BLAS_THREADS`` if set, else
    ``JAXMIXED_BLAS_THREADS`` (default 1); None: leave OpenBLAS alone."""
    n = FIT_BLAS_THREADS if FIT_BLAS_THREADS is not None else settings.current().blas_threads
    return n if n and n > 0 else None


#: threads for SciPy's OpenBLAS while a fit runs, overriding ``JAXMIXED_BLAS_THREADS`` (None: the
#: setting; 0: leave OpenBLAS alone)
FIT_BLAS_THREADS: int | None = None
_fit_lock = threading.Lock()
_fit_depth = 0
_fit_limiter = None


@contextlib.contextmanager
def fit_blas_threads():
    """SciPy's OpenBLAS at :func:`fit_threads` threads inside the block, the caller's setting
    restored after the outermost block (see the module docstring). Never raises for a missing
    library or threadpoolctl: the block then runs with whatever OpenBLAS has."""
    global _fit_depth, _fit_limiter
    n = fit_threads()
    if n is None:
        yield
        return
    with _fit_lock:
        if _fit_depth == 0:
            _fit_limiter = None
            ctl = _blas()
            if ctl is not None and ctl.lib_controllers:
                try:
                    _fit_limiter = ctl.limit(limits=n)
                except Exception:  # noqa: BLE001 - threading is an optimisation, never an error
                    pass
                finally:
                    _release_openblas_control()
        _fit_depth += 1
    try:
        yield
    finally:
        with _fit_lock:
            _fit_depth -= 1
            if _fit_depth == 0 and _fit_limiter is not None:
                try:
                    _fit_limiter.restore_original_limits()
                except Exception:  # noqa: BLE001
                    pass
                finally:
                    _fit_limiter = None
                    _release_openblas_control()


def _freeze_at_exit() -> None:
    gc.freeze()  # the collector's passes at shutdown then skip every object (module docstring)


_exit_hook = False


def freeze_gc_at_exit() -> bool:
    """Register (once) the ``atexit`` hook that calls ``gc.freeze()`` (module docstring, "Exit"),
    unless ``JAXMIXED_EXIT_GC=1``. The ``jaxmixed`` command calls it; importing jaxmixed does not.
    Returns whether the hook is registered."""
    global _exit_hook
    if not _exit_hook and not settings.current().exit_gc:
        atexit.register(_freeze_at_exit)
        _exit_hook = True
    return _exit_hook


def configure_from_environment() -> None:
    """What ``import jaxmixed`` does here: the compilation cache (see the module docstring).
    BLAS threads are set inside fits only, and no exit hook is registered."""
    if settings.current().no_cache:
        return
    if not jax.config.jax_compilation_cache_dir:
        try:
            enable_compilation_cache()
        except OSError:  # an unwritable home directory: run without the cache
            pass
