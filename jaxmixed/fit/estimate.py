"""One fit of one engine: the optimiser as one compiled program, and the restart search.

:func:`optimize` minimises any engine's deviance (:mod:`jaxmixed.engine.interface`) over its
parameters ≥ their bounds, in the optimiser's units, as one program per engine shape (kept on
disk by :mod:`jaxmixed.runtime.programs`, so a fresh process neither traces nor compiles it);
:func:`best_fit` runs the restart search of :mod:`jaxmixed.fit.search` with it.
"""

from __future__ import annotations

import numpy as np

from jaxmixed.fit.optimizers import OptResult, minimize_scaled
from jaxmixed.fit.search import restart_search
from jaxmixed.runtime import programs
from jaxmixed.runtime.devices import host_array


def _optimize(x0, lower, data, engine, reml, unit, max_iter: int = 200) -> OptResult:
    return minimize_scaled(engine.deviance, x0, lower, unit, (data, reml), quasi_newton=engine.quasi_newton,
                           max_iter=max_iter)


_kept = programs.cached(_optimize, static_argnames=("engine", "max_iter"))
_jitted = programs.cached(_optimize, static_argnames=("engine", "max_iter"), keep=False)


def _program_for(engine):
    """The optimiser's program for this engine: kept on disk where the engine allows it."""
    return _kept if getattr(engine, "keep_programs", True) else _jitted


def optimize(x0, lower, data, engine, reml, unit, max_iter: int = 200) -> OptResult:
    """Minimise ``engine.deviance`` over x ≥ lower, in units ``unit`` (one compiled program per
    engine shape; ML and REML share it, ``reml`` being traced). Projected Newton with the exact
    Hessian; projected BFGS where the engine says Hessians are costly (``engine.quasi_newton``).
    The program is kept on disk (``runtime.programs``) for engines that allow it
    (``engine.keep_programs``), else compiled in each process (both with the compile options
    of ``runtime.programs``)."""
    return _program_for(engine)(x0, lower, data, engine, reml, unit, max_iter=max_iter)


def prefetch_optimize(n_params: int, data, engine, reml, max_iter: int = 200) -> None:
    """Have :func:`optimize`'s program for this engine and data loaded from disk, or traced and
    compiled, on the background thread (``runtime.programs.Program.prefetch``), so that it is
    ready, or under way, when :func:`optimize` is called with x0, lower and unit of
    ``n_params`` entries (a residual-structure fit does this while its independent-errors
    start is fitted)."""
    import jax

    vec = jax.ShapeDtypeStruct((int(n_params),), np.dtype("float64"))
    _program_for(engine).prefetch(vec, vec, data, engine, reml, vec, max_iter=max_iter, trace=True)


def best_fit(engine, data, reml: bool, start: np.ndarray, lower: np.ndarray, unit: np.ndarray, terms,
             singular_scale, max_iter: int = 200):
    """The optimum from ``start`` with the restart search (scaled starts, mirror images of a
    boundary optimum); returns (OptResult of the best run, the start scales tried).
    ``terms``/``singular_scale``: each term's (structure, θ slice) and the scale in which the
    boundary is tested (for the search; θ is the leading part of x)."""
    lower_d, unit_d = host_array(lower), host_array(unit)
    runs: list[OptResult] = []

    def run(lanes, starts):
        out = []
        for s in starts:
            opt = optimize(host_array(s), lower_d, data, engine, reml, unit_d, max_iter=max_iter)
            runs.append(opt)
            out.append(len(runs) - 1)
        rec = [runs[i] for i in out]
        return dict(x=np.stack([np.asarray(o.x) for o in rec]), fun=np.array([float(o.fun) for o in rec]),
                    converged=np.array([bool(o.converged) for o in rec]), run=np.array(out))

    best = restart_search(run, np.asarray(start, dtype=float)[None], np.asarray(start, dtype=float),
                          terms, singular_scale)
    return runs[int(best["run"][0])], best["tried"][0]
