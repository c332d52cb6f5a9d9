"""Fresh-process speed machinery: programs kept on disk (jaxmixed.programs), the scipy.stats
stand-in (jaxmixed.distributions), lazy imports. Results must be exactly those of plain jit."""

import json
import os
import pickle
import platform
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxmixed import runtime
from jaxmixed.inference import distributions
from jaxmixed.runtime import programs


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (a, b)
    assert np.array_equal(a, b, equal_nan=True), (a, b)


def test_distributions_are_scipy_stats_exactly():
    rng = np.random.default_rng(0)
    xs = [0.0, -1.0, 1e-300, 1e-20, 0.5, 1, 2.5, 3.84, 10, 100, 1e3, 1e6, np.inf, -np.inf, np.nan, 37.5]
    for x in xs + list(rng.normal(0, 5, 30)):
        for df in [1, 2, 3, 7, 0.5, 0, -1, np.nan, 40]:
            expected, got = stats.chi2.sf(x, df), distributions.chi2.sf(x, df)
            _same(expected, got)
            assert type(expected) is type(got)
        _same(stats.norm.sf(x), distributions.norm.sf(x))
        _same(stats.norm.cdf(x), distributions.norm.cdf(x))
    for q in [0, 1, 0.5, 0.975, 0.995, 1e-10, 1 - 1e-12, -0.1, 1.1, np.nan] + list(rng.uniform(size=30)):
        expected, got = stats.norm.ppf(q), distributions.norm.ppf(q)
        _same(expected, got)
        assert type(expected) is type(got)
    a = rng.normal(0, 3, (4, 5))
    _same(stats.norm.sf(np.abs(a)), distributions.norm.sf(np.abs(a)))
    _same(stats.chi2.sf(a**2, np.arange(1, 6)), distributions.chi2.sf(a**2, np.arange(1, 6)))


@pytest.fixture
def cache_dir(tmp_path):
    before = runtime.compilation_cache_dir()
    runtime.enable_compilation_cache(str(tmp_path))
    try:
        yield tmp_path
    finally:
        if before:
            runtime.enable_compilation_cache(before)
        else:
            runtime.disable_compilation_cache()


def _f(x, y, scale, n: int = 2):
    out = jnp.sin(x) @ y * scale
    for _ in range(n):
        out = jnp.tanh(out)
    return out, {"sum": jnp.sum(out)}


def _jit(fun, *args, **kwargs):
    """jax.jit with the compile options programs.cached gives these arguments (small ones: the
    fast-compile options on the CPU)."""
    opts = programs.compiler_options(jax.tree_util.tree_leaves(args))
    return programs.jit(fun, opts, static_argnames="n")(*args, **kwargs)


def test_fast_compile_options_only_for_small_programs_on_cpu(monkeypatch):
    small, big = jnp.ones((10, 10)), jax.ShapeDtypeStruct((programs.FAST_COMPILE_MAX + 1,), jnp.float64)
    cpu = jax.default_backend() == "cpu"
    assert programs.compiler_options([small]) == (programs.FAST_OPTIONS if cpu else ())
    assert programs.compiler_options([big]) == (programs.LARGE_OPTIONS if cpu else ())
    assert programs.LARGE_OPTIONS == (("xla_cpu_use_fusion_emitters", False),)
    import dataclasses

    from jaxmixed import settings

    class Static:  # a static argument with a .shape that is not an array's (an engine's)
        shape = object()

    assert programs.compiler_options([small, Static()]) == programs.compiler_options([small])
    monkeypatch.setattr(settings, "_CURRENT", dataclasses.replace(settings.current(), fast_compile=False))
    assert programs.compiler_options([small]) == () and programs.compiler_options([big]) == ()


def test_cached_program_is_kept_loaded_and_exact(cache_dir):
    x, y = jnp.linspace(0.0, 1.0, 12).reshape(3, 4), jnp.ones((4, 2))
    expected = _jit(_f, x, y, 0.5, n=3)
    first = programs.cached(_f, static_argnames=("n",))
    before = dict(programs.STATS)
    got = first(x, y, 0.5, n=3)
    assert programs.STATS["exported"] == before["exported"] + 1
    (path,) = [f for f in (cache_dir / programs.SUBDIR).iterdir() if f.suffix != programs.EXEC_SUFFIX]
    assert path.suffix == programs.SUFFIX and path.read_bytes().startswith(programs.MAGIC)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    jax.tree_util.tree_map(_same, got, expected)
    key = first._split((x, y, 0.5), {"n": 3})[0]
    other_key = first._split((x[:2], y, 0.5), {"n": 3})[0]
    assert programs._decode(path.read_bytes(), key) is not None
    assert programs._decode(path.read_bytes(), other_key) is None  # another call's program: a miss
    first(x, y, 0.25, n=3)  # same shapes and statics: the same program, no new export
    assert programs.STATS["exported"] == before["exported"] + 1

    again = programs.cached(_f, static_argnames=("n",))  # as a new process would: from disk
    jax.tree_util.tree_map(_same, again(x, y, 0.5, n=3), expected)
    assert programs.STATS["loaded"] == before["loaded"] + 1

    prefetched = programs.cached(_f, static_argnames=("n",))
    prefetched.prefetch(jax.ShapeDtypeStruct(x.shape, x.dtype), y, 0.5, n=3)
    jax.tree_util.tree_map(_same, prefetched(x, y, 0.5, n=3), expected)
    assert programs.STATS["loaded"] == before["loaded"] + 2

    other = first(x, y, 0.5, n=1)  # another static value: another program
    jax.tree_util.tree_map(_same, other, _jit(_f, x, y, 0.5, n=1))
    assert len([f for f in os.listdir(cache_dir / programs.SUBDIR) if f.endswith(programs.SUFFIX)]) == 2


def test_prefetch_here_compiles_on_the_calling_thread(cache_dir, monkeypatch):
    """``prefetch(..., trace=True, here=True)`` traces, keeps and compiles the program on the
    calling thread before it returns (no background work), and the call then neither traces
    nor compiles it again; nothing when the program is ready already."""
    import threading

    x, y = jnp.linspace(0.0, 1.0, 12).reshape(3, 4), jnp.ones((4, 2))
    expected = _jit(_f, x, y, 0.5, n=3)
    threads = []
    real = programs._compile_keeping

    def spy(prog, dyn, epath):
        threads.append(threading.current_thread())
        return real(prog, dyn, epath)

    monkeypatch.setattr(programs, "_compile_keeping", spy)
    p = programs.cached(_f, static_argnames=("n",))
    before = dict(programs.STATS)
    p.prefetch(jax.ShapeDtypeStruct(x.shape, x.dtype), y, 0.5, n=3, trace=True, here=True)
    assert threads == [threading.current_thread()]  # done here, before prefetch returned
    assert programs.STATS["exported"] == before["exported"] + 1
    jax.tree_util.tree_map(_same, p(x, y, 0.5, n=3), expected)
    p.prefetch(x, y, 0.5, n=3, trace=True, here=True)  # ready: nothing more
    assert programs.STATS["exported"] == before["exported"] + 1 and len(threads) == 1


def test_cached_program_without_cache_or_jit_is_plain_jax():
    before = runtime.compilation_cache_dir()
    runtime.disable_compilation_cache()
    try:
        f = programs.cached(_f, static_argnames=("n",))
        x, y = jnp.ones((2, 3)), jnp.ones((3, 1))
        jax.tree_util.tree_map(_same, f(x, y, 2.0), _jit(_f, x, y, 2.0))
        with jax.disable_jit():
            jax.tree_util.tree_map(_same, f(x, y, 2.0), _f(x, y, 2.0))
    finally:
        if before:
            runtime.enable_compilation_cache(before)


def test_programs_in_memory_are_bounded_and_reload_exactly(cache_dir, monkeypatch):
    """At most MAX_RESIDENT compiled programs (of all Programs together) stay in memory: the
    least recently used is dropped, and a later call with its shapes loads it again (from the
    disk cache here) with the same values. A program not kept on disk gets a jax.jit of its
    own, so that dropping the entry frees its executable."""
    monkeypatch.setattr(programs, "MAX_RESIDENT", 2)
    programs.release()
    kept = programs.cached(_f, static_argnames=("n",))
    memory_only = programs.cached(_f, static_argnames=("n",), keep=False)
    y = jnp.ones((4, 2))
    xs = [jnp.linspace(0.0, 1.0, 4 * m).reshape(m, 4) for m in (1, 2, 3)]
    expected = [_jit(_f, x, y, 0.5) for x in xs]
    for x, e in zip(xs, expected):
        jax.tree_util.tree_map(_same, kept(x, y, 0.5), e)
    assert len(kept._programs) == 2 and len(programs._resident) == 2
    first_key = kept._split((xs[0], y, 0.5), {})[0]
    assert first_key not in kept._programs  # the least recently used was dropped
    before = dict(programs.STATS)
    jax.tree_util.tree_map(_same, kept(xs[0], y, 0.5), expected[0])  # loaded again from disk
    assert programs.STATS["loaded"] == before["loaded"] + 1 and first_key in kept._programs

    jax.tree_util.tree_map(_same, memory_only(xs[1], y, 0.5), expected[1])
    entry = memory_only._programs[memory_only._split((xs[1], y, 0.5), {})[0]]
    assert entry._cache_size() == 1 and memory_only.jitted._cache_size() == 0  # its own jit
    assert len(kept._programs) + len(memory_only._programs) == 2


def test_release_drops_every_program_held_in_memory(monkeypatch):
    """programs.release empties the Programs' entries, the tracked jax.jit functions (the
    engines' module-level ones among them) and calls the hooks (fit_many's batch programs
    register theirs)."""
    from jaxmixed.engine import laplace, pls
    from jaxmixed.fit import batched

    assert pls.deviance in programs._tracked and laplace.hessian_report in programs._tracked
    assert batched._program.cache_clear in programs._release_hooks
    calls = []
    monkeypatch.setattr(programs, "_release_hooks", [lambda: calls.append(1)])
    f = programs.cached(_f, static_argnames=("n",), keep=False)
    tracked = programs.tracked(jax.jit(lambda x: 2 * x))
    x, y = jnp.ones((2, 3)), jnp.ones((3, 1))
    f(x, y, 1.0)
    tracked(x)
    assert f._programs and tracked._cache_size() == 1
    programs.release()
    assert not f._programs and tracked._cache_size() == 0 and calls == [1]
    jax.tree_util.tree_map(_same, f(x, y, 1.0), _jit(_f, x, y, 1.0))  # compiled again when called


def test_map_pressure_releases_programs(monkeypatch):
    """Compiling a program while the process holds more than half of the memory maps Linux
    allows it (vm.max_map_count) first releases the programs held in memory."""
    if programs.memory_maps() is None:
        pytest.skip("no /proc/self/maps (not Linux): there is no map limit to watch")
    f = programs.cached(_f, static_argnames=("n",), keep=False)
    x, y = jnp.ones((2, 3)), jnp.ones((3, 1))
    f(x, y, 1.0)
    assert len(f._programs) == 1
    monkeypatch.setattr(programs, "MAP_CHECK_EVERY", 1)
    monkeypatch.setattr(programs, "_MAP_LIMIT", 2 * programs.memory_maps() + 10**6)
    f(jnp.ones((3, 3)), y, 1.0)  # far below half of the limit: nothing dropped
    assert len(f._programs) == 2
    monkeypatch.setattr(programs, "_MAP_LIMIT", 2)
    jax.tree_util.tree_map(_same, f(jnp.ones((4, 3)), y, 1.0), _jit(_f, jnp.ones((4, 3)), y, 1.0))
    assert len(f._programs) == 1  # the two earlier ones released before this compile


FRESH = """
import collections, json, sys
import jax
traced = collections.Counter()  # jit tracings by function; "call": an Exported's calling wrapper (cheap)
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _, fun_name=None, **kw: traced.update([fun_name]) if event.endswith("jaxpr_trace_duration") else None)
import jaxmixed as jm
from jaxmixed.runtime import programs
r = jm.fit("weight ~ week + (1|id)", jm.datasets.load("pig"))
print(json.dumps(dict(loglik=r.loglik, fixed=r.fixed.to_numpy().tolist(), random=r.random.estimate.tolist(),
                      se=r.random.se.tolist(), traced=sum(n for f, n in traced.items() if f != "call"),
                      stats=programs.STATS,
                      lazy=[m for m in ("scipy.stats", "jaxmixed.fit.batched", "jaxmixed.functional", "jaxmixed.inference.bootstrap")
                            if m in sys.modules])))
"""


def _fresh(directory):
    """FRESH in a new process with its caches in ``directory``: its JSON line."""
    env = {**os.environ, "JAXMIXED_CACHE_DIR": str(directory)}
    env.pop("JAXMIXED_NO_CACHE", None)
    p = subprocess.run([sys.executable, "-c", FRESH], env=env, capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """A cache directory (not there before: the fit creates it) after one fit, and that fit."""
    directory = tmp_path_factory.mktemp("programs") / "new" / "cache"
    return directory, _fresh(directory)


def test_fresh_process_with_warm_cache_traces_nothing(cold):
    directory, cold = cold
    warm = _fresh(directory)
    assert cold["traced"] == 3 and cold["stats"] == {"loaded": 0, "exported": 3, "fallback": 0, "dropped": 0,
                                                     "executables_loaded": 0, "executables_written": 3}  # each once
    assert warm["traced"] == 0 and warm["stats"] == {"loaded": 3, "exported": 0, "fallback": 0, "dropped": 0,
                                                     "executables_loaded": 3, "executables_written": 0}
    for key in ("loglik", "fixed", "random", "se"):
        assert warm[key] == cold[key]
    assert warm["lazy"] == [], "a fit imported modules it does not need"


def test_cache_directories_are_owner_only(cold):
    directory, _ = cold
    for d in (directory, directory / programs.SUBDIR):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
    files = [f for f in (directory / programs.SUBDIR).iterdir() if f.suffix == programs.SUFFIX]
    assert len(files) == 3
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


class _Marker:
    """Unpickled, it creates a file: proof that a cache file was (or was not) unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_damaged_cache_file_is_ignored(cold, tmp_path):
    # in the shared directory itself: JAX's compiled programs there are only valid in place (a
    # copy would compile again, seconds); the test leaves it as it found it, every file valid
    directory, cold = cold
    sub = directory / programs.SUBDIR
    files = sorted(f for f in sub.iterdir() if f.suffix == programs.SUFFIX)
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(marker))
    files[0].write_bytes(payload)  # foreign: no header (a pickle, as earlier versions wrote)
    files[1].write_bytes(programs.MAGIC + b"%d\n" % programs.FORMAT + b'{"types":[]}\n' + os.urandom(2000))  # garbage payload
    files[2].write_bytes(files[2].read_bytes()[: files[2].stat().st_size // 2])  # truncated
    old_file = files[2].with_suffix(".pkl")
    old_file.write_bytes(payload)  # an earlier version's file: never opened
    damaged = {f: f.read_bytes() for f in files}

    run = _fresh(directory)
    assert run["loglik"] == cold["loglik"] and run["fixed"] == cold["fixed"] and run["se"] == cold["se"]
    # traced again, and compiled again past JAX's cache, their executables kept afresh
    assert run["stats"] == {"loaded": 0, "exported": 3, "fallback": 0, "dropped": 0, "executables_loaded": 0,
                            "executables_written": 3}
    assert not marker.exists(), "a cache file was unpickled"
    for f in files:  # each replaced by a valid file, which the next process loads
        assert f.read_bytes() != damaged[f] and f.read_bytes().startswith(programs.MAGIC)
    again = _fresh(directory)
    assert again["stats"] == {"loaded": 3, "exported": 0, "fallback": 0, "dropped": 0, "executables_loaded": 3,
                              "executables_written": 0} and again["loglik"] == cold["loglik"]
    assert not marker.exists()
    old_file.unlink()


def test_executable_is_kept_loaded_and_exact(cache_dir, tmp_path):
    """A program XLA compiled here has its executable kept beside it; a new Program (as a new
    process) loads it, without lowering, and gives exactly plain jit's values. A damaged file
    (checksum) or one whose description names anything but JAX's, jaxlib's and NumPy's classes
    is a miss, never run."""
    if not programs._executables_on():
        pytest.skip("executables are kept on the CPU backend only")
    x, y = jnp.linspace(0.0, 2.0, 15).reshape(5, 3), jnp.ones((3, 2))
    expected = _jit(_f, x, y, 0.5, n=2)
    before = dict(programs.STATS)
    jax.tree_util.tree_map(_same, programs.cached(_f, static_argnames=("n",))(x, y, 0.5, n=2), expected)
    assert programs.STATS["executables_written"] == before["executables_written"] + 1
    (exe,) = [f for f in (cache_dir / programs.SUBDIR).iterdir() if f.suffix == programs.EXEC_SUFFIX]
    assert exe.read_bytes().startswith(programs.EXEC_MAGIC) and stat.S_IMODE(exe.stat().st_mode) == 0o600
    again = programs.cached(_f, static_argnames=("n",))
    jax.tree_util.tree_map(_same, again(x, y, 0.5, n=2), expected)
    assert programs.STATS["executables_loaded"] == before["executables_loaded"] + 1
    prefetched = programs.cached(_f, static_argnames=("n",))
    prefetched.prefetch(jax.ShapeDtypeStruct(x.shape, x.dtype), y, 0.5, n=2)
    jax.tree_util.tree_map(_same, prefetched(x, y, 0.5, n=2), expected)
    assert programs.STATS["executables_loaded"] == before["executables_loaded"] + 2

    good = exe.read_bytes()
    marker = tmp_path / "unpickled"
    planted = pickle.dumps(_Marker(marker))
    import hashlib

    damaged = good[:-10] + bytes(b ^ 0xFF for b in good[-10:])
    planted_file = programs.EXEC_MAGIC + hashlib.sha256(planted).hexdigest().encode() + b"\n" + planted
    for blob in (damaged, planted_file, b"", programs.EXEC_MAGIC):
        exe.write_bytes(blob)
        n = programs.STATS["executables_loaded"]
        jax.tree_util.tree_map(_same, programs.cached(_f, static_argnames=("n",))(x, y, 0.5, n=2), expected)
        assert programs.STATS["executables_loaded"] == n, blob[:40]
        assert not marker.exists(), "an executable file made the reader run a function"
    # the refused file left a marker: that program is compiled as usual from now on
    assert exe.with_name(exe.name + programs.NO_EXEC_SUFFIX).exists()
    assert programs._allowed("builtins", "eval") is None and programs._allowed("os", "system") is None
    assert programs._allowed("jax._src.core", "ShapedArray") is not None


def test_loading_an_executable_returns_the_freed_memory(cache_dir, monkeypatch):
    """After XLA rebuilds a loaded executable (on the caller's thread or a loader's), the
    memory it freed goes back to the system (glibc's malloc_trim on Linux), once per load; a C
    library without it is left alone."""
    if not programs._executables_on():
        pytest.skip("executables are kept on the CPU backend only")
    x, y = jnp.linspace(0.0, 3.0, 21).reshape(7, 3), jnp.ones((3, 2))
    expected = _jit(_f, x, y, 0.25, n=3)
    programs.cached(_f, static_argnames=("n",))(x, y, 0.25, n=3)  # compiled, its executable kept
    calls = []
    real = programs._malloc_trim()
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert real is not None
    monkeypatch.setattr(programs, "_trim_off", threading.Event())  # (a slow trim earlier in this process turns it off)
    monkeypatch.setattr(programs, "_malloc_trim", lambda: (lambda pad: calls.append(pad) or 1))
    jax.tree_util.tree_map(_same, programs.cached(_f, static_argnames=("n",))(x, y, 0.25, n=3), expected)
    assert calls == [0]
    prefetched = programs.cached(_f, static_argnames=("n",))
    prefetched.prefetch(jax.ShapeDtypeStruct(x.shape, x.dtype), y, 0.25, n=3)
    jax.tree_util.tree_map(_same, prefetched(x, y, 0.25, n=3), expected)
    deadline = time.monotonic() + 10
    while len(calls) < 2 and time.monotonic() < deadline:  # the loader trims after handing over
        time.sleep(0.01)
    assert calls == [0, 0]
    monkeypatch.setattr(programs, "_malloc_trim", lambda: None)
    programs._release_freed_memory()  # nothing to call: no error
    # a trim slower than TRIM_MAX_SECONDS (a large heap) turns trimming off for the process
    slow = []
    monkeypatch.setattr(programs, "_trim_off", threading.Event())
    monkeypatch.setattr(programs, "TRIM_MAX_SECONDS", 0.0)
    monkeypatch.setattr(programs, "_malloc_trim", lambda: (lambda pad: slow.append(pad) or time.sleep(0.001)))
    programs._release_freed_memory()
    programs._release_freed_memory()
    assert slow == [0] and programs._trim_off.is_set()


def test_executable_kept_though_jax_cache_holds_the_program(cache_dir, monkeypatch):
    """A program JAX's persistent cache already holds (compiled with executables off, or on
    another host sharing the folder) still gets its executable: XLA compiles it once past JAX's
    cache, and a later Program loads it; the values are plain jit's throughout."""
    import dataclasses

    from jaxmixed import settings

    if not programs._executables_on():
        pytest.skip("executables are kept on the CPU backend only")
    x, y = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), jnp.full((3, 2), 0.5)
    expected = _jit(_f, x, y, 0.25, n=3)
    on = settings.current()
    monkeypatch.setattr(settings, "_CURRENT", dataclasses.replace(on, keep_executables=False))
    jax.tree_util.tree_map(_same, programs.cached(_f, static_argnames=("n",))(x, y, 0.25, n=3), expected)
    assert [f for f in cache_dir.iterdir() if f.name.endswith("-cache")], "JAX's cache holds nothing"
    assert not list((cache_dir / programs.SUBDIR).glob("*" + programs.EXEC_SUFFIX))
    monkeypatch.setattr(settings, "_CURRENT", on)
    before = dict(programs.STATS)
    jax.tree_util.tree_map(_same, programs.cached(_f, static_argnames=("n",))(x, y, 0.25, n=3), expected)
    assert programs.STATS["executables_written"] == before["executables_written"] + 1
    jax.tree_util.tree_map(_same, programs.cached(_f, static_argnames=("n",))(x, y, 0.25, n=3), expected)
    assert programs.STATS["executables_loaded"] == before["executables_loaded"] + 1


def test_unserialisable_executable_leaves_a_marker(cache_dir, monkeypatch):
    """Where XLA cannot serialise a program's executable, a marker beside it makes later
    Programs compile it as usual (JAX's cache serving them), not past JAX's cache every time."""
    from jax.experimental import serialize_executable

    if not programs._executables_on():
        pytest.skip("executables are kept on the CPU backend only")

    def refuse(_):
        raise ValueError("not serialisable")

    monkeypatch.setattr(serialize_executable, "serialize", refuse)
    x, y = jnp.linspace(0.0, 1.0, 6).reshape(2, 3), jnp.ones((3, 2))
    expected = _jit(_f, x, y, 2.0, n=1)
    jax.tree_util.tree_map(_same, programs.cached(_f, static_argnames=("n",))(x, y, 2.0, n=1), expected)
    (marker,) = (cache_dir / programs.SUBDIR).glob("*" + programs.NO_EXEC_SUFFIX)
    calls = []
    monkeypatch.setattr(programs, "_without_jax_cache", lambda: calls.append(1))
    jax.tree_util.tree_map(_same, programs.cached(_f, static_argnames=("n",))(x, y, 2.0, n=1), expected)
    assert calls == [] and marker.exists()


def test_no_executables_in_a_multi_process_run(monkeypatch):
    """In a jax.distributed run (more than one process) no executable is kept or loaded: one
    loaded from disk is not bound to the run's collectives and left the other process waiting
    at jax.distributed's shutdown barrier (tests/test_streaming.py's two-process fit hung)."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert not programs._executables_on()
    assert programs._executable_path("/tmp/some-program", ()) is None


_SEVERAL_DEVICES = """
import json, sys
import jax, jax.numpy as jnp
from jaxmixed.runtime import programs
assert len(jax.devices()) == 4, jax.devices()

def f(x, y):
    return jnp.linalg.solve(x @ x.T + jnp.eye(3), y).sum(), jnp.tanh(x)

x, y = jnp.linspace(0.0, 1.0, 9).reshape(3, 3), jnp.arange(3.0)
a, b = programs.cached(f)(x, y)
g = programs.cached(f)
g(x, y)
with jax.default_device(jax.devices()[2]):  # not the device the executables are kept for
    p = programs.cached(f)
    p.prefetch(x, y)  # compiled on a background thread, for device 2 too
    for h in (programs.cached(f), g, p):
        a2, b2 = h(x, y)
        assert a2.devices() == {jax.devices()[2]} and float(a2) == float(a), (a2.devices(), a2, a)
print(json.dumps(dict(a=float(a), b=b.tolist(), stats=programs.STATS)))
"""


def test_executable_loaded_in_a_process_with_several_devices(tmp_path):
    """With several local devices (here 4 virtual CPU devices) a kept executable is loaded for
    the default device alone, as it was compiled: loaded for all four it expected four shards of
    each argument (tests/test_streaming.py's eight-device fit failed in every process after the
    first). Under ``jax.default_device(another)`` the program runs there (no executable
    then)."""
    if not programs._executables_on():
        pytest.skip("executables are kept on the CPU backend only")
    env = dict(os.environ, JAXMIXED_CACHE_DIR=str(tmp_path),
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _SEVERAL_DEVICES], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    # the first process writes one executable (and loads it for g); the second loads it twice
    assert first["stats"]["executables_written"] == 1 and second["stats"]["executables_loaded"] == 2
    assert second["a"] == first["a"] and second["b"] == first["b"]


def test_unreadable_or_foreign_bytes_are_a_miss():
    header = programs.MAGIC + b"%d\n" % programs.FORMAT
    for blob in [b"", b"\x00" * 64, programs.MAGIC, programs.MAGIC + b"999\n{}\n", header,
                 header + b"not json\n", header + b'{"types":[["os","system"]]}\nxx',
                 header + b'{"types":[["antigravity","X"]]}\nxx', header + b'{"types":[]}\n',
                 header + b'{"types":[]}\n' + os.urandom(500), pickle.dumps({"a": 1})]:
        assert programs._decode(blob) is None, blob
    assert "antigravity" not in sys.modules  # a header never makes a module outside jaxmixed be imported
    assert programs._load("/nonexistent/file" + programs.SUFFIX) is None


def test_no_pickle_in_the_package():
    root = Path(programs.__file__).resolve().parents[1]
    assert root.name == "jaxmixed"
    sources = sorted(root.rglob("*.py"))
    assert len(sources) > 10
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for word in ("import pickle", "pickle.", "cloudpickle"):
            assert word not in text, f"{word!r} in {path}"


def test_program_key_covers_the_whole_package(tmp_path):
    """The programs' key hashes every source file of the package, not only runtime/'s: an edit
    to the optimiser (jaxmixed/fit) must never load a program traced from the old code (a
    copy of the package with one line added to fit/optimizers.py gets another hash)."""
    import shutil

    root = Path(programs.__file__).resolve().parents[1]
    hashed_root, files = programs._package_files()
    assert Path(hashed_root) == root
    assert {str(p) for p in root.rglob("*.py")} == set(files)
    hashes = []
    for edit in (False, True):
        copy = tmp_path / str(edit) / "jaxmixed"
        shutil.copytree(root, copy, ignore=shutil.ignore_patterns("__pycache__"))
        if edit:
            with open(copy / "fit" / "optimizers.py", "a") as fh:
                fh.write("\n# edited\n")
        out = subprocess.run([sys.executable, "-c", "from jaxmixed.runtime import programs; "
                              "print(programs._package_hash())"], cwd=copy.parent, capture_output=True,
                             text=True, check=True, env={**os.environ, "PYTHONPATH": str(copy.parent)})
        hashes.append(out.stdout.strip())
    assert len(hashes[0]) == 64 and hashes[0] != hashes[1]
