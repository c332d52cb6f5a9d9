"""jaxmixed.settings (every JAXMIXED_* variable, parsed in one place) and the process-wide side
effects it governs: XLA_FLAGS only on jaxlib versions known to hang, BLAS threads only inside a
fit (threadpoolctl), gc.freeze at exit only from the command line."""

import dataclasses
import logging
import os
import subprocess
import sys
import textwrap
import threading

import pytest

import jaxmixed as jm
from jaxmixed import runtime, settings
from jaxmixed.settings import Settings, from_environment, xla_flags_to_add

EIGEN = "--xla_cpu_multi_thread_eigen=false"


# ------------------------------------------------------------------- parsing the environment


def test_defaults_from_an_empty_environment():
    assert from_environment({}) == Settings()
    assert Settings() == Settings(keep_xla_flags=False, cache_dir=None, no_cache=False, blas_threads=1,
                                  exit_gc=False, fast_compile=True)
    assert set(settings.ENVIRONMENT_VARIABLES) == {f.name for f in dataclasses.fields(Settings)}
    for var in settings.ENVIRONMENT_VARIABLES.values():  # the table of the module docstring
        assert var in settings.__doc__


@pytest.mark.parametrize("field", ["keep_xla_flags", "no_cache", "exit_gc"])
@pytest.mark.parametrize("raw, value", [("1", True), ("true", True), (" Yes ", True), ("ON", True),
                                        ("0", False), ("false", False), ("no", False), ("off", False),
                                        ("", False), ("   ", False), ("maybe", False), ("2", False)])
def test_switches(field, raw, value):
    var = settings.ENVIRONMENT_VARIABLES[field]
    assert getattr(from_environment({var: raw}), field) is value


@pytest.mark.parametrize("raw, value", [("1", True), ("on", True), ("0", False), ("off", False), ("", False),
                                        ("maybe", True)])
def test_fast_compile_switch_defaults_on(raw, value):
    assert from_environment({"JAXMIXED_FAST_COMPILE": raw}).fast_compile is value
    assert from_environment({}).fast_compile is True


@pytest.mark.parametrize("raw, n", [("0", 0), ("1", 1), ("4", 4), (" 3 ", 3),
                                    ("", 1), ("-2", 1), ("two", 1), ("1.5", 1)])
def test_blas_threads(raw, n):
    assert from_environment({"JAXMIXED_BLAS_THREADS": raw}).blas_threads == n


def test_cache_dir():
    assert from_environment({"JAXMIXED_CACHE_DIR": "~/x/jax"}).cache_dir == "~/x/jax"
    assert from_environment({"JAXMIXED_CACHE_DIR": "  "}).cache_dir is None
    assert from_environment({"JAXMIXED_CACHE_DIR": ""}).cache_dir is None


def test_from_environment_is_pure_and_settings_are_frozen():
    env = {"JAXMIXED_BLAS_THREADS": "3", "XLA_FLAGS": "--a"}
    s = from_environment(env)
    assert env == {"JAXMIXED_BLAS_THREADS": "3", "XLA_FLAGS": "--a"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.blas_threads = 2  # type: ignore[misc]
    assert isinstance(settings.current(), Settings) and settings.current() is settings.current()


# -------------------------------------------------------------------------------- XLA_FLAGS


@pytest.mark.parametrize("version, hangs", [("0.10.2", True), ("0.10.0", True), ("0.10.2.dev20250101", True),
                                            ((0, 10), True), ((0, 10, 1), True), ("0.11.0", False),
                                            ("0.4.30", False), ("1.10.0", False), ((0, 9), False),
                                            ("", False), ("garbage", False), (None, False)])
def test_which_jaxlib_hangs(version, hangs):
    assert settings.is_hanging_jaxlib(version) is hangs
    assert xla_flags_to_add(version, "", False) == ((EIGEN,) if hangs else ())


def test_xla_flags_to_add_respects_the_users_flag_and_keep():
    assert xla_flags_to_add("0.10.2", None, False) == (EIGEN,)
    assert xla_flags_to_add("0.10.2", "--xla_force_host_platform_device_count=4", False) == (EIGEN,)
    assert xla_flags_to_add("0.10.2", "--xla_cpu_multi_thread_eigen=true", False) == ()
    assert xla_flags_to_add("0.10.2", EIGEN, False) == ()
    assert xla_flags_to_add("0.10.2", "", True) == ()
    assert xla_flags_to_add("0.11.0", "", False) == ()


def test_apply_xla_flags_adds_the_flag_once_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(settings, "_said", False)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    with caplog.at_level(logging.INFO, logger="jaxmixed"):
        assert settings.apply_xla_flags(env, Settings(), "0.10.2") == (EIGEN,)
        assert settings.apply_xla_flags(env, Settings(), "0.10.2") == ()
        env2 = {}
        assert settings.apply_xla_flags(env2, Settings(), "0.10.2") == (EIGEN,)  # not said again
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {EIGEN}"
    assert env2["XLA_FLAGS"] == EIGEN
    said = [r for r in caplog.records if r.name == "jaxmixed"]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert EIGEN in said[0].getMessage() and "JAXMIXED_KEEP_XLA_FLAGS=1" in said[0].getMessage()
    for version, keep in (("0.11.1", False), ("0.10.2", True)):
        env = {}
        assert settings.apply_xla_flags(env, Settings(keep_xla_flags=keep), version) == ()
        assert env == {}


def _child_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXMIXED_") and k != "XLA_FLAGS"}
    env["JAXMIXED_NO_CACHE"] = "1"
    env.update(extra)
    return env


def _run(*code, **extra):
    script = "\n".join(textwrap.dedent(part) for part in code)
    out = subprocess.run([sys.executable, "-c", script], env=_child_env(**extra),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


# Registered before jaxmixed is imported, so that it runs after every hook jaxmixed registers
# (atexit runs its hooks last in, first out).
_FREEZE_CHECK = """
import atexit, gc
atexit.register(lambda: print("freeze-count", gc.get_freeze_count()))
"""


def test_import_changes_xla_flags_once_on_a_hanging_jaxlib_and_nothing_else_process_wide():
    """A fresh ``import jaxmixed``: the flag on this jaxlib if it is known to hang (said once on
    the jaxmixed logger), no gc.freeze hook at exit, OpenBLAS's threads untouched even with
    JAXMIXED_BLAS_THREADS=1 (that is for fits only)."""
    out = _run(_FREEZE_CHECK, """
        import logging, os
        logging.basicConfig(level=logging.INFO, format="LOG %(name)s %(levelname)s %(message)s")
        try:
            import scipy.linalg, threadpoolctl
            def threads():
                return sorted((i["filepath"], i["num_threads"]) for i in threadpoolctl.threadpool_info())
        except ImportError:
            def threads():
                return []
        before = threads()
        import jaxmixed
        import jaxmixed.app.cli  # the command line's module, imported but not run
        print("blas-unchanged", threads() == before)
        print("XLA_FLAGS", repr(os.environ.get("XLA_FLAGS")))
        print("hangs", jaxmixed.settings.is_hanging_jaxlib(jaxmixed.settings.jaxlib_version()))
    """, JAXMIXED_BLAS_THREADS="1")
    lines = out.stdout.splitlines()
    said = [line for line in out.stderr.splitlines() if line.startswith("LOG jaxmixed INFO")]
    assert "blas-unchanged True" in lines
    assert lines[-1] == "freeze-count 0"
    if "hangs True" in lines:
        assert f"XLA_FLAGS {EIGEN!r}" in lines
        assert len(said) == 1 and EIGEN in said[0]
    else:
        assert "XLA_FLAGS None" in lines and not said


def test_import_leaves_xla_flags_alone_on_a_jaxlib_not_known_to_hang():
    # the installed jaxlib's version as jaxmixed.settings reads it (package metadata), made 0.11.0
    out = _run("""
        import importlib.metadata, os
        _version = importlib.metadata.version
        importlib.metadata.version = lambda name: "0.11.0" if name == "jaxlib" else _version(name)
        import jaxmixed
        importlib.metadata.version = _version
        print("XLA_FLAGS", repr(os.environ.get("XLA_FLAGS")))
    """)
    assert out.stdout.splitlines()[-1] == "XLA_FLAGS None"


def test_import_leaves_the_users_xla_flags_alone():
    out = _run("""
        import os, jaxmixed
        print("XLA_FLAGS", repr(os.environ.get("XLA_FLAGS")))
    """, XLA_FLAGS="--xla_cpu_multi_thread_eigen=true", JAXMIXED_KEEP_XLA_FLAGS="1")
    assert out.stdout.splitlines()[-1] == "XLA_FLAGS '--xla_cpu_multi_thread_eigen=true'"


@pytest.mark.parametrize("exit_gc, frozen", [("", True), ("1", False)])
def test_the_command_line_freezes_the_collector_at_exit(exit_gc, frozen):
    out = _run(_FREEZE_CHECK, """
        from jaxmixed.app.cli import main
        assert main(["--version"]) == 0
    """, JAXMIXED_EXIT_GC=exit_gc)
    count = int(out.stdout.splitlines()[-1].split()[-1])
    assert (count > 0) is frozen


# ------------------------------------------------------------------------------ BLAS threads


def _threads(threadpoolctl):
    return {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()}


@pytest.fixture
def blas():
    """threadpoolctl, and the paths of the libraries a fit limits (skip where there are none)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    libs = runtime.blas_libraries()
    if not libs or runtime.fit_threads() is None:
        pytest.skip("threadpoolctl finds no BLAS here, or JAXMIXED_BLAS_THREADS=0")
    return threadpoolctl, {i["filepath"] for i in libs}


def test_fit_runs_scipys_openblas_at_one_thread_and_restores_the_callers_two(blas):
    threadpoolctl, paths = blas
    with threadpoolctl.threadpool_limits(2):
        before = _threads(threadpoolctl)
        with runtime.fit_blas_threads():
            inside = _threads(threadpoolctl)
            with runtime.fit_blas_threads():  # nested: still one thread, restored only at the end
                pass
            assert _threads(threadpoolctl) == inside
        assert _threads(threadpoolctl) == before
        assert all(inside[p] == 1 for p in paths)
        assert all(inside[p] == n for p, n in before.items() if p not in paths)  # NumPy's own: untouched
        r = jm.fit("weight ~ week + (1|id)", jm.datasets.load("pig"))
        assert r.converged and _threads(threadpoolctl) == before


def test_blas_threads_setting_and_override(blas, monkeypatch):
    threadpoolctl, paths = blas
    with threadpoolctl.threadpool_limits(2):
        before = _threads(threadpoolctl)
        monkeypatch.setattr(settings, "_CURRENT", dataclasses.replace(settings.current(), blas_threads=0))
        assert runtime.fit_threads() is None
        with runtime.fit_blas_threads():  # JAXMIXED_BLAS_THREADS=0: OpenBLAS left alone
            assert _threads(threadpoolctl) == before
        monkeypatch.setattr(runtime, "FIT_BLAS_THREADS", 1)  # the module's override wins
        with runtime.fit_blas_threads():
            assert all(_threads(threadpoolctl)[p] == 1 for p in paths)
        assert _threads(threadpoolctl) == before


def test_a_fit_in_another_thread_does_not_take_control_of_openblas(blas):
    """threadpoolctl ≥ 3.8 lets only one thread set OpenBLAS's threads; a fit in a worker thread
    that is still alive must not keep that role, or the caller's own limits would be ignored."""
    threadpoolctl, paths = blas
    entered, done = threading.Event(), threading.Event()

    def worker():
        with runtime.fit_blas_threads():
            entered.set()
        done.wait(30)

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert entered.wait(30)
        with threadpoolctl.threadpool_limits(1):
            assert all(_threads(threadpoolctl)[p] == 1 for p in paths)
        with threadpoolctl.threadpool_limits(2):
            before = _threads(threadpoolctl)
            assert runtime.set_blas_threads(1)
            assert all(_threads(threadpoolctl)[p] == 1 for p in paths)
            assert runtime.set_blas_threads(before[next(iter(paths))])
            assert _threads(threadpoolctl) == before
    finally:
        done.set()
        t.join()


def test_no_library_is_not_an_error(monkeypatch):
    monkeypatch.setattr(runtime, "_blas_cache", False)  # as when threadpoolctl is missing or fails
    with runtime.fit_blas_threads():
        pass
    assert runtime.set_blas_threads(1) is False
    assert runtime.blas_libraries() == []
