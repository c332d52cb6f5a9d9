"""Compiled programs that outlive the process: ``jax.jit`` plus a disk cache of traced programs.

JAX's persistent compilation cache (:mod:`jaxmixed.runtime`) stores compiled executables, but
it is consulted only after a program has been traced and lowered, and for a small model's first
fit in a fresh process that tracing is most of the time (≈ 0.3 s for the optimiser of a
random-slope model, as much again for the η-Hessian). :func:`cached` wraps a function like
``jax.jit(fun, static_argnames=...)`` and also keeps each traced program on disk as a
:mod:`jax.export` artefact (StableHLO), keyed by

- the function, the values of its static arguments (their ``repr``, e.g. the model's
  ``ModelShape``) and the shapes and dtypes of its array arguments;
- the source of the jaxmixed package (a hash of its ``.py`` files: an edited package never
  loads a program traced from the old code), the JAX and jaxlib versions, the backend, the
  ``jax_enable_x64`` setting and ``XLA_FLAGS``.

A fresh process then loads the program instead of tracing it; calling it still goes through
XLA's compile step, where the persistent compilation cache supplies the executable. The
programs are exactly those ``jax.jit`` with the same compile options (below) would run (same
StableHLO, same XLA compile), so results are identical. Within a process each program is loaded or traced once per key, as with
``jax.jit``.

The cache lives in ``<compilation cache dir>/jaxmixed-programs`` and is on exactly when the
persistent compilation cache is on (``JAXMIXED_NO_CACHE=1`` turns both off). Directories it
creates are owner-only (mode 0o700; an existing directory is left as it is), files are written
with mode 0o600. Each file (``<key hash>.jaxexport``) is a short header (:data:`MAGIC`, the
format version, the names of the package's NamedTuple types in the program's arguments and
results) followed by ``Exported.serialize()`` (a flatbuffer holding the StableHLO and the
calling convention): data, never code, so that loading a file runs nothing that was in it, and
the only types it can name are NamedTuples of the jaxmixed package (or of modules already
imported). A file without the header (a foreign file, a damaged one), one that does not
deserialise, or one whose calling convention differs from the call's is a miss: the program is
traced again and the file overwritten. Files of earlier versions (``.pkl``) are never opened.
Anything unusual falls back to plain ``jax.jit``: arguments committed to a device other than
JAX's default one, ``jax_disable_jit``, a static argument without a stable ``repr``, a program
that ``jax.export`` refuses or cannot serialise (no file is written then).

**Compile options.** On the CPU, XLA's optimising compile of a small model's programs takes
seconds (the optimiser of a random-slope model on the JSP data: 4.2 s), and their run time is
milliseconds. Programs whose array arguments hold at most :data:`FAST_COMPILE_MAX` numbers in
all are therefore compiled with :data:`FAST_OPTIONS` (XLA's backend optimisation level 0 and
the classic loop emitters: 2.1 s there, running in 6.6 ms instead of 2.5 ms); larger ones at
XLA's default optimisation level with the classic loop emitters too (:data:`LARGE_OPTIONS`;
measured on this project's 2-core machine with empty caches: AR(1) residuals on 10,000 /
100,000 rows, first fit 21.3 → 16.0 s and 24.0 → 17.0 s, peak memory 1,056 → 582 MB and
1,145 → 642 MB; the 1M-row model 13.1 → 6.9 s; InstEval 16.8 → 13.8 s; warm fits and refits
unchanged within the noise). The options depend only on the arguments' shapes, they are part
of the persistent cache's key (JAX's), and other backends always get the defaults.
``JAXMIXED_FAST_COMPILE=0`` turns this off: every program with XLA's defaults
(:mod:`jaxmixed.settings`).

**Prefetch.** :meth:`Program.prefetch` has a program ready before its call: one kept on disk is
loaded (its executable deserialised and linked by XLA, which releases the GIL) on one of
:data:`LOAD_WORKERS` background threads, so that a fit's optimiser and post-fit programs load at
once; one that must be traced and compiled goes to a single compile thread (two XLA compiles at
once on a 2-core machine measured slower for an empty-cache fit). Measured on this project's
2-core machine, warm caches, five fresh processes each (medians): VerbAgg's GLMM 1.37 → 1.27 s,
the nested 20,000-row Satterthwaite fit 1.04 → 0.98 s (``scripts/bench_df.py``'s median of three
gave 1.21 s before and 1.23 s after: within that machine's run-to-run noise).

**Executables** (CPU backend; ``JAXMIXED_KEEP_EXECUTABLES=0`` turns this off). Calling a loaded
program still lowers it, and lowering any ``jax.export`` program on the CPU first runs jaxlib's
LAPACK set-up, which imports SciPy's LAPACK (≈ 0.2–0.35 s, holding the GIL): every program of a
fresh process waits for it before XLA may even look up its executable. So a program that XLA
compiled here also has its executable kept (``<hash>.xlaexec`` beside the program's file, keyed
by that file, the compile options and the host's CPU model and feature flags), and a later
process loads it with ``jax.experimental.serialize_executable`` without lowering, the LAPACK
set-up running meanwhile on a thread of its own (the executable waits for it before its first
run: its LAPACK calls need it). Such a program is compiled past JAX's persistent cache (once
per host): an executable that cache supplies cannot be kept (XLA:CPU executables serialised
again after such a load miss functions when run), and without the bypass a program that cache
already holds (compiled on another host sharing the folder, or with executables off) would
never get one; where XLA cannot serialise an executable, or refuses a kept one (or the reader
does), a ``.noexec`` marker beside it says so and later processes compile that program as usual. The file is a
header, the payload's SHA-256 and JAX's description of the executable; a file that fails the
checksum is a miss, and the description is read by a restricted reader that resolves only
classes of JAX, jaxlib and NumPy (and JAX's ``_unpickle…`` reconstructors) of modules already
imported, so that a planted file cannot make it run a function. An executable is native code,
as are the entries of JAX's own cache beside it: the directory is owner-only for that reason.
In a ``jax.distributed`` run (``jax.process_count() > 1``) executables are neither kept nor
loaded: a loaded one is not bound to the run's collectives (the other process then waited for
ever at the shutdown barrier). Only programs whose arguments all sit on the default device are
kept, and a kept executable is loaded for that device alone (in a process with several devices,
such as ``--xla_force_host_platform_device_count=8``, one loaded for all of them expected a shard
of each argument per device).
Measured on this project's 2-core machine, warm caches, fresh processes, the nested 20,000-row
Satterthwaite fit: 0.97–1.32 s without, 0.68–0.82 s with executables (alternating runs).

**Programs in memory.** Every XLA:CPU executable maps its code into the process (three memory
maps per compiled kernel: a fit's programs took ≈ 600 maps on this project's machine), and
Linux allows a process ``vm.max_map_count`` maps (65,530 by default): past it, XLA's next
``mmap`` fails and the error it throws crashes the process (a segfault in the C++ unwinder),
which a loop of fits on subsets of different sizes reached after about a hundred models. So at
most :data:`MAX_RESIDENT` compiled programs of all :class:`Program` s together stay in memory,
the least recently used beyond that being dropped (a later call with those shapes loads it
again: the traced program from disk, the executable from JAX's persistent cache);
:func:`tracked` jits and the hooks of :func:`on_release` are emptied, with every program, by
:func:`release`, which also runs by itself when a program is compiled while the process holds
more than half of its allowed maps (counted every :data:`MAP_CHECK_EVERY` compiles).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib
import inspect
import json
import os
import sys
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Future

import jax

try:
    _typeof = jax.typeof
except AttributeError:  # jax < 0.4.36
    from jax.core import get_aval as _typeof

SUBDIR = "jaxmixed-programs"
SUFFIX = ".jaxexport"
#: the first bytes of every file this module writes; anything else is not read
MAGIC = b"JAXMIXED-PROGRAM\n"
#: format of what follows MAGIC: ``b"<FORMAT>\n"``, one line of JSON, then the serialised program
FORMAT = 1
_HEADER = MAGIC + b"%d\n" % FORMAT
_source_hash: str | None = None
#: programs loaded from disk / traced and written / run by plain jax.jit / dropped from memory
#: (beyond MAX_RESIDENT) in this process (tests and benchmarks read it)
STATS = {"loaded": 0, "exported": 0, "fallback": 0, "dropped": 0, "executables_loaded": 0,
         "executables_written": 0}
_pool_lock = threading.Lock()
_types_lock = threading.Lock()
_registered: set = set()  # NamedTuple types registered for jax.export's serialisation here
#: array arguments with at most this many numbers in all get :data:`FAST_OPTIONS` (CPU only)
FAST_COMPILE_MAX = 20_000
#: XLA:CPU options for programs whose compile time dwarfs their run time
FAST_OPTIONS = (("xla_backend_optimization_level", 0), ("xla_cpu_use_fusion_emitters", False))
#: XLA:CPU options for the other programs: the classic loop emitters instead of the fusion
#: emitters, at the default optimisation level (compile 25–50 % faster and half the compiler's
#: peak memory, run time unchanged: module docstring)
LARGE_OPTIONS = (("xla_cpu_use_fusion_emitters", False),)
#: compiled programs of all :class:`Program` s kept in memory; the least recently used beyond
#: this are dropped (module docstring, "Programs in memory")
MAX_RESIDENT = 32
_resident: OrderedDict = OrderedDict()  # (id(program), key) -> program, least recently used first
_resident_lock = threading.Lock()
_tracked: weakref.WeakSet = weakref.WeakSet()  # plain jax.jit functions emptied by release()
_release_hooks: list = []


def compiler_options(leaves) -> tuple:
    """The XLA options (sorted pairs; empty: XLA's defaults) for a program called with these
    array leaves (arrays or ``jax.ShapeDtypeStruct``): on the CPU backend :data:`FAST_OPTIONS`
    when they hold at most :data:`FAST_COMPILE_MAX` numbers, else :data:`LARGE_OPTIONS`."""
    from jaxmixed import settings

    if not settings.current().fast_compile or jax.default_backend() != "cpu":
        return ()
    size = 0
    for x in leaves:
        shape = getattr(x, "shape", None)
        if isinstance(shape, tuple):  # arrays; not static arguments that happen to have a .shape
            n = 1
            for d in shape:
                n *= int(d)
            size += n
    return FAST_OPTIONS if size <= FAST_COMPILE_MAX else LARGE_OPTIONS


def jit(fun, options: tuple = (), **kwargs):
    """``jax.jit(fun, **kwargs)`` compiled with the XLA ``options`` (pairs; empty: defaults)."""
    return jax.jit(fun, compiler_options=dict(options) if options else None, **kwargs)


def cache_dir() -> str | None:
    """Where programs are kept, or None when the persistent compilation cache is off."""
    from jaxmixed.runtime import compilation_cache_dir

    base = compilation_cache_dir()
    return os.path.join(base, SUBDIR) if base else None


def _package_files() -> tuple[str, list[str]]:
    """(the jaxmixed package's directory, every ``.py`` file under it, sorted)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # jaxmixed/, above runtime/
    return root, sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))


def _package_hash() -> str:
    global _source_hash
    if _source_hash is None:
        h = hashlib.sha256()
        root, paths = _package_files()
        for path in paths:
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as fh:
                h.update(fh.read())
        _source_hash = h.hexdigest()
    return _source_hash


def _environment() -> tuple:
    import jaxlib

    backend = jax.devices()[0].client
    return (jax.__version__, jaxlib.__version__, backend.platform, backend.platform_version,
            bool(jax.config.jax_enable_x64), os.environ.get("XLA_FLAGS", ""),
            str(jax.config.jax_default_matmul_precision), _package_hash())


def _on_default_device(leaves) -> bool:
    default = jax.devices()[0]
    for x in leaves:
        if isinstance(x, jax.Array):
            try:
                if x.devices() != {default}:
                    return False
            except Exception:  # noqa: BLE001 - a tracer or an array without devices: no caching
                return False
    return True


def _aval(x):
    a = x if isinstance(x, jax.ShapeDtypeStruct) else _typeof(x)
    return (tuple(a.shape), str(a.dtype), bool(getattr(a, "weak_type", False)))


def cached(fun=None, *, static_argnames=(), keep: bool = True):
    """``jax.jit(fun, static_argnames=static_argnames)`` whose traced programs are also kept on
    disk (see the module docstring; ``keep=False``: never on disk, only the compile options).
    Usable as ``@cached(static_argnames=(...))``; the result is a :class:`Program`."""
    if fun is None:
        return functools.partial(cached, static_argnames=static_argnames, keep=keep)
    return Program(fun, tuple(static_argnames), keep)


class Program:
    """A function compiled like ``jax.jit``, its traced programs kept on disk (module docstring).

    ``program(*args)`` runs it; ``program.prefetch(*args)`` (arrays, or ``jax.ShapeDtypeStruct``
    for arrays not computed yet) loads a program kept on disk and compiles it in a background
    thread, so that a later call with arguments of those shapes finds it ready: XLA's loading of
    an executable (≈ 0.1 s for a Hessian program) then overlaps with other work.
    ``program.jitted`` is the plain ``jax.jit`` function."""

    def __init__(self, fun, static_argnames: tuple, keep: bool = True):
        functools.update_wrapper(self, fun)
        self.static_argnames = static_argnames
        self.keep = keep
        self.jitted = jax.jit(fun, static_argnames=static_argnames)
        self._jits = {(): self.jitted}  # compiler options -> jax.jit with them
        self._sig = inspect.signature(fun)
        self._dynamic = [n for n in self._sig.parameters if n not in static_argnames]
        self._name = f"{getattr(fun, '__module__', '?')}.{getattr(fun, '__qualname__', repr(fun))}"
        self._programs: dict = {}  # key -> callable, or a Future while a prefetch is under way
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        split = self._split(args, kwargs)
        if split is None:
            return self._jit(compiler_options(jax.tree_util.tree_leaves((args, kwargs))))(*args, **kwargs)
        key, statics, dyn = split
        with self._lock:
            entry = self._programs.get(key)
        if isinstance(entry, Future):
            entry = entry.result()
        if entry is None:
            _relieve_map_pressure()
            opts = compiler_options(jax.tree_util.tree_leaves(dyn))
            # a jax.jit of its own for a program not kept on disk, so that dropping the entry
            # frees its executable
            entry = self._make(statics, dyn, key, opts) or jit(self._by_position(statics), opts)
            with self._lock:
                self._programs[key] = entry
        _remember(self, key)
        return entry(*dyn)

    def prefetch(self, *args, trace: bool = False, here: bool = False, **kwargs) -> None:
        """Start loading and compiling, in the background, the program kept on disk for
        arguments like these; nothing when there is none (it is traced at the call instead),
        unless ``trace``: then a program not on disk yet is traced, kept and compiled in the
        background too (XLA's compile releases the GIL, so on a machine with two cores it
        overlaps the caller's own tracing and compiling). A program made with ``keep=False``
        is traced and compiled in the background with ``trace`` and kept in memory only.
        ``here``: the same work on the calling thread, returning once the program is ready
        (nothing when it is ready or under way already): a program the caller needs only
        after another one, which compiles meanwhile on the background thread."""
        split = self._split(args, kwargs)
        if split is None:
            return
        key, statics, dyn = split
        path = self._path(statics, key)
        in_memory = not self.keep and trace  # never on disk: compiled in the background only
        if not in_memory and (path is None or (not trace and not os.path.exists(path))):
            return
        with self._lock:
            if key in self._programs:
                return
            future = Future()
            self._programs[key] = future
        _remember(self, key)

        def work():
            where = key[3]  # the caller's default device: this thread compiles for it too
            try:
                with contextlib.nullcontext() if where is None else jax.default_device(where):
                    _relieve_map_pressure()
                    opts = compiler_options(jax.tree_util.tree_leaves(dyn))
                    if in_memory:
                        future.set_result(jit(self._by_position(statics), opts).lower(*dyn).compile())
                        return
                    exported = _exported(path, key) if os.path.exists(path) else None
                    epath = _executable_path(path, opts)
                    ready = _load_executable(epath, exported, key) if exported is not None else None
                    if ready is not None:
                        future.set_result(ready)
                        _release_freed_memory()  # after the caller has what it waits for
                        return
                    prog = jit(exported.call, opts) if exported is not None else None
                    if prog is None and trace:
                        prog = _export(self._by_position(statics), dyn, path, opts)
                    future.set_result(None if prog is None else _compile_keeping(prog, dyn, epath))
            except BaseException:  # noqa: BLE001 - the call then loads or traces it itself
                if not future.done():
                    future.set_result(None)

        if here:
            work()
            return
        # a program on disk is only loaded (XLA deserialises its executable, releasing the GIL):
        # two such loads at once; traces and compiles one at a time on the compile thread
        (_loader() if not in_memory and os.path.exists(path) else _executor()).submit(work)

    # -- internals ---------------------------------------------------------------------------

    def _split(self, args, kwargs):
        """(key, statics, dynamic arguments), or None where plain ``jax.jit`` should run it."""
        if jax.config.jax_disable_jit:
            return None
        try:
            bound = self._sig.bind(*args, **kwargs)
        except TypeError:
            return None  # let jax.jit report the mistake
        bound.apply_defaults()
        arguments = bound.arguments
        if len(arguments) != len(self._sig.parameters):
            return None  # *args / **kwargs signatures: not handled here
        try:
            statics = tuple((n, arguments[n]) for n in self.static_argnames)
            hash(statics)
        except TypeError:
            return None
        dyn = tuple(arguments[n] for n in self._dynamic)
        leaves, treedef = jax.tree_util.tree_flatten(dyn)
        if not _on_default_device(leaves):
            return None
        # the default device (jax.default_device) is part of the in-memory key, as for jax.jit
        where = jax.config.jax_default_device
        return (statics, treedef, tuple(_aval(x) for x in leaves), where), statics, dyn

    def _path(self, statics, key) -> str | None:
        directory = cache_dir() if self.keep else None
        if directory is None:
            return None
        text = repr((self._name, statics, str(key[1]), key[2], _environment()))
        if " at 0x" in text or "..." in text:  # no stable repr: not kept on disk
            return None
        return os.path.join(directory, hashlib.sha256(text.encode()).hexdigest() + SUFFIX)

    def _jit(self, options: tuple):
        """The plain ``jax.jit`` of the function with these compiler options."""
        with self._lock:
            if options not in self._jits:
                self._jits[options] = jit(self.__wrapped__, options, static_argnames=self.static_argnames)
            return self._jits[options]

    def _by_position(self, statics):
        """The function of the dynamic arguments alone, the statics bound, to be traced inside
        an outer ``jax.jit`` that carries the compile options (a nested jit may not)."""
        statics_kw = dict(statics)
        names, jitted = self._dynamic, self.jitted

        def by_position(*a):  # the dynamic arguments in signature order, the statics bound
            return jitted(**dict(zip(names, a)), **statics_kw)

        return by_position

    def _drop(self, key) -> bool:
        """Forget the compiled program for ``key`` (its executable is freed with the last
        reference); False, keeping it, while a prefetch of it is still under way."""
        with self._lock:
            entry = self._programs.get(key)
            if isinstance(entry, Future) and not entry.done():
                return False
            self._programs.pop(key, None)
            return True

    def _make(self, statics, dyn, key, options: tuple = ()):
        """The program for a call like ``dyn`` (``key``): the executable kept on disk, else the
        traced program kept on disk (loaded or traced and written) compiled by XLA (its
        executable then kept too); None where it cannot be kept (plain ``jax.jit`` then)."""
        path = self._path(statics, key)
        if path is None:
            STATS["fallback"] += self.keep
            return None
        exported = _exported(path, key)
        epath = _executable_path(path, options)
        ready = _load_executable(epath, exported, key) if exported is not None else None
        if ready is not None:
            _release_freed_memory()
            return ready
        prog = jit(exported.call, options) if exported is not None else \
            _export(self._by_position(statics), dyn, path, options)
        if prog is None:
            STATS["fallback"] += 1
            return None
        if epath is None:
            return prog
        return _compile_keeping(prog, dyn, epath)


def _remember(program: Program, key) -> None:
    """Mark ``program``'s entry ``key`` most recently used; drop the least recently used
    entries beyond :data:`MAX_RESIDENT` (a prefetch still under way is never dropped)."""
    with _resident_lock:
        _resident[(id(program), key)] = program
        _resident.move_to_end((id(program), key))
        for _ in range(len(_resident)):
            if len(_resident) <= MAX_RESIDENT:
                break
            (_, old_key), old = _resident.popitem(last=False)
            if old._drop(old_key):
                STATS["dropped"] += 1
            else:
                _resident[(id(old), old_key)] = old


def tracked(fun):
    """Register a ``jax.jit`` function of the package so that :func:`release` empties its
    compiled programs (they are compiled again at the next call); returns it."""
    _tracked.add(fun)
    return fun


def on_release(hook):
    """Have :func:`release` call ``hook()`` (e.g. an ``lru_cache``'s ``cache_clear`` of
    compiled programs); returns it."""
    _release_hooks.append(hook)
    return hook


def release() -> None:
    """Drop every compiled program jaxmixed holds in memory (the :class:`Program` s' entries,
    :func:`tracked` jits, the :func:`on_release` hooks), freeing their executables and memory
    maps; programs are loaded or compiled again when next called. JAX's own caches, and the
    programs of other code, are left alone. Prefetches under way finish normally."""
    with _resident_lock:
        held = list(_resident.items())
        _resident.clear()
        for (_, key), program in held:
            if not program._drop(key):
                _resident[(id(program), key)] = program
    for fun in list(_tracked):
        try:
            fun.clear_cache()
        except Exception:  # noqa: BLE001 - a jax without clear_cache: nothing to free
            pass
    for hook in list(_release_hooks):
        hook()


def _map_limit() -> int | None:
    try:
        with open("/proc/sys/vm/max_map_count") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return None  # not Linux: no such limit to watch


_MAP_LIMIT = _map_limit()


def memory_maps() -> int | None:
    """The number of memory maps this process holds (Linux; None elsewhere)."""
    try:
        with open("/proc/self/maps", "rb") as fh:
            return fh.read().count(b"\n")
    except OSError:
        return None


#: programs compiled (or loaded) between two counts of the process's memory maps (reading
#: /proc/self/maps costs ≈ 1 ms per thousand maps; a program adds ≈ 200)
MAP_CHECK_EVERY = 8
_misses = 0


def _relieve_map_pressure() -> None:
    """Before a compile, every :data:`MAP_CHECK_EVERY` th: :func:`release` when the process
    holds more than half of the memory maps Linux allows it (module docstring, "Programs in
    memory")."""
    global _misses
    if _MAP_LIMIT is None:
        return
    _misses += 1
    if _misses % MAP_CHECK_EVERY:
        return
    n = memory_maps()
    if n is not None and n > _MAP_LIMIT // 2:
        release()


#: background threads that load prefetched programs kept on disk (module docstring, "Prefetch")
LOAD_WORKERS = 2
_pools: dict = {}  # name -> (ThreadPoolExecutor, pid of the process that made it)


def _pool(name: str, workers: int):
    """The background pool ``name`` (a new one in a forked child, whose copy of the parent's
    pool has no thread)."""
    with _pool_lock:
        pool, pid = _pools.get(name, (None, None))
        if pool is None or pid != os.getpid():
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"jaxmixed-{name}")
            _pools[name] = (pool, os.getpid())
        return pool


def _executor():
    """The one background thread for prefetches that trace or compile, and for
    :func:`in_background`."""
    return _pool("programs", 1)


def _loader():
    """The :data:`LOAD_WORKERS` background threads for prefetches of programs kept on disk."""
    return _pool("loads", LOAD_WORKERS)


def in_background(fn, *args) -> Future:
    """Run ``fn(*args)`` on the compile thread, after the traces and compiles queued before it
    (loads of programs kept on disk run on their own threads and may finish later)."""
    return _executor().submit(fn, *args)


def _is_namedtuple(t) -> bool:
    return isinstance(t, type) and issubclass(t, tuple) and hasattr(t, "_fields")


def _namedtuples(treedef, out: dict) -> dict:
    """The NamedTuple types among the nodes of ``treedef``, in order of first appearance."""
    data = treedef.node_data()
    if data is not None and _is_namedtuple(data[0]):
        out.setdefault(data[0], None)
    for child in treedef.children():
        _namedtuples(child, out)
    return out


def _register(t) -> None:
    """Make ``jax.export`` able to (de)serialise pytree nodes of the NamedTuple type ``t``."""
    from jax import export

    with _types_lock:
        if t in _registered:
            return
        try:
            export.register_namedtuple_serialization(
                t, serialized_name=f"jaxmixed-program:{t.__module__}:{t.__qualname__}")
        except ValueError:
            pass  # registered already (by its own module or the user): their registration holds
        _registered.add(t)


def _resolve(module: str, qualname: str):
    """The NamedTuple type ``module.qualname`` named in a file's header, or None. Only modules
    already imported or of the jaxmixed package are looked at (a header names data types, it
    never makes arbitrary code be imported)."""
    mod = sys.modules.get(module)
    if mod is None:
        if module != "jaxmixed" and not module.startswith("jaxmixed."):
            return None
        mod = importlib.import_module(module)
    obj = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj if _is_namedtuple(obj) else None


def _encode(exported) -> bytes:
    """Header and ``exported.serialize()``; raises where the program cannot be serialised."""
    types = _namedtuples(exported.out_tree, _namedtuples(exported.in_tree, {}))
    names = []
    for t in types:
        if "<locals>" in t.__qualname__:
            raise ValueError(f"{t!r} is not importable: its programs are not kept on disk")
        _register(t)
        names.append([t.__module__, t.__qualname__])
    meta = json.dumps({"types": names}, separators=(",", ":")).encode()
    # vjp_order=0: these programs are never differentiated, no reverse-mode program is kept
    return _HEADER + meta + b"\n" + bytes(exported.serialize(vjp_order=0))


def _decode(blob: bytes, key=None):
    """The ``Exported`` in a file's bytes, or None for anything but a file written by
    :func:`_encode` for a call like ``key`` (see :meth:`Program._split`). Never raises."""
    from jax import export

    try:
        if not blob.startswith(_HEADER):
            return None  # a foreign file, an older format, a damaged one
        end = blob.index(b"\n", len(_HEADER))
        meta = json.loads(blob[len(_HEADER):end].decode())
        for module, qualname in meta["types"]:
            t = _resolve(str(module), str(qualname))
            if t is None:
                return None
            _register(t)
        exported = export.deserialize(bytearray(blob[end + 1:]))
        if key is not None:
            treedef, avals = key[1], key[2]
            if exported.in_tree != jax.tree_util.treedef_tuple((treedef, jax.tree_util.tree_structure({}))):
                return None  # the calling convention is ((dynamic arguments), {})
            if [(tuple(a.shape), str(a.dtype)) for a in exported.in_avals] != [a[:2] for a in avals]:
                return None
            if export.default_export_platform() not in exported.platforms or exported.nr_devices != 1:
                return None
        return exported
    except Exception:  # noqa: BLE001 - a damaged or foreign file: a miss, traced again
        return None


def _exported(path: str, key=None):
    """The ``Exported`` kept in ``path``, or None when there is none or it is unreadable,
    foreign or for other arguments than ``key``'s (counted in ``STATS["loaded"]``)."""
    try:
        with open(path, "rb") as fh:
            blob = fh.read()
    except Exception:  # noqa: BLE001 - missing or unreadable: trace again and overwrite it
        return None
    exported = _decode(blob, key)
    if exported is not None:
        STATS["loaded"] += 1
    return exported


def _load(path: str, key=None, options: tuple = ()):
    """The program kept in ``path`` (``jax.jit`` of the deserialised ``Exported``, compiled with
    the XLA ``options``), or None when there is none or it is unreadable, foreign or for other
    arguments than ``key``'s."""
    exported = _exported(path, key)
    return None if exported is None else jit(exported.call, options)


def _private_dirs(directory: str) -> None:
    """Create ``directory`` and its missing parents owner-only (0o700); existing ones are left
    as they are (never chmod-ed)."""
    missing = []
    d = os.path.abspath(directory)
    while not os.path.isdir(d):
        missing.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass


def _export(fun, dyn, path: str, options: tuple = ()):
    from jax import export

    try:
        exported = export.export(jax.jit(fun))(*dyn)
        blob = _encode(exported)
    except Exception:  # noqa: BLE001 - jax.export refuses some programs: plain jax.jit for these
        return None
    _write_private(path, blob)
    STATS["exported"] += 1
    return jit(exported.call, options)


def _write_private(path: str, blob: bytes) -> None:
    """Write ``blob`` to ``path`` atomically (a temporary file renamed), mode 0o600, in
    owner-only directories; nothing when the cache is not writable."""
    try:
        directory = os.path.dirname(path)
        _private_dirs(directory)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")  # mode 0o600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError:
        pass  # an unwritable cache: the program still runs


# -- executables kept on disk (module docstring, "Executables") ---------------------------------

EXEC_SUFFIX = ".xlaexec"
#: the first bytes of every executable file this module writes; then the payload's sha256 (hex)
EXEC_MAGIC = b"JAXMIXED-EXECUTABLE\n"
_host_id: str | None = None
_lapack_lock = threading.Lock()
_lapack_state: list = []  # [Future] once the background initialisation was started


def _host() -> str:
    """The host's CPU (model and feature flags, Linux's /proc/cpuinfo) and machine type: an
    executable compiled for one CPU is never loaded on another."""
    global _host_id
    if _host_id is None:
        import platform

        text = ""
        try:
            with open("/proc/cpuinfo") as fh:
                lines = fh.read().splitlines()
            text = "\n".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in
                                     ("model name", "flags", "Features", "CPU implementer", "CPU part")}))
        except OSError:
            text = platform.processor()
        _host_id = hashlib.sha256((platform.machine() + "\n" + text).encode()).hexdigest()
    return _host_id


def _lapack_initializer():
    """jaxlib's LAPACK set-up (it imports SciPy's LAPACK), or None where this JAX has no such
    hook (executables are then not kept)."""
    try:
        from jax._src.lax import linalg
    except Exception:  # noqa: BLE001 - another JAX layout
        return None
    return getattr(linalg, "initialize_lapack", None)


def _executables_on() -> bool:
    from jaxmixed import settings

    if not settings.current().keep_executables or jax.default_backend() != "cpu":
        return False
    if jax.process_count() > 1:
        # a jax.distributed run: the executable of a program with collectives is bound to this
        # run's processes; one loaded from disk leaves the others waiting at the first barrier
        return False
    try:
        from jax.experimental import serialize_executable  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return _lapack_initializer() is not None


def _executable_path(path: str | None, options: tuple) -> str | None:
    """Where the executable of the program kept in ``path``, compiled with ``options`` on this
    host, is kept; None when executables are not kept."""
    if path is None or not _executables_on() or not _default_is_first():
        return None
    text = repr((os.path.basename(path), tuple(options), _host()))
    return os.path.join(os.path.dirname(path), hashlib.sha256(text.encode()).hexdigest() + EXEC_SUFFIX)


def _default_is_first() -> bool:
    """Whether programs run on ``jax.devices()[0]``, the device a kept executable is compiled
    and loaded for: not under ``jax.default_device(another)`` (``jax_default_device``)."""
    chosen = jax.config.jax_default_device
    if chosen is None:
        return True
    try:
        first = jax.devices(chosen)[0] if isinstance(chosen, str) else chosen
    except Exception:  # noqa: BLE001 - an unknown platform name: let jax.jit report it
        return False
    return first == jax.devices()[0]


def _start_lapack() -> Future:
    """Start jaxlib's LAPACK set-up on a thread of its own (once per process); its future."""
    with _lapack_lock:
        if not _lapack_state or _lapack_state[1] != os.getpid():
            future: Future = Future()

            def work():
                try:
                    _lapack_initializer()()
                    future.set_result(True)
                except BaseException as e:  # noqa: BLE001 - the call retries and raises it
                    future.set_exception(e)

            threading.Thread(target=work, name="jaxmixed-lapack", daemon=True).start()
            _lapack_state[:] = [future, os.getpid()]
        return _lapack_state[0]


class _Ready:
    """A deserialised executable, run once jaxlib's LAPACK set-up (which lowering a program
    does, and a deserialised executable skips) has finished: its LAPACK calls need it."""

    __slots__ = ("compiled", "ready")

    def __init__(self, compiled, ready: Future):
        self.compiled, self.ready = compiled, ready

    def __call__(self, *args):
        if self.ready is not None:
            try:
                self.ready.result()
            except BaseException:  # noqa: BLE001 - the background set-up failed: here, raising
                _lapack_initializer()()
            self.ready = None
        return self.compiled(*args)


_compiles = threading.local()  # .hit: JAX's persistent cache supplied this thread's last compile
_listening: list = []


def _on_event(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _compiles.hit = True


#: beside a program whose executable XLA could not serialise here: compiled as usual after that
NO_EXEC_SUFFIX = ".noexec"


def _without_jax_cache():
    """A context (this thread only) in which JAX's persistent cache is neither read nor written,
    or None where this JAX has no such switch."""
    try:
        from jax._src import config as jax_config

        return jax_config.enable_compilation_cache(False)
    except Exception:  # noqa: BLE001 - another JAX layout
        return None


def _compile_keeping(prog, dyn, epath: str | None):
    """``prog`` compiled for arguments like ``dyn``, its executable kept in ``epath``. XLA
    compiles it here, past JAX's persistent cache: an executable that cache supplies cannot be
    serialised again (XLA:CPU executables serialised after such a load miss functions when
    run), and without the bypass a program JAX's cache holds (filled on another host sharing
    the folder, or with executables off) would never get one. Only once per host: later
    processes load the kept executable. Where XLA cannot serialise it, a marker says so and
    later processes compile as usual (JAX's cache serving them)."""
    if epath is None or os.path.exists(epath + NO_EXEC_SUFFIX):
        return prog.lower(*dyn).compile()
    with _lapack_lock:
        if not _listening:
            jax.monitoring.register_event_listener(_on_event)
            _listening.append(True)
    lowered = prog.lower(*dyn)
    bypass = _without_jax_cache()
    _compiles.hit = False
    if bypass is None:
        compiled = lowered.compile()
    else:
        with bypass:
            compiled = lowered.compile()
    if not _compiles.hit:
        _save_executable(epath, compiled)
    return compiled


def _save_executable(epath: str, compiled) -> None:
    """Keep ``compiled``'s executable in ``epath`` (a marker where XLA cannot serialise it)."""
    from jax.experimental import serialize_executable

    try:
        payload = serialize_executable.serialize(compiled)[0]
    except Exception:  # noqa: BLE001 - not serialisable: compiled in each process, JAX's cache serving
        _write_private(epath + NO_EXEC_SUFFIX, b"")
        return
    _write_private(epath, EXEC_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    STATS["executables_written"] += 1


def _release_freed_memory() -> None:
    """Hand the memory that the process's heaps hold free back to the system (glibc's
    ``malloc_trim``, which walks every arena; nothing elsewhere). XLA's rebuilding of a loaded
    executable (its HLO module, buffer assignment and thunks from their protos) allocates and
    frees several times the file's size; the allocator (a loader thread's arena) would keep it,
    raising the process's peak memory by that much (AR(1), 100,000 rows: 479 → 415 MB). Not a
    setting: the allocator's behaviour is left as it was, only free memory is returned. In a
    process whose heap has grown large the call itself gets slow (0.4 s seen in the test suite's
    process) while the transient matters little: after a call slower than
    :data:`TRIM_MAX_SECONDS` it is not made again."""
    trim = _malloc_trim()
    if trim is None or _trim_off.is_set():
        return
    t0 = time.perf_counter()
    trim(0)
    if time.perf_counter() - t0 > TRIM_MAX_SECONDS:
        _trim_off.set()


#: a malloc_trim slower than this (seconds) turns :func:`_release_freed_memory` off for the process
TRIM_MAX_SECONDS = 0.05
_trim_off = threading.Event()  # set: trimming turned off (set from loader threads too)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` through ctypes, or None where the C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _load_executable(epath: str | None, exported, key):
    """The executable kept in ``epath`` for the program ``exported`` called like ``key``, ready
    to run (:class:`_Ready`), or None when there is none or it is damaged (checksum) or XLA
    refuses it."""
    if epath is None or exported is None or os.path.exists(epath + NO_EXEC_SUFFIX):
        return None
    try:
        with open(epath, "rb") as fh:
            blob = fh.read()
    except OSError:
        return None
    head = len(EXEC_MAGIC) + 64
    if not blob.startswith(EXEC_MAGIC) or blob[head:head + 1] != b"\n":
        return None
    payload = memoryview(blob)[head + 1:]
    if hashlib.sha256(payload).hexdigest().encode() != blob[len(EXEC_MAGIC):head]:
        return None  # damaged: compiled again and the file overwritten
    ready = _start_lapack()  # overlaps XLA's loading, which releases the GIL
    try:
        in_tree = jax.tree_util.treedef_tuple((key[1], jax.tree_util.tree_structure({})))
        compiled = _deserialize(payload, in_tree, exported.out_tree)
    except Exception:  # noqa: BLE001 - refused (a name outside the allowed ones) or XLA refused it
        # not again past JAX's cache for every process: compiled as usual from now on
        _write_private(epath + NO_EXEC_SUFFIX, b"")
        return None
    STATS["executables_loaded"] += 1
    return _Ready(compiled, ready)


#: builtins an executable's description may name (containers; nothing that runs code)
_SAFE_BUILTINS = frozenset({"set", "frozenset", "slice", "complex", "range", "tuple", "list", "dict"})


def _allowed(module: str, name: str):
    """The object ``module.name`` if an executable's description may name it, else None: a
    class of JAX, jaxlib or NumPy (or a container of :data:`_SAFE_BUILTINS`), or one of JAX's
    ``_unpickle…`` reconstructors; no other function, and nothing of any other module."""
    if module == "builtins":
        import builtins

        return getattr(builtins, name) if name in _SAFE_BUILTINS else None
    top = module.split(".")[0]
    if top not in ("jax", "jaxlib", "numpy") or module not in sys.modules or "." in name:
        return None  # only modules already imported: a name never makes a module be imported
    obj = getattr(sys.modules[module], name, None)
    if isinstance(obj, type) or (callable(obj) and top == "jax" and name.startswith("_unpickle")):
        return obj
    return None


def _deserialize(payload, in_tree, out_tree):
    """``jax.experimental.serialize_executable.deserialize_and_load`` with a restricted
    reader: the description of the executable (JAX's pickle of it) may only name what
    :func:`_allowed` allows, so that a planted file cannot make the reader run a function."""
    import io

    from jax.experimental import serialize_executable as se

    class Reader(se._JaxPjrtUnpickler):
        def find_class(self, module, name):
            obj = _allowed(module, name)
            if obj is None:
                raise ValueError(f"an executable file names {module}.{name}: not read")
            return obj

    # the executables kept are those of programs whose arguments all sit on the default device
    # (Program._split): loaded for that device alone, not for every device of the process
    # (with several devices, e.g. --xla_force_host_platform_device_count, it would then expect
    # one shard of each argument per device)
    device = jax.devices()[0]
    unloaded, args_info_flat, no_kwargs = Reader(io.BytesIO(payload), device.client, [device]).load()
    args_info = in_tree.unflatten(args_info_flat)
    return jax.stages.Compiled(unloaded.load(), [], args_info, out_tree, no_kwargs=no_kwargs)
