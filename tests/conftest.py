"""Shared fixtures: reference values, data, and fits cached per test session."""

import json
import os
from pathlib import Path

# The tests' own jax.jit checks (autodiff against finite differences, engines against each
# other) compile with the XLA:CPU classic loop emitters, as jaxmixed compiles its own programs
# (runtime.programs: LARGE_OPTIONS / FAST_OPTIONS); XLA's default fusion emitters compile the
# same checks ~30 % slower (tests/test_glmm_quadrature.py, empty cache: 132 -> 93 s). Set before
# JAX starts its backend; a value the caller set is kept. Only the test process: the library
# itself changes no flag.
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip()

import jax  # noqa: E402
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)

import jaxmixed as jm  # noqa: E402

REF = Path(__file__).parent / "reference"


@pytest.fixture(scope="session")
def seed_ref():
    return json.loads((REF / "seed_stata.json").read_text())


@pytest.fixture(scope="session")
def jsp_ref():
    return json.loads((REF / "jsp_public.json").read_text())


@pytest.fixture(scope="session")
def jsp():
    d = jm.datasets.load("jsp")
    d["math3c"] = d.math3 - d.math3.mean()
    return d


_CACHE = {}


def fd_gradient(f, x, h=1e-5):
    """Central differences of the scalar function f at x (numpy), for derivative tests."""
    return np.array([(f(x + h * e) - f(x - h * e)) / (2 * h) for e in np.eye(x.size)])


def cached_fit(kind, text, data_name, **kw):
    """Fit once per session (fits compile; tests share them)."""
    key = (kind, text, data_name, tuple(sorted(kw.items())))
    if key not in _CACHE:
        data = jm.datasets.load(data_name)
        if data_name == "jsp":
            data["math3c"] = data.math3 - data.math3.mean()
        fn = {"fit": jm.fit, "xtmixed": jm.xtmixed}[kind]
        _CACHE[key] = fn(text, data, **kw)
    return _CACHE[key]


class _Traces:
    """Counts JAX traces (jaxpr tracing events of ``jax.monitoring``) while active: tests watch
    compilations this way instead of a counter inside traced code."""

    def __init__(self):
        self.names: list[str] = []
        self.active = False

    def __call__(self, event, duration, **kw):
        if self.active and event == "/jax/core/compile/jaxpr_trace_duration":
            self.names.append(str(kw.get("fun_name", "?")))

    def __enter__(self):
        self.names.clear()
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False


_TRACES = _Traces()
jax.monitoring.register_event_duration_secs_listener(_TRACES)


@pytest.fixture
def traces():
    """``with traces as t: ...`` then ``t.names``: the functions JAX traced inside the block."""
    return _TRACES


@pytest.fixture(autouse=True, scope="module")
def _fresh_compiled_programs():
    """Drop the compiled programs held in memory after each test module (jaxmixed's, with
    ``runtime.programs.release``, and JAX's): a whole run compiles thousands, each XLA:CPU
    executable holds memory maps, and a run that reached Linux's limit on them
    (``vm.max_map_count``) crashed in XLA (segfaults late in the run, on the same AR(1) test;
    the package itself now keeps at most ``programs.MAX_RESIDENT`` programs in memory). The
    persistent compilation cache still serves programs compiled before."""
    yield
    from jaxmixed.runtime import programs

    programs.release()
    jax.clear_caches()
    import gc

    gc.collect()
