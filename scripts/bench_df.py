#!/usr/bin/env python
"""Small-sample df benchmarks: jaxmixed's Kenward-Roger and Satterthwaite against pbkrtest and
lmerTest (Rscript), same machine, one run.

    python scripts/bench_df.py                          # every case
    python scripts/bench_df.py --case crossed3k         # crossed3k, nested20k, million, insteval
    python scripts/bench_df.py --json out.json
    python scripts/bench_df.py --case crossed3k --no-r-extra   # vcovAdj only (no KRmodcomp, no
                                                               # lmerTest KR summary: each ≈ vcovAdj)

Cases:
  crossed3k  3,000 rows, 100 subjects s × 30 items i fully crossed (seed 1), REML
             y ~ x + (1|s) + (1|i): jaxmixed's Kenward-Roger against pbkrtest::vcovAdj (on an
             already fitted lmer model; Lb_ddf for the df), KRmodcomp and lmerTest's
             summary(m, ddf = "Kenward-Roger"); df and adjusted SEs compared
  nested20k  20,000 rows, 200 groups g with 10 subgroups h each (seed 2), REML
             y ~ x + (1|g) + (1|g:h) (lme4: (1|g/h)): jm.fit(dfmethod="satterthwaite") against
             lmerTest's lmer + summary() (Satterthwaite); df and SEs compared
  million    bench.py's 1,000,000 rows: y ~ x1 + x2 + x3 + x4 + (1 + x1 | g), REML; no peer
             (pbkrtest works with n × n matrices)
  insteval   bench.py's InstEval: y ~ 1 + service + (1|s) + (1|d) + (1|dept), REML (KR needs it);
             no peer

For every case jaxmixed runs in fresh subprocesses: "cold" (empty compilation cache), "warm
cache" (a fresh process, the cache filled by the cold one) and "again" (the same call a second
time in that process). The "parts" processes time the plain fit, then
``smallsample.kenward_roger`` and ``smallsample.satterthwaite`` alone (each twice), and one
η-Hessian (``r.engine.hessian_eta``, the program behind a plain fit's standard errors) for scale;
peak memory is sampled (RSS, every 2 ms) during each step, beside the process's ru_maxrss. The
"whole" processes time ``jm.fit(..., dfmethod=...)`` as the first fit of the process. A "phases"
process splits the first KR and Satterthwaite calls into trace+lower, XLA compile and run
(``jax.jit(...).lower(...).compile()`` of the engine's programs, no disk cache). R peers run by
Rscript and are skipped when Rscript or lme4/lmerTest/pbkrtest/jsonlite is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (data_path, load for million / insteval)

DATA = bench.DATA

CASES = {
    "crossed3k": dict(formula="y ~ x + (1|s) + (1|i)", r_formula="y ~ x + (1|s) + (1|i)", factors=["s", "i"],
                      whole="kroger", parts=("kroger", "satterthwaite"), peer="kr"),
    "nested20k": dict(formula="y ~ x + (1|g) + (1|g:h)", r_formula="y ~ x + (1|g/h)", factors=["g", "h"],
                      whole="satterthwaite", parts=("satterthwaite", "kroger"), peer="sat"),
    "million": dict(formula=bench.CASES["million"]["formula"], factors=bench.CASES["million"]["factors"],
                    whole=None, parts=("kroger", "satterthwaite"), peer=None),
    "insteval": dict(formula=bench.CASES["insteval"]["formula"], factors=bench.CASES["insteval"]["factors"],
                     whole=None, parts=("kroger", "satterthwaite"), peer=None),
}
ORDER = ("crossed3k", "nested20k", "million", "insteval")


# ---------------------------------------------------------------------------------------------
# data


def simulate_crossed3k(seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    s = np.repeat(np.arange(100), 30)
    i = np.tile(np.arange(30), 100)
    x = rng.normal(size=3000)
    b, c = rng.normal(size=100), rng.normal(size=30)
    y = 1 + 0.5 * x + 0.8 * b[s] + 0.5 * c[i] + rng.normal(size=3000)
    return pd.DataFrame({"y": y, "x": x, "s": [f"s{k}" for k in s], "i": [f"i{k}" for k in i]})


def simulate_nested20k(seed: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n, groups, sub = 20_000, 200, 10
    cell = np.arange(n) % (groups * sub)  # 10 rows in each of the 2,000 (g, h) cells
    g, h = cell // sub, cell % sub  # h is numbered within g: h1..h10 in every group
    x = rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(0, 0.8, groups)[g] + rng.normal(0, 0.5, groups * sub)[cell] + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "g": [f"g{k}" for k in g], "h": [f"h{k + 1}" for k in h]})


def data_path(case: str) -> str:
    if case in ("million", "insteval"):
        return bench.data_path(case)
    os.makedirs(DATA, exist_ok=True)
    path = os.path.join(DATA, f"df_{case}.csv")
    if not os.path.exists(path):
        (simulate_crossed3k() if case == "crossed3k" else simulate_nested20k()).to_csv(path, index=False)
    return path


def load(case: str) -> pd.DataFrame:
    if case in ("million", "insteval"):
        return bench.load(case)
    d = pd.read_csv(data_path(case))
    for c in CASES[case]["factors"]:
        d[c] = d[c].astype(str)
    return d


# ---------------------------------------------------------------------------------------------
# memory


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class PeakRSS:
    """RSS before a block and its peak during it (sampled every ``every`` seconds)."""

    def __init__(self, every: float = 0.002):
        self.every = every

    def __enter__(self):
        self.before = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())
        self.after = rss_mb()


# ---------------------------------------------------------------------------------------------
# workers (a subprocess each; print one JSON line)


def _timed(fn):
    with PeakRSS() as m:
        t = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t
    return out, dict(wall=wall, rss_before_mb=m.before, rss_peak_mb=m.peak, rss_after_mb=m.after)


def _table(r_or_ss, names):
    if hasattr(r_or_ss, "fixed"):
        f = r_or_ss.fixed
        return dict(names=list(map(str, f.index)), coef=f["coef"].tolist(), se=f["se"].tolist(), df=f["df"].tolist())
    return dict(names=list(names), se=np.sqrt(np.diag(r_or_ss.vcov)).tolist(), df=np.asarray(r_or_ss.df).tolist())


def worker_parts(case: str):
    t0 = time.perf_counter()
    import jax

    import jaxmixed as jm
    from jaxmixed.inference import smallsample as ss
    from jaxmixed.runtime import programs

    out = dict(import_s=time.perf_counter() - t0)
    d = load(case)
    spec = CASES[case]
    r, out["fit"] = _timed(lambda: jm.fit(spec["formula"], d))
    out["fit"]["converged"] = bool(r.converged)
    _, out["fit_again"] = _timed(lambda: jm.fit(spec["formula"], d))
    out["engine"] = r.engine.shape.kind
    out["nobs"], out["p"], out["k"] = int(r.nobs), int(r.design.p), int(r.engine.shape.n_theta + 1)
    names = list(map(str, r.fixed.index))
    calls = {"kroger": lambda: ss.kenward_roger(r.engine, r.data, r.params, r.sigma),
             "satterthwaite": lambda: ss.satterthwaite(r.engine, r.data, r.params, r.sigma, True)}
    for method in spec["parts"]:
        try:
            res, first = _timed(calls[method])
            again = [_timed(calls[method])[1] for _ in range(3)]
            again = dict(max(again, key=lambda a: a["rss_peak_mb"]), wall=float(np.median([a["wall"] for a in again])),
                         reps=[a["wall"] for a in again])
            out[method] = dict(first=first, again=again, **_table(res, names))
        except Exception as e:  # noqa: BLE001 - recorded, the other method still runs
            import traceback

            out[method] = dict(status="failed: " + repr(e), traceback=traceback.format_exc())
    eta = np.asarray(r.engine.eta(r.params, r.sigma), dtype=float)
    eta = np.where(np.isfinite(eta), eta, -20.0)
    hess = lambda: jax.block_until_ready(r.engine.hessian_eta(eta, r.data, True))  # noqa: E731
    _, h1 = _timed(hess)
    reps = [_timed(hess)[1]["wall"] for _ in range(3)]
    out["hessian_eta"] = dict(first=h1, again=dict(wall=float(np.median(reps)), reps=reps))
    out["programs"] = dict(programs.STATS)  # loaded from disk / traced and written: a warm process loads
    out["loadavg"] = os.getloadavg()[0]
    out["maxrss_mb"] = maxrss_mb()
    print(json.dumps(out))


def worker_whole(case: str, again: bool):
    t0 = time.perf_counter()
    import jaxmixed as jm

    out = dict(import_s=time.perf_counter() - t0)
    t = time.perf_counter()
    d = load(case)
    out["read_s"] = time.perf_counter() - t
    spec = CASES[case]
    r, out["fit"] = _timed(lambda: jm.fit(spec["formula"], d, dfmethod=spec["whole"]))
    out.update(method=spec["whole"], converged=bool(r.converged), **_table(r, None))
    if again:
        _, out["again"] = _timed(lambda: jm.fit(spec["formula"], d, dfmethod=spec["whole"]))
    out["maxrss_mb"] = maxrss_mb()
    print(json.dumps(out))


def worker_phases(case: str):
    """trace+lower / compile / run of the first KR and Satterthwaite programs (plain jax.jit,
    no disk cache; the process's compilation cache is empty)."""
    import jax
    import jax.numpy as jnp

    import jaxmixed as jm
    from jaxmixed.engine import pls

    d = load(case)
    r = jm.fit(CASES[case]["formula"], d)
    shape, data = r.engine.shape, r.data
    x = jnp.concatenate([jnp.asarray(r.params, dtype=float), jnp.asarray([r.sigma], dtype=float)])
    eta = np.asarray(r.engine.eta(r.params, r.sigma), dtype=float)
    eta = jnp.asarray(np.where(np.isfinite(eta), eta, -20.0))
    th, sg = jnp.asarray(r.params, dtype=float), jnp.asarray(r.sigma, dtype=float)
    progs = {"kroger": (pls.kenward_roger_parts.jitted, (th, sg, data, shape)),
             "satterthwaite": (pls.satterthwaite_parts.jitted, (x, data, shape, True)),
             "hessian_eta": (pls.hessian_eta, (eta, data, shape, True))}
    out = {}
    for name, (f, args) in progs.items():
        t = time.perf_counter()
        low = f.lower(*args)
        t_lower = time.perf_counter() - t
        t = time.perf_counter()
        comp = low.compile()
        t_compile = time.perf_counter() - t
        dyn = [a for a in args if a is not shape]  # the compiled program takes the dynamic arguments
        t = time.perf_counter()
        jax.block_until_ready(comp(*dyn))
        t_run = time.perf_counter() - t
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            jax.block_until_ready(comp(*dyn))
            runs.append(time.perf_counter() - t)
        out[name] = dict(trace_lower=t_lower, compile=t_compile, first_run=t_run, run=float(np.median(runs)),
                         hlo_chars=len(low.as_text()))
    print(json.dumps(out))


def worker_profile(case: str, method: str, show: bool):
    """cProfile of one df call (the first of the process: with a filled cache, the warm-cache
    call); ``show``: print the top of the profile (else only fill the cache)."""
    import cProfile
    import io
    import pstats

    import jaxmixed as jm
    from jaxmixed.inference import smallsample as ss

    d = load(case)
    r = jm.fit(CASES[case]["formula"], d)
    call = (lambda: ss.kenward_roger(r.engine, r.data, r.params, r.sigma)) if method == "kroger" else \
        (lambda: ss.satterthwaite(r.engine, r.data, r.params, r.sigma, True))
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.runcall(call)
    wall = time.perf_counter() - t
    if show:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
        print(f"{method} call (first in this process): {wall:.3f} s under cProfile")
        print("\n".join(buf.getvalue().splitlines()[:60]))
    print(json.dumps(dict(wall=wall)))


# ---------------------------------------------------------------------------------------------
# R peers

R_KR = r"""
suppressMessages({library(lme4); library(lmerTest); library(pbkrtest); library(jsonlite)})
a <- commandArgs(trailingOnly = TRUE)
d <- read.csv(a[1]); for (f in strsplit(a[3], ",")[[1]]) d[[f]] <- factor(d[[f]])
extra <- a[4] == "1"
peak <- function() { s <- readLines("/proc/self/status"); as.numeric(strsplit(trimws(sub("VmHWM:", "", s[grep("^VmHWM", s)])), " +")[[1]][1]) / 1024 }
el <- function(e) system.time(e)[["elapsed"]]
out <- list()
out$lmer <- el(m <- lme4::lmer(as.formula(a[2]), d, REML = TRUE))
out$vcovAdj <- el(V <- vcovAdj(m))
V0 <- as.matrix(vcov(m)); Va <- as.matrix(V); p <- ncol(V0)
out$Lb_ddf <- el(ddf <- sapply(1:p, function(j) Lb_ddf(diag(p)[j, , drop = FALSE], V0, V)))  # V keeps P, W
out$names <- colnames(V0); out$se <- unname(sqrt(diag(Va))); out$df <- unname(ddf)
out$peak_after_vcovAdj_mb <- peak()
if (extra) {
  m0 <- update(m, . ~ . - x)
  out$KRmodcomp <- el(k <- KRmodcomp(m, m0)); out$KRmodcomp_ddf <- k$stats$ddf
  mt <- lmerTest::as_lmerModLmerTest(m)
  out$summary_KR <- el(s <- summary(mt, ddf = "Kenward-Roger"))
  out$summary_KR_se <- unname(coef(s)[, "Std. Error"]); out$summary_KR_df <- unname(coef(s)[, "df"])
  out$summary_sat <- el(s2 <- summary(mt))
  out$sat_se <- unname(coef(s2)[, "Std. Error"]); out$sat_df <- unname(coef(s2)[, "df"])
}
out$peak_mb <- peak()
cat(toJSON(out, digits = NA, auto_unbox = TRUE), "\n")
"""

R_SAT = r"""
t0 <- proc.time()[["elapsed"]]
suppressMessages({library(lmerTest); library(jsonlite)})
a <- commandArgs(trailingOnly = TRUE)
out <- list(load_s = proc.time()[["elapsed"]] - t0)
d <- read.csv(a[1]); for (f in strsplit(a[3], ",")[[1]]) d[[f]] <- factor(d[[f]])
el <- function(e) system.time(e)[["elapsed"]]
out$lmer <- el(m <- lmerTest::lmer(as.formula(a[2]), d, REML = TRUE))
out$summary <- el(s <- summary(m))
out$lme4_lmer <- el(m4 <- lme4::lmer(as.formula(a[2]), d, REML = TRUE))
out$names <- rownames(coef(s)); out$se <- unname(coef(s)[, "Std. Error"]); out$df <- unname(coef(s)[, "df"])
cat(toJSON(out, digits = NA, auto_unbox = TRUE), "\n")
"""

FRESH_PY = """
import sys
import pandas as pd
import jaxmixed as jm
path, formula, factors, dfm = sys.argv[1:5]
d = pd.read_csv(path)
for c in filter(None, factors.split(",")):
    d[c] = d[c].astype(str)
print(jm.fit(formula, d, dfmethod=dfm).fixed["df"].iloc[0])
"""

FRESH_R = r"""
suppressMessages(library(lmerTest))
a <- commandArgs(trailingOnly = TRUE)
d <- read.csv(a[1]); for (f in strsplit(a[3], ",")[[1]]) d[[f]] <- factor(d[[f]])
s <- summary(lmer(as.formula(a[2]), d, REML = TRUE))
cat(coef(s)[1, "df"], "\n")
"""


def have_r() -> bool:
    return bool(shutil.which("Rscript")) and subprocess.run(
        ["Rscript", "-e", "suppressMessages({library(lme4); library(lmerTest); library(pbkrtest); library(jsonlite)})"],
        capture_output=True).returncode == 0


# ---------------------------------------------------------------------------------------------
# the parent


def run_worker(cmd, env=None, timeout=None):
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(status=f"timeout (>{timeout:g} s)", process_wall=time.perf_counter() - t)
    process_wall = time.perf_counter() - t
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return dict(status="failed: " + " | ".join((p.stderr or p.stdout).strip().splitlines()[-3:]),
                    stderr_tail=(p.stderr or "")[-4000:], process_wall=process_wall)
    out = json.loads(lines[-1])
    out["process_wall"] = process_wall
    return out


def py_worker(kind, case, env, timeout, *extra):
    return run_worker([sys.executable, os.path.abspath(__file__), "--worker", kind, "--case", case, *extra],
                      env, timeout)


def r_worker(script, args, timeout):
    with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as fh:
        fh.write(script)
    try:
        return run_worker(["Rscript", fh.name, *args], timeout=timeout)
    finally:
        os.unlink(fh.name)


def cache_env(cache):
    env = {**os.environ, "JAXMIXED_CACHE_DIR": cache}
    env.pop("JAXMIXED_NO_CACHE", None)
    return env


def fresh_process_runs(case, cache, reps, with_r):
    """Whole processes, wall clock from here, alternating: python -c (import, read, fit with
    the df method; cache warm) and Rscript (lmerTest, read.csv, lmer, summary)."""
    spec = CASES[case]
    env = cache_env(cache)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as bench.py: an installed package has its .pyc
    py = [sys.executable, "-c", FRESH_PY, data_path(case), spec["formula"], ",".join(spec["factors"]), spec["whole"]]
    subprocess.run(py, capture_output=True, env=env, cwd=HERE)  # .pyc and programs in place
    with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as fh:
        fh.write(FRESH_R)
    rr = ["Rscript", fh.name, data_path(case), spec.get("r_formula", spec["formula"]), ",".join(spec["factors"])]
    walls = {"jaxmixed": [], "lmerTest": []}
    for _ in range(reps):
        for tool, cmd, e in (("jaxmixed", py, env), ("lmerTest", rr, None)):
            if tool == "lmerTest" and not with_r:
                continue
            t = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=HERE)
            walls[tool].append(time.perf_counter() - t if p.returncode == 0 else float("nan"))
    os.unlink(fh.name)
    return {k: dict(median=float(np.median(v)), walls=v) for k, v in walls.items() if v}


def rel_diff(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def aligned(jm_table, r_names, r_vals):
    """R's values in jaxmixed's coefficient order ("(Intercept)" = "_cons")."""
    pos = {("_cons" if n == "(Intercept)" else n): k for k, n in enumerate(r_names)}
    return [r_vals[pos[n]] for n in jm_table["names"]]


def f_s(x):
    if not isinstance(x, (int, float)) or x != x:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s" if x < 100 else f"{x:.0f} s"


def f_mb(x):
    return "-" if x is None else f"{x:.0f}"


def ratio(a, b):
    if not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0):
        return "-"
    return f"{a / b:,.0f}x" if a / b >= 100 else f"{a / b:.1f}x" if a / b >= 1 else f"{a / b:.2f}x"


def run_case(case, opts, results):
    spec = CASES[case]
    print(f"\n== {case}: {spec['formula']} (REML)", flush=True)
    data_path(case)
    res = {}
    cache = tempfile.mkdtemp(prefix="jm_df_cache_")
    try:
        env = cache_env(cache)
        res["parts_cold"] = py_worker("parts", case, env, opts.timeout)
        res["parts_warm"] = py_worker("parts", case, env, opts.timeout)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if spec["whole"]:
        cache = tempfile.mkdtemp(prefix="jm_df_cache_")
        try:
            env = cache_env(cache)
            res["whole_cold"] = py_worker("whole", case, env, opts.timeout)
            res["whole_warm"] = py_worker("whole", case, env, opts.timeout, "--again")
            if case == "nested20k":
                res["fresh_process"] = fresh_process_runs(case, cache, opts.reps, opts.r)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    if not opts.no_phases:
        with tempfile.TemporaryDirectory(prefix="jm_df_cache_") as cache:
            res["phases"] = py_worker("phases", case, cache_env(cache), opts.timeout)
    args = [data_path(case), spec.get("r_formula", ""), ",".join(spec["factors"])]
    if spec["peer"] == "kr":
        res["R"] = r_worker(R_KR, args + ["0" if opts.no_r_extra else "1"], opts.r_timeout) if opts.r else \
            dict(status="skipped (no Rscript / lme4, lmerTest, pbkrtest, jsonlite)")
    elif spec["peer"] == "sat":
        res["R"] = r_worker(R_SAT, args, opts.r_timeout) if opts.r else dict(status="skipped (no Rscript ...)")
    results[case] = res
    report(case, res)


def report(case, res):
    spec = CASES[case]
    cold, warm = res["parts_cold"], res["parts_warm"]
    for label, w in (("cold", cold), ("warm", warm)):
        if "status" in w:
            print(f"  jaxmixed parts ({label}): {w['status']}")
            print("   ", w.get("stderr_tail", "").strip().replace("\n", "\n    "))
    if "status" in cold or "status" in warm:
        return
    print(f"  engine {warm['engine']}, n = {warm['nobs']:,}, p = {warm['p']}, k = {warm['k']} variance parameters")
    R = res.get("R", {})
    peer = None
    if spec["peer"] == "kr" and "vcovAdj" in R:
        peer = ("pbkrtest::vcovAdj", R["vcovAdj"])
    hdr = f"  {'step':34s} {'cold':>10s} {'warm cache':>11s} {'again':>10s} {'peak RSS MB (warm: before → peak)':>36s}"
    if peer:
        hdr += f"   {peer[0]} {f_s(peer[1])} ÷ (cold / warm / again)"
    print(hdr)
    rows = [("plain fit jm.fit(...)", cold["fit"], warm["fit"], warm["fit_again"])]
    for m in spec["parts"]:
        if "status" in warm.get(m, {}) or "status" in cold.get(m, {}):
            print(f"  {m}: {warm.get(m, {}).get('status') or cold.get(m, {}).get('status')}")
            print("   ", (warm.get(m, {}).get("traceback") or cold.get(m, {}).get("traceback") or "").strip()
                  .replace("\n", "\n    "))
            continue
        rows.append((f"{'kenward_roger' if m == 'kroger' else 'satterthwaite'} call", cold[m]["first"],
                     warm[m]["first"], warm[m]["again"]))
    rows.append(("η-Hessian (engine.hessian_eta)", cold["hessian_eta"]["first"], warm["hessian_eta"]["first"],
                 warm["hessian_eta"]["again"]))
    for name, c, w, a in rows:
        line = (f"  {name:34s} {f_s(c['wall']):>10s} {f_s(w['wall']):>11s} {f_s(a['wall'] if a else None):>10s} "
                f"{f_mb(w.get('rss_before_mb')) + ' → ' + f_mb(w.get('rss_peak_mb')):>36s}")
        if peer and "call" in name and name.startswith("kenward"):
            line += f"   {ratio(peer[1], c['wall'])} / {ratio(peer[1], w['wall'])} / {ratio(peer[1], a['wall'])}"
        print(line)
    print(f"  process peak (ru_maxrss): cold {f_mb(cold['maxrss_mb'])} MB, warm {f_mb(warm['maxrss_mb'])} MB; "
          f"programs cold {cold['programs']}, warm {warm['programs']}; load average {warm['loadavg']:.2f}")
    if not warm["programs"].get("loaded"):
        print("  WARNING: the warm process loaded no program from the disk cache (package edited in between?)")
    h = warm["hessian_eta"]["again"]["wall"]
    for m in spec["parts"]:
        if "again" in warm.get(m, {}):
            print(f"  {m} call again = {warm[m]['again']['wall'] / h:.1f} η-Hessians; "
                  f"(a plain fit again = {warm['fit_again']['wall'] / h:.1f})")
    if "whole_cold" in res:
        wc, ww = res["whole_cold"], res["whole_warm"]
        if "status" in wc or "status" in ww:
            print(f"  whole jm.fit(dfmethod={spec['whole']!r}): {wc.get('status', '')} {ww.get('status', '')}")
        else:
            line = (f"  whole jm.fit(dfmethod={spec['whole']!r}): cold {f_s(wc['fit']['wall'])}, warm cache "
                    f"{f_s(ww['fit']['wall'])}, again {f_s(ww['again']['wall'])}")
            if peer:
                line += (f"   vcovAdj ÷ this: {ratio(peer[1], wc['fit']['wall'])} / {ratio(peer[1], ww['fit']['wall'])}"
                         f" / {ratio(peer[1], ww['again']['wall'])}")
            print(line)
    ph = res.get("phases", {})
    if ph and "status" not in ph:
        for name, v in ph.items():
            if not isinstance(v, dict):
                continue
            print(f"  phases {name:14s}: trace+lower {f_s(v['trace_lower'])}, compile {f_s(v['compile'])}, "
                  f"first run {f_s(v['first_run'])}, run {f_s(v['run'])}")
    elif ph:
        print(f"  phases: {ph['status']}")
    if R:
        report_peer(case, res, R)


def report_peer(case, res, R):
    spec = CASES[case]
    if "status" in R:
        print(f"  R: {R['status']}")
        return
    warm = res["parts_warm"]
    if spec["peer"] == "kr":
        print(f"  R: lmer {f_s(R['lmer'])}, vcovAdj {f_s(R['vcovAdj'])}, Lb_ddf {f_s(R['Lb_ddf'])}"
              + (f", KRmodcomp {f_s(R['KRmodcomp'])}, lmerTest summary(ddf='Kenward-Roger') {f_s(R['summary_KR'])}, "
                 f"summary (Satterthwaite) {f_s(R['summary_sat'])}" if "KRmodcomp" in R else "")
              + f"; R peak {R['peak_mb']:.0f} MB")
        kr = warm.get("kroger", {})
        if "df" in kr:
            cmp = dict(kr_df_vs_pbkrtest=rel_diff(kr["df"], aligned(kr, R["names"], R["df"])),
                       kr_se_vs_pbkrtest=rel_diff(kr["se"], aligned(kr, R["names"], R["se"])))
            if "summary_KR_df" in R:
                cmp.update(kr_df_vs_lmerTest=rel_diff(kr["df"], aligned(kr, R["names"], R["summary_KR_df"])),
                           kr_se_vs_lmerTest=rel_diff(kr["se"], aligned(kr, R["names"], R["summary_KR_se"])))
                sat = warm.get("satterthwaite", {})
                if "df" in sat:
                    cmp.update(sat_df_vs_lmerTest=rel_diff(sat["df"], aligned(sat, R["names"], R["sat_df"])),
                               sat_se_vs_lmerTest=rel_diff(sat["se"], aligned(sat, R["names"], R["sat_se"])))
            if "KRmodcomp_ddf" in R and "df" in res.get("whole_warm", {}):
                ww = res["whole_warm"]
                cmp["KRmodcomp_ddf_x"] = rel_diff([ww["df"][ww["names"].index("x")]], [R["KRmodcomp_ddf"]])
            res["agreement"] = cmp
            print("  max relative difference: " + ", ".join(f"{k} {v:.1e}" for k, v in cmp.items()))
            print(f"  df  jaxmixed {dict(zip(kr['names'], np.round(kr['df'], 4)))}   pbkrtest "
                  f"{dict(zip(kr['names'], np.round(aligned(kr, R['names'], R['df']), 4)))}")
    else:
        ww = res.get("whole_warm", {})
        tot = R["lmer"] + R["summary"]
        print(f"  R: lmerTest lmer {f_s(R['lmer'])} + summary {f_s(R['summary'])} = {f_s(tot)} "
              f"(plain lme4 lmer {f_s(R['lme4_lmer'])})")
        if "fit" in ww:
            wc = res["whole_cold"]
            print(f"  lmerTest (lmer + summary) ÷ jm.fit(dfmethod='satterthwaite'): cold {ratio(tot, wc['fit']['wall'])}, "
                  f"warm cache {ratio(tot, ww['fit']['wall'])}, again {ratio(tot, ww['again']['wall'])}")
            cmp = dict(sat_df_vs_lmerTest=rel_diff(ww["df"], aligned(ww, R["names"], R["df"])),
                       sat_se_vs_lmerTest=rel_diff(ww["se"], aligned(ww, R["names"], R["se"])))
            res["agreement"] = cmp
            print("  max relative difference: " + ", ".join(f"{k} {v:.1e}" for k, v in cmp.items()))
        fp = res.get("fresh_process", {})
        if "jaxmixed" in fp:
            line = f"  whole fresh process (median of {len(fp['jaxmixed']['walls'])}): jaxmixed {f_s(fp['jaxmixed']['median'])}"
            if "lmerTest" in fp:
                line += (f", Rscript lmerTest {f_s(fp['lmerTest']['median'])} "
                         f"(ratio {ratio(fp['lmerTest']['median'], fp['jaxmixed']['median'])})")
            print(line)


def machine() -> str:
    """bench_glmm's description of the machine, with the load average (the same CPU line)."""
    import bench_glmm

    load = os.getloadavg()
    return f"{bench_glmm.machine()}; Python {platform.python_version()}; load average {load[0]:.2f}"


def r_versions() -> str:
    if not shutil.which("Rscript"):
        return "no Rscript"
    p = subprocess.run(["Rscript", "-e", 'cat(R.version.string, sapply(c("lme4", "lmerTest", "pbkrtest"), '
                        'function(p) paste(p, packageVersion(p))), sep = ", ")'], capture_output=True, text=True)
    return p.stdout.strip() or p.stderr.strip()


def code_state() -> str:
    """The commit and the package's edited files (the numbers are for this code)."""
    root = os.path.dirname(HERE)
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--short", "jaxmixed"], cwd=root, capture_output=True, text=True).stdout
        from jaxmixed.runtime import programs

        return f"{head.strip()} {'+ edited: ' + ' '.join(dirty.split()[1::2]) if dirty.strip() else 'clean'}; " \
               f"package source hash {programs._package_hash()[:12]}"
    except (OSError, ImportError):
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", choices=list(ORDER))
    ap.add_argument("--json")
    ap.add_argument("--no-r-extra", action="store_true", help="crossed3k: skip KRmodcomp and lmerTest's summaries")
    ap.add_argument("--no-phases", action="store_true", help="skip the trace/compile/run split")
    ap.add_argument("--reps", type=int, default=3, help="nested20k whole-process runs of each tool")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds for one jaxmixed process")
    ap.add_argument("--r-timeout", type=float, default=1800.0, help="seconds for one Rscript process")
    ap.add_argument("--profile", choices=["kroger", "satterthwaite"],
                    help="only cProfile the first df call of a warm-cache process (each --case) and print it")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--again", action="store_true", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.worker == "parts":
        return worker_parts(opts.case[0])
    if opts.worker == "whole":
        return worker_whole(opts.case[0], opts.again)
    if opts.worker == "phases":
        return worker_phases(opts.case[0])
    if opts.worker == "profile":
        return worker_profile(opts.case[0], opts.profile, opts.again)
    if opts.profile:
        for case in opts.case or ORDER:
            data_path(case)
            with tempfile.TemporaryDirectory(prefix="jm_df_cache_") as cache:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", "profile", "--case", case,
                       "--profile", opts.profile]
                subprocess.run(cmd, env=cache_env(cache), cwd=HERE, capture_output=True)  # fills the cache
                print(f"== {case}")
                subprocess.run(cmd + ["--again"], env=cache_env(cache), cwd=HERE)
        return
    opts.r = have_r()
    results = dict(machine=machine(), r=r_versions(), started=time.strftime("%Y-%m-%d %H:%M:%S"), code=code_state())
    print("machine:", results["machine"])
    print("R:", results["r"])
    for case in opts.case or ORDER:
        try:
            run_case(case, opts, results)
        except Exception as e:  # noqa: BLE001 - recorded, the next case still runs
            import traceback

            results[case] = dict(status="failed: " + repr(e), traceback=traceback.format_exc())
            print(results[case]["traceback"])
        if opts.json:  # after every case: a long run keeps what it has
            with open(opts.json, "w") as fh:
                json.dump(results, fh, indent=1, default=str)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["code_at_end"] = code_state()
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
