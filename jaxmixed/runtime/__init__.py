"""Process-level settings that make fits fast: JAX's persistent compilation cache, BLAS threads.

**Compilation cache.** A small model's first fit in a fresh process is dominated by compiling
its programs. jaxmixed turns on JAX's persistent compilation cache when it is imported, in
``$JAXMIXED_CACHE_DIR`` or else ``$XDG_CACHE_HOME/jaxmixed/jax`` (``~/.cache/jaxmixed/jax``),
with a minimum compile time of 0 s so that every program is kept; the next process loads the
compiled programs instead of compiling them again. It is left alone when

- the environment variable ``JAXMIXED_NO_CACHE=1`` is set (before importing jaxmixed), or
- JAX's cache was already configured by the user (``jax_compilation_cache_dir`` set).

At run time: ``jaxmixed.runtime.disable_compilation_cache()`` / ``enable_compilation_cache(path)``
and ``compilation_cache_dir()``. The cache is trusted code: do not point it at a directory that
others can write to. JAX consults it only after tracing a program, so :mod:`jaxmixed.programs`
keeps the traced programs of a fit beside it (``jaxmixed-programs/``), on and off with it: a
fresh process then neither traces nor compiles them.

**BLAS threads.** JAX's CPU Cholesky and triangular solves call the OpenBLAS that SciPy ships.
With more than one thread, OpenBLAS spins waiting for its workers; jaxmixed's programs interleave
those calls with XLA's own operations, which run on the calling thread
(``--xla_cpu_multi_thread_eigen=false``, see ``jaxmixed/__init__.py``), and on this project's
2-core machine a fit of InstEval (one 1,142² panel) took 2.7–3.0 s with OpenBLAS's default two
threads against 1.9–2.3 s with one, quiet or loaded (a lone 1,142² Cholesky went from 52 ms to
1,079 ms under load). So ``jm.fit`` (``fit_spec``) runs with SciPy's OpenBLAS at one thread and
puts the caller's setting back when it returns (:func:`fit_blas_threads`; nested and concurrent
fits share one save/restore). ``JAXMIXED_BLAS_THREADS=n`` (read at import) sets n threads for the
whole process instead, and ``JAXMIXED_BLAS_THREADS=0`` leaves OpenBLAS alone everywhere;
``set_blas_threads(n)`` sets it at run time. (Batched small factorisations no longer call
LAPACK, see :mod:`jaxmixed.xla_linalg`, so one thread cannot stall them as it once did.)

**Exit.** A process that has imported JAX, pandas and SciPy spends 0.2–0.3 s after its last
statement in the garbage collector's passes over every object of those libraries. jaxmixed
registers an ``atexit`` hook that freezes the objects still alive then (``gc.freeze()``), which
makes those passes empty: exit takes ≈ 0.04 s. Everything else about shutdown is unchanged
(other ``atexit`` hooks, buffers flushed, objects freed by reference counting); only objects
kept alive by reference cycles are no longer collected at exit, which CPython does not promise
anyway (their ``__del__`` may not run). ``JAXMIXED_EXIT_GC=1`` (before importing jaxmixed)
leaves shutdown alone.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import glob
import os
import threading

import jax

_DEFAULT_SUBDIR = os.path.join("jaxmixed", "jax")


def default_cache_dir() -> str:
    """``$JAXMIXED_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxmixed/jax`` (``~/.cache/jaxmixed/jax``)."""
    env = os.environ.get("JAXMIXED_CACHE_DIR")
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
    os.makedirs(path, exist_ok=True)
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


def _openblas_libs():
    """The OpenBLAS libraries SciPy (hence JAX's CPU LAPACK calls) and NumPy load."""
    libs = []
    try:
        import scipy

        pattern = os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), "scipy.libs", "*openblas*.so*")
        for path in sorted(glob.glob(pattern)):
            try:
                libs.append(ctypes.CDLL(path))
            except OSError:
                pass
    except ImportError:
        pass
    return libs


_SETTERS = ("scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_", "openblas_set_num_threads")


def set_blas_threads(n: int) -> bool:
    """Set SciPy's OpenBLAS (used by JAX's CPU linear algebra) to ``n`` threads.

    Returns True when a library was found and set."""
    done = False
    for lib in _openblas_libs():
        for name in _SETTERS:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(ctypes.c_int(int(n)))
                done = True
                break
    return done


_GETTERS = ("scipy_openblas_get_num_threads", "scipy_openblas_get_num_threads64_", "openblas_get_num_threads")
_handles_cache: list | None = None
#: threads for SciPy's OpenBLAS while a fit runs (None: leave it alone); set from the environment
FIT_BLAS_THREADS: int | None = 1
_fit_lock = threading.Lock()
_fit_depth = 0
_fit_saved: list = []


def _handles() -> list:
    """(get, set) of each OpenBLAS that exposes both, loaded once."""
    global _handles_cache
    if _handles_cache is None:
        out = []
        for lib in _openblas_libs():
            get = next((getattr(lib, n) for n in _GETTERS if hasattr(lib, n)), None)
            put = next((getattr(lib, n) for n in _SETTERS if hasattr(lib, n)), None)
            if get is not None and put is not None:
                get.restype = ctypes.c_int
                out.append((get, put))
        _handles_cache = out
    return _handles_cache


@contextlib.contextmanager
def fit_blas_threads():
    """SciPy's OpenBLAS at ``FIT_BLAS_THREADS`` threads inside the block, the caller's setting
    restored after the outermost block (see the module docstring). Never raises for a missing
    library or symbol: the block then runs with whatever OpenBLAS has."""
    global _fit_depth, _fit_saved
    n = FIT_BLAS_THREADS
    if n is None:
        yield
        return
    with _fit_lock:
        if _fit_depth == 0:
            try:
                hs = _handles()
                _fit_saved = [(put, int(get())) for get, put in hs]
                for put, _ in _fit_saved:
                    put(ctypes.c_int(int(n)))
            except Exception:  # noqa: BLE001 - threading is an optimisation, never an error
                _fit_saved = []
        _fit_depth += 1
    try:
        yield
    finally:
        with _fit_lock:
            _fit_depth -= 1
            if _fit_depth == 0:
                for put, old in _fit_saved:
                    try:
                        put(ctypes.c_int(old))
                    except Exception:  # noqa: BLE001
                        pass
                _fit_saved = []


def _freeze_at_exit() -> None:
    gc.freeze()  # the collector's passes at shutdown then skip every object (module docstring)


def configure_from_environment() -> None:
    """What ``import jaxmixed`` does: the cache, BLAS threads if asked, the exit hook (see the
    module docstring)."""
    if os.environ.get("JAXMIXED_EXIT_GC", "").strip() in ("", "0", "false", "False"):
        atexit.register(_freeze_at_exit)
    if os.environ.get("JAXMIXED_NO_CACHE", "").strip() not in ("", "0", "false", "False"):
        pass
    elif not jax.config.jax_compilation_cache_dir:
        try:
            enable_compilation_cache()
        except OSError:  # an unwritable home directory: run without the cache
            pass
    global FIT_BLAS_THREADS
    threads = os.environ.get("JAXMIXED_BLAS_THREADS")
    if threads is None or not threads.strip():
        return  # fits run at one OpenBLAS thread (fit_blas_threads), the rest is left alone
    try:
        k = int(threads)
    except ValueError:
        k = 0
    FIT_BLAS_THREADS = None  # 0 (or unreadable): leave OpenBLAS alone everywhere
    if k > 0:
        FIT_BLAS_THREADS = None  # the whole process runs at k threads
        try:
            set_blas_threads(k)
        except Exception:  # noqa: BLE001 - a missing symbol must never break the import
            pass
