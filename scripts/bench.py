#!/usr/bin/env python
"""Benchmarks: jaxmixed against lme4 (Rscript) and statsmodels MixedLM on the same machine.

    python scripts/bench.py                      # every case (long: statsmodels may time out)
    python scripts/bench.py --case insteval      # one case: insteval, million, nested, small, scaling
    python scripts/bench.py --case small --sm-timeout 120 --json out.json

Every fit runs in its own subprocess, so each tool's wall time and peak memory (VmHWM from
/proc/self/status at the end: the data and the fit together) are its own. The wall time is the
fit call alone (data already loaded): ``jm.fit``, ``lmer``, ``MixedLM.fit``. jaxmixed's first
fit in a process includes compiling its programs; it is run with an empty compilation cache
("cold"), then in a fresh process with that cache warm ("warm cache"), and refitted in the same
process ("refit"). lme4 is skipped when Rscript or lme4 is missing; statsmodels gets a time
limit (``--sm-timeout``, default 600 s) and a memory limit (``--sm-memory`` GB, default 8) and
reports "timeout" / "out of memory" past them.

Cases:
  insteval  lme4::InstEval (73,421 ratings): y ~ 1 + service + (1|s) + (1|d) + (1|dept), ML
  million   1,000,000 rows, 20,000 groups: y ~ x1 + x2 + x3 + x4 + (1 + x1 | g), REML (seed 1)
  nested    200,000 pupils in 5,000 classes in 500 schools: y ~ x + (1|school) + (1|school:class), REML
  small     the seed's small models (pig random intercept, random slope and crossed, productivity
            nested, JSP random slope): cold / warm-cache / refit, against lmer in a warm R session;
            and the headline "fresh process" figure: a whole `python -c` that imports jaxmixed,
            reads the CSV and fits (compilation cache warm), against a whole `Rscript -e` that
            loads lme4, reads the CSV and fits, wall clock, --reps runs each, alternating
            (a single small model: --case pig_ri, pig_slope, pig, productivity, jsp)
  tour      `python -m jaxmixed tour` in a fresh process, empty compilation cache, then warm
  scaling   one objective evaluation (and value+gradient) at n, 10n, 100n rows (50,000 to 5,000,000)
            on fixed grouping structures (crossed 500 × 20, nested, random slopes): should be flat

Data sets are written once to ~/.cache/jaxmixed/data (InstEval exported from R).
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
import time

import numpy as np
import pandas as pd

DATA = os.path.join(os.path.expanduser("~"), ".cache", "jaxmixed", "data")
HERE = os.path.dirname(os.path.abspath(__file__))

CASES = {
    "insteval": dict(formula="y ~ 1 + service + (1|s) + (1|d) + (1|dept)", method="ml",
                     factors=["s", "d", "dept", "service"],
                     sm=dict(groups=None, re=None, vc={"s": "0 + C(s)", "d": "0 + C(d)", "dept": "0 + C(dept)"},
                             fixed="y ~ 1 + C(service)")),
    "million": dict(formula="y ~ x1 + x2 + x3 + x4 + (1 + x1 | g)", method="reml", factors=["g"],
                    sm=dict(groups="g", re="~x1", vc=None, fixed="y ~ x1 + x2 + x3 + x4")),
    "nested": dict(formula="y ~ x + (1|school) + (1|school:class)", method="reml", factors=["school", "class"],
                   sm=dict(groups="school", re="~1", vc={"klass": "0 + C(Q('class'))"}, fixed="y ~ x")),
    "pig_ri": dict(formula="weight ~ week + (1|id)", method="reml", factors=["id"],
                   sm=dict(groups="id", re="~1", vc=None, fixed="weight ~ week")),
    "pig_slope": dict(formula="weight ~ week + (1 + week|id)", method="reml", factors=["id"],
                      sm=dict(groups="id", re="~week", vc=None, fixed="weight ~ week")),
    "pig": dict(formula="weight ~ week + (1|id) + (1|week)", method="reml", factors=["id"],
                sm=dict(groups=None, re=None, vc={"id": "0 + C(id)", "wk": "0 + C(week)"}, fixed="weight ~ week")),
    "productivity": dict(formula="gsp ~ private + emp + hwy + water + other + unemp + (1|region) + (1|region:state)",
                         method="reml", factors=["region", "state"],
                         sm=dict(groups="region", re="~1", vc={"state": "0 + C(state)"},
                                 fixed="gsp ~ private + emp + hwy + water + other + unemp")),
    "jsp": dict(formula="math5 ~ math3 + (1 + math3 | school)", method="reml", factors=["school"],
                sm=dict(groups="school", re="~math3", vc=None, fixed="math5 ~ math3")),
}
SMALL = ("pig_ri", "pig_slope", "pig", "productivity", "jsp")
DATASET = {"pig_ri": "pig", "pig_slope": "pig"}  # cases that share a data set


# ---------------------------------------------------------------------------------------------
# data


def data_path(case: str) -> str:
    os.makedirs(DATA, exist_ok=True)
    if case in SMALL:
        import jaxmixed

        return os.path.join(os.path.dirname(jaxmixed.__file__), "data", "datasets", f"{DATASET.get(case, case)}.csv")
    path = os.path.join(DATA, {"insteval": "insteval.csv", "million": "million.csv", "nested": "nested.csv"}[case])
    if os.path.exists(path):
        return path
    if case == "insteval":
        if not shutil.which("Rscript"):
            raise SystemExit("InstEval needs R with lme4 once, to export it (write.csv(lme4::InstEval))")
        subprocess.run(["Rscript", "-e", f'write.csv(lme4::InstEval, "{path}", row.names=FALSE)'], check=True)
    elif case == "million":
        simulate_million().to_csv(path, index=False)
    elif case == "nested":
        simulate_nested().to_csv(path, index=False)
    return path


def simulate_million(n=1_000_000, groups=20_000, seed=1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = rng.integers(0, groups, n)
    X = rng.normal(size=(n, 4))
    b0 = rng.normal(0, 1.0, groups)
    b1 = 0.5 * b0 + rng.normal(0, 0.5, groups)
    y = 1 + X @ np.array([0.5, -0.3, 0.2, 0.1]) + b0[g] + b1[g] * X[:, 0] + rng.normal(0, 2.0, n)
    return pd.DataFrame({"y": y, "x1": X[:, 0], "x2": X[:, 1], "x3": X[:, 2], "x4": X[:, 3], "g": g})


def simulate_nested(n=200_000, schools=500, classes=5_000, seed=2) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    klass = rng.integers(0, classes, n)  # class ids are global; class c sits in school c // 10
    school = klass // (classes // schools)
    x = rng.normal(size=n)
    y = 2 + 0.4 * x + rng.normal(0, 0.7, schools)[school] + rng.normal(0, 0.5, classes)[klass] + rng.normal(0, 1, n)
    return pd.DataFrame({"y": y, "x": x, "school": school, "class": klass})


def load(case: str) -> pd.DataFrame:
    d = pd.read_csv(data_path(case))
    for c in CASES[case]["factors"]:
        d[c] = d[c].astype(str)
    if case == "productivity":
        d["state"] = d["state"].astype(str)
    return d


# ---------------------------------------------------------------------------------------------
# workers (run in a subprocess; print one JSON line)


def peak_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    return float("nan")


def worker_jaxmixed(case: str, refit: bool):
    t0 = time.perf_counter()
    import jaxmixed as jm

    t_import = time.perf_counter() - t0
    d = load(case)
    spec = CASES[case]
    t = time.perf_counter()
    r = jm.fit(spec["formula"], d, method=spec["method"])
    wall = time.perf_counter() - t
    out = dict(tool="jaxmixed", wall=wall, loglik=r.loglik, converged=r.converged, import_s=t_import,
               engine=r.engine.shape.kind)
    if refit:
        t = time.perf_counter()
        r2 = jm.fit(spec["formula"], d, method=spec["method"])
        out["refit"] = time.perf_counter() - t
        assert abs(r2.loglik - r.loglik) < 1e-8 * abs(r.loglik)
    out["peak_mb"] = peak_mb()
    print(json.dumps(out))


def worker_statsmodels(case: str, memory_gb: float):
    import resource
    import warnings

    resource.setrlimit(resource.RLIMIT_AS, (int(memory_gb * 2**30), int(memory_gb * 2**30)))
    import statsmodels.formula.api as smf

    d = load(case)
    spec = CASES[case]["sm"]
    groups = d[spec["groups"]] if spec["groups"] else np.ones(len(d))
    warnings.simplefilter("ignore")
    t = time.perf_counter()
    try:
        m = smf.mixedlm(spec["fixed"], d, groups=groups, re_formula=spec["re"], vc_formula=spec["vc"])
        r = m.fit(reml=CASES[case]["method"] == "reml")
        out = dict(tool="statsmodels", wall=time.perf_counter() - t, loglik=float(r.llf),
                   converged=bool(r.converged))
    except MemoryError:
        out = dict(tool="statsmodels", wall=time.perf_counter() - t, status=f"out of memory (>{memory_gb:g} GB)")
    out["peak_mb"] = peak_mb()
    print(json.dumps(out))


R_WORKER = r"""
suppressMessages(library(lme4))
args <- commandArgs(trailingOnly = TRUE)
path <- args[1]; formula <- args[2]; reml <- args[3] == "reml"; factors <- strsplit(args[4], ",")[[1]]
reps <- as.integer(args[5])
d <- read.csv(path)
for (f in factors) d[[f]] <- factor(d[[f]])
peak <- function() { s <- readLines("/proc/self/status"); as.numeric(strsplit(trimws(sub("VmHWM:", "", s[grep("^VmHWM", s)])), " ")[[1]][1]) / 1024 }
t <- proc.time()[["elapsed"]]
m <- lmer(as.formula(formula), d, REML = reml)
wall <- proc.time()[["elapsed"]] - t
warm <- NA
if (reps > 1) { t <- proc.time()[["elapsed"]]; for (i in 2:reps) m <- lmer(as.formula(formula), d, REML = reml); warm <- (proc.time()[["elapsed"]] - t) / (reps - 1) }
cat(sprintf('{"tool": "lme4", "wall": %.6f, "warm": %s, "loglik": %.10f, "peak_mb": %.1f}\n', wall,
    ifelse(is.na(warm), "null", sprintf("%.6f", warm)), as.numeric(logLik(m)), peak()))
"""


def have_lme4() -> bool:
    if not shutil.which("Rscript"):
        return False
    return subprocess.run(["Rscript", "-e", "suppressMessages(library(lme4))"], capture_output=True).returncode == 0


# ---------------------------------------------------------------------------------------------
# the parent: run workers, collect, print


def run_worker(args, env=None, timeout=None):
    t = time.perf_counter()
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(status=f"timeout (>{timeout:g} s)", process_wall=time.perf_counter() - t)
    process_wall = time.perf_counter() - t
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return dict(status="failed: " + " | ".join(tail), process_wall=process_wall)
    out = json.loads(lines[-1])
    out["process_wall"] = process_wall
    return out


def jaxmixed_runs(case, cache_dir, refit=True):
    env = {**os.environ, "JAXMIXED_CACHE_DIR": cache_dir}
    env.pop("JAXMIXED_NO_CACHE", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "jaxmixed", "--case", case]
    cold = run_worker(cmd, env)
    warm = run_worker(cmd + (["--refit"] if refit else []), env)
    return cold, warm


def lme4_run(case, reps=1, timeout=None):
    spec = CASES[case]
    with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as fh:
        fh.write(R_WORKER)
    factors = list(spec["factors"]) + (["state"] if case == "productivity" else [])
    return run_worker(["Rscript", fh.name, data_path(case), spec["formula"], spec["method"], ",".join(factors),
                       str(reps)], timeout=timeout)


def sm_run(case, timeout, memory_gb):
    return run_worker([sys.executable, os.path.abspath(__file__), "--worker", "statsmodels", "--case", case,
                       "--sm-memory", str(memory_gb)], timeout=timeout)


# A whole fresh process per fit, as a user runs one: start the interpreter, import the package or
# load lme4, read the CSV, fit, print the log likelihood, exit. Timed by wall clock from here.
FRESH_PY = """
import sys
import pandas as pd
import jaxmixed as jm
path, formula, method, factors = sys.argv[1:5]
d = pd.read_csv(path)
for c in filter(None, factors.split(",")):
    d[c] = d[c].astype(str)
print(repr(jm.fit(formula, d, method=method).loglik))
"""

FRESH_R = r"""
suppressMessages(library(lme4))
a <- commandArgs(trailingOnly = TRUE)
d <- read.csv(a[1])
for (f in strsplit(a[4], ",")[[1]]) d[[f]] <- factor(d[[f]])
m <- lmer(as.formula(a[2]), d, REML = a[3] == "reml")
cat(sprintf("%.10f\n", as.numeric(logLik(m))))
"""


def _timed(cmd, env=None):
    t = time.perf_counter()  # cwd: not the repository root, whose jaxmixed/ would shadow PYTHONPATH
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        return wall, "failed: " + " | ".join((p.stderr or p.stdout).strip().splitlines()[-3:])
    return wall, float(p.stdout.strip().splitlines()[-1])


def fresh_process_runs(case, cache_dir, reps, lme4=True):
    """``reps`` whole-process fits of each tool, alternating: jaxmixed with the compilation cache
    in ``cache_dir`` (filled by a first, untimed run) and Rscript with lme4. Python runs with its
    bytecode cache on, as an installed package does (pip byte-compiles it; this project's
    machine sets PYTHONDONTWRITEBYTECODE=1, which would recompile jaxmixed's sources in every
    process: ≈ +0.1 s)."""
    spec = CASES[case]
    factors = list(spec["factors"]) + (["state"] if case == "productivity" else [])
    args = [data_path(case), spec["formula"], spec["method"], ",".join(factors)]
    env = {**os.environ, "JAXMIXED_CACHE_DIR": cache_dir}
    for k in ("JAXMIXED_NO_CACHE", "PYTHONDONTWRITEBYTECODE"):
        env.pop(k, None)
    py = [sys.executable, "-c", FRESH_PY, *args]
    _timed(py, env)  # fills the caches (compiled programs, .pyc) where the cold run did not
    with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as fh:
        fh.write(FRESH_R)
    r = ["Rscript", fh.name, *args]
    runs = {"jaxmixed": [], "lme4": []}
    for _ in range(reps):
        runs["jaxmixed"].append(_timed(py, env))
        if lme4:
            runs["lme4"].append(_timed(r))
    os.unlink(fh.name)
    out = {}
    for tool, rs in runs.items():
        bad = [v for _, v in rs if isinstance(v, str)]
        if not rs or bad:
            out[tool] = dict(status=bad[0] if bad else "skipped")
            continue
        walls = [w for w, _ in rs]
        out[tool] = dict(median=float(np.median(walls)), min=min(walls), max=max(walls), walls=walls, loglik=rs[0][1])
    return out


def fmt_s(x):
    return "-" if x is None else f"{x:.3f} s" if x < 100 else f"{x:.0f} s"


def big_case(case, opts, results):
    print(f"\n== {case}: {CASES[case]['formula']} ({CASES[case]['method'].upper()})", flush=True)
    data_path(case)
    with tempfile.TemporaryDirectory() as cache:
        cold, warm = jaxmixed_runs(case, cache)
    rows = [("jaxmixed (cold cache)", cold), ("jaxmixed (warm cache)", warm)]
    if "refit" in warm:
        rows.append(("jaxmixed (refit in process)", dict(wall=warm["refit"], loglik=warm.get("loglik"),
                                                        peak_mb=warm.get("peak_mb"))))
    lme4 = lme4_run(case) if opts.lme4 else dict(status="skipped (no Rscript/lme4)")
    rows.append(("lme4 lmer", lme4))
    sm = sm_run(case, opts.sm_timeout, opts.sm_memory) if not opts.no_sm else dict(status="skipped")
    rows.append(("statsmodels MixedLM", sm))
    table(rows, lme4)
    results[case] = dict(rows)


def table(rows, ref):
    ref_wall = ref.get("wall") if ref else None
    ref_ll = ref.get("loglik") if ref else None
    print(f"{'tool':32s} {'wall':>10s} {'peak MB':>9s} {'log likelihood':>18s} {'lme4/this':>10s} {'rel. diff ll':>12s}")
    for name, r in rows:
        if "status" in r:
            print(f"{name:32s} {r['status']}")
            continue
        ratio = f"{ref_wall / r['wall']:.1f}x" if ref_wall and r.get("wall") else "-"
        rel = f"{abs(r['loglik'] - ref_ll) / abs(ref_ll):.1e}" if ref_ll is not None and r.get("loglik") is not None else "-"
        pk = f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "-"
        print(f"{name:32s} {fmt_s(r.get('wall')):>10s} {pk:>9s} {r.get('loglik', float('nan')):18.6f} {ratio:>10s} {rel:>12s}")


def small_case(opts, results, cases=SMALL):
    print("\n== small seed models (REML)")
    out = {}
    for case in cases:
        with tempfile.TemporaryDirectory() as cache:  # each model's own: its first run is cold
            cold, warm = jaxmixed_runs(case, cache)
            fresh = fresh_process_runs(case, cache, opts.reps, opts.lme4)
        lme4 = lme4_run(case, reps=11) if opts.lme4 else dict(status="skipped")
        sm = sm_run(case, opts.sm_timeout, opts.sm_memory) if not opts.no_sm else dict(status="skipped")
        out[case] = dict(cold=cold, warm_cache=warm, lme4=lme4, statsmodels=sm, fresh_process=fresh)
        print(f"\n-- {case}: {CASES[case]['formula']}")
        if "status" in cold or "status" in warm:
            print(f"  jaxmixed failed: {cold.get('status')} {warm.get('status')}")
            continue
        jf, rf = fresh["jaxmixed"], fresh["lme4"]
        print(f"  FRESH PROCESS, whole wall time, median of {opts.reps} [min-max], cache warm:")
        if "median" in jf:
            print(f"    python -c 'import jaxmixed; read csv; fit'   : {fmt_s(jf['median'])}  "
                  f"[{jf['min']:.3f}-{jf['max']:.3f}]")
        else:
            print(f"    jaxmixed: {jf['status']}")
        if "median" in rf:
            print(f"    Rscript 'library(lme4); read.csv; lmer'      : {fmt_s(rf['median'])}  "
                  f"[{rf['min']:.3f}-{rf['max']:.3f}]")
            if "median" in jf:
                print(f"    Rscript / jaxmixed (medians)                 : {rf['median'] / jf['median']:.2f}x")
        else:
            print(f"    Rscript: {rf['status']}")
        print(f"  jaxmixed fit, fresh process, empty cache : {fmt_s(cold.get('wall'))}  "
              f"(whole process {fmt_s(cold.get('process_wall'))}, import {fmt_s(cold.get('import_s'))})")
        print(f"  jaxmixed fit, fresh process, warm cache  : {fmt_s(warm.get('wall'))}  "
              f"(import {fmt_s(warm.get('import_s'))})")
        print(f"  jaxmixed refit in the same process       : {fmt_s(warm.get('refit'))}")
        if "status" not in lme4:
            print(f"  lme4 lmer, first call in Rscript         : {fmt_s(lme4['wall'])}")
            print(f"  lme4 lmer, warm R session                : {fmt_s(lme4['warm'])}")
            print(f"  refit ratio lme4 warm / jaxmixed refit   : {lme4['warm'] / warm['refit']:.1f}x")
            print(f"  log likelihood: jaxmixed {warm.get('loglik'):.6f}  lme4 {lme4['loglik']:.6f}")
        else:
            print(f"  lme4: {lme4['status']}")
        print(f"  statsmodels: " + (f"{fmt_s(sm['wall'])}, loglik {sm['loglik']:.6f}" if "wall" in sm and "loglik" in sm
                                     else sm.get("status", "")))
    results.setdefault("small", {}).update(out)


def tour_case(opts, results):
    """``python -m jaxmixed tour`` as a new user runs it: a fresh process with an empty
    compilation cache, then again with the cache it left (wall clock from here)."""
    print("\n== the tour (python -m jaxmixed tour)")
    out = {}
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "JAXMIXED_CACHE_DIR": cache}
        env.pop("JAXMIXED_NO_CACHE", None)
        for label in ("empty cache", "warm cache"):
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "jaxmixed", "tour", "--out", work], capture_output=True,
                               text=True, env=env, cwd=work)
            wall = time.perf_counter() - t
            out[label] = wall if p.returncode == 0 else "failed: " + p.stderr.strip()[-300:]
            print(f"  {label}: " + (f"{wall:.1f} s" if p.returncode == 0 else out[label]))
    results["tour"] = out


def scaling_case(opts, results):
    """One objective evaluation at n, 10n, 100n rows on fixed grouping structures."""
    import jax
    import jax.numpy as jnp

    import jaxmixed as jm
    from jaxmixed.data import design
    from jaxmixed.engine import pls as objective

    print("\n== scaling: one objective evaluation vs n (fixed grouping structure)")
    out = {}
    setups = {
        "crossed (1|a)+(1|b), 500 x 20 levels": ("y ~ x + (1|a) + (1|b)", lambda rng, n: dict(
            a=rng.integers(0, 500, n), b=rng.integers(0, 20, n))),
        "nested (1|s)+(1|s:c), 50 schools, 500 classes": ("y ~ x + (1|s) + (1|s:c)", lambda rng, n: (
            lambda c: dict(c=c, s=c // 10))(rng.integers(0, 500, n))),
        "slopes (1+x|g), 2000 groups": ("y ~ x + (1 + x|g)", lambda rng, n: dict(g=rng.integers(0, 2000, n))),
    }
    for label, (formula, gen) in setups.items():
        times = []
        for n in (50_000, 500_000, 5_000_000):
            rng = np.random.default_rng(0)
            cols = gen(rng, n)
            d = pd.DataFrame({"y": rng.normal(size=n), "x": rng.normal(size=n), **cols})
            des = design.build_design(jm.parse_formula(formula), d)
            st, struct = objective.from_design(des)
            th = jnp.asarray(des.theta0 * 0.7)
            dev = jax.jit(objective.deviance, static_argnames="shape")
            vg = jax.jit(jax.value_and_grad(objective.deviance), static_argnames="shape")
            res = []
            for f in (dev, vg):
                jax.block_until_ready(f(th, st, struct, True))
                reps = []
                for _ in range(30):
                    t = time.perf_counter()
                    jax.block_until_ready(f(th, st, struct, True))
                    reps.append(time.perf_counter() - t)
                res.append(float(np.median(reps)))
            times.append((n, *res))
            print(f"  {label:42s} n={n:>9,d}: deviance {res[0] * 1e3:8.3f} ms   value+grad {res[1] * 1e3:8.3f} ms",
                  flush=True)
        base = times[0]
        print(f"  {'':42s} ratio 100n/n: deviance {times[-1][1] / base[1]:.2f}, value+grad {times[-1][2] / base[2]:.2f}")
        out[label] = times
    results["scaling"] = out


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()
    return (f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {mem:.0f} GB RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, load average {load[0]:.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", choices=["insteval", "million", "nested", "small", "scaling", "tour"] + list(SMALL))
    ap.add_argument("--sm-timeout", type=float, default=600.0)
    ap.add_argument("--sm-memory", type=float, default=8.0)
    ap.add_argument("--no-sm", action="store_true", help="skip statsmodels")
    ap.add_argument("--reps", type=int, default=7, help="fresh-process runs of each tool (small models)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--refit", action="store_true", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.worker == "jaxmixed":
        return worker_jaxmixed(opts.case[0], opts.refit)
    if opts.worker == "statsmodels":
        return worker_statsmodels(opts.case[0], opts.sm_memory)
    opts.lme4 = have_lme4()
    print(machine())
    import jax

    try:
        sm_version = __import__("statsmodels").__version__
    except ImportError:
        sm_version = "not installed"
    print(f"jax {jax.__version__}, statsmodels {sm_version}, lme4 {'yes' if opts.lme4 else 'not available'}")
    results = {"machine": machine()}
    for case in opts.case or ["small", "scaling", "nested", "million", "insteval"]:
        if case == "small":
            small_case(opts, results)
        elif case in SMALL:
            small_case(opts, results, (case,))
        elif case == "scaling":
            scaling_case(opts, results)
        elif case == "tour":
            tour_case(opts, results)
        else:
            big_case(case, opts, results)
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
