"""Benchmark: jaxmixed vs nlme on a longitudinal model with AR(1) residuals.

    python scripts/bench_residuals.py                    # 1,000 x 10 and 10,000 x 10 (100,000 rows)
    python scripts/bench_residuals.py --subjects 1000     # one size only
    python scripts/bench_residuals.py --nlme-timeout 900 --profile

Simulation (fixed seed): `n` subjects x 10 occasions t = 0..9,
    y = 10 + 2 t + b0 + b1 t + e,   (b0, b1) ~ N(0, [sd 2, sd 0.5, corr 0.3]),
    e within subject stationary AR(1), phi = 0.6, sd 1.5.
Model fitted on both sides (REML):
    jaxmixed: jm.fit("y ~ t + (1 + t | id)", df, "reml", residuals=jm.ar(1, time="t"))
    nlme:     lme(y ~ t, random = ~ 1 + t | id, correlation = corAR1(form = ~ t | id),
                  method = "REML")                  (default lmeControl())

Each side runs in its own child process, wrapped in /usr/bin/time -v when present (peak RSS =
"Maximum resident set size"; otherwise resource.getrusage(RUSAGE_CHILDREN).ru_maxrss, which is
the max over all children so far). Times reported:
    fit     -- the fit call alone, timed inside the child (jaxmixed: the first fit of the
               process and a second identical fit in it, "refit"), jaxmixed in two processes on
               a compilation cache of its own (JAXMIXED_CACHE_DIR in the temporary folder): the
               first finds it empty ("empty cache": every program traced and compiled), the
               second filled ("warm cache": programs loaded from disk);
    memory  -- the child's peak RSS, and (jaxmixed) its ru_maxrss at the end of the first fit:
               the peak of a process making that one fit, as nlme's child makes one;
    total   -- wall time of the whole child (interpreter start, imports, CSV read, fit).
nlme gets a wall-clock limit (--nlme-timeout, default 900 s), and so does jaxmixed
(--jax-timeout, default 900 s); a timeout is reported as such, never as a result.
The CSV for each size is written to a temporary directory (removed afterwards).
--profile: runs pyinstrument on the jaxmixed fit of the largest size and prints the report.

--fake-ncpu N (workaround, jaxmixed child only): jaxlib 0.10.2's CPU LAPACK kernels
(lapack_dpotrf_ffi / lapack_dtrsm_ffi -> jax::ParallelBatchMap) run batch chunks on XLA's
intra-op thread pool and block a pool worker waiting for them; when the compiled program runs
as many independent batched Cholesky/triangular-solve thunks at once as the pool has workers
(the pool is sized from the CPU affinity mask: 2 workers on a 2-CPU machine), every worker
waits and the fit deadlocks (all threads in futex wait, 0% CPU). With --fake-ncpu N an
LD_PRELOAD shim (compiled here with gcc) makes sched_getaffinity report N CPUs, so XLA's pool
gets N workers; the process still runs on the real CPUs. Not needed with jax >= 0.11.2, whose
open-source builds compile that parallel path out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd

SEED = 20240611
N_OCC = 10
PHI = 0.6
SIGMA = 1.5
BETA = (10.0, 2.0)
G_SD = (2.0, 0.5)
G_CORR = 0.3

JAX_CHILD = r'''
import json, sys, time
t_start = time.perf_counter()
import pandas as pd
import jaxmixed as jm
csv, repeat, profile = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
df = pd.read_csv(csv)
t_ready = time.perf_counter()
times = []
prof_text = None
for i in range(repeat):
    if profile and i == 0:
        from pyinstrument import Profiler
        prof = Profiler(interval=0.005)
        prof.start()
    t0 = time.perf_counter()
    r = jm.fit("y ~ t + (1 + t | id)", df, "reml", residuals=jm.ar(1, time="t"))
    times.append(time.perf_counter() - t0)
    if i == 0:  # the peak so far: that of a process making this one fit (as nlme's child does)
        import resource
        first_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if profile and i == 0:
        prof.stop()
        prof_text = prof.output_text(unicode=False, color=False, show_all=False)
rnd = {str(n): float(v) for n, v in zip(r.random["name"], r.random["estimate"])}
out = dict(fit_s=times, load_s=t_ready - t_start, loglik=float(r.loglik), first_fit_peak_rss_mb=first_peak_mb,
           converged=bool(r.converged), singular=bool(r.singular),
           fixed={str(k): float(v) for k, v in r.fixed["coef"].items()}, random=rnd)
print("RESULT " + json.dumps(out))
if prof_text:
    print("PROFILE_BEGIN\n" + prof_text + "\nPROFILE_END")
'''

R_CHILD = r'''
suppressPackageStartupMessages({library(nlme); library(jsonlite)})
args <- commandArgs(trailingOnly = TRUE)
t_start <- proc.time()[["elapsed"]]
df <- read.csv(args[1])
t_ready <- proc.time()[["elapsed"]]
err <- NULL
t0 <- proc.time()[["elapsed"]]
fit <- tryCatch(lme(y ~ t, data = df, random = ~ 1 + t | id,
                    correlation = corAR1(form = ~ t | id), method = "REML"),
                error = function(e) e)
el <- proc.time()[["elapsed"]] - t0
if (inherits(fit, "error")) {
  out <- list(fit_s = el, error = conditionMessage(fit))
} else {
  V <- as.matrix(getVarCov(fit)); sds <- sqrt(diag(V))
  out <- list(fit_s = el, load_s = t_ready - t_start, loglik = as.numeric(logLik(fit)),
              fixed = as.list(fixef(fit)),
              random = list(`sd(_cons)` = sds[[1]], `sd(t)` = sds[[2]],
                            `corr(t,_cons)` = V[1, 2] / prod(sds), `sd(e)` = fit$sigma,
                            rho = as.numeric(coef(fit$modelStruct$corStruct, unconstrained = FALSE))),
              nlme = as.character(packageVersion("nlme")), R = R.version.string)
}
cat("RESULT ", toJSON(out, auto_unbox = TRUE, digits = NA), "\n", sep = "")
'''


def simulate(n_subj: int, seed: int = SEED) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    G = np.array([[G_SD[0] ** 2, G_CORR * G_SD[0] * G_SD[1]],
                  [G_CORR * G_SD[0] * G_SD[1], G_SD[1] ** 2]])
    b = rng.multivariate_normal(np.zeros(2), G, size=n_subj)
    t = np.arange(N_OCC, dtype=float)
    e = np.empty((n_subj, N_OCC))
    e[:, 0] = rng.normal(0.0, SIGMA, n_subj)
    innov = rng.normal(0.0, SIGMA * np.sqrt(1 - PHI ** 2), (n_subj, N_OCC - 1))
    for j in range(1, N_OCC):
        e[:, j] = PHI * e[:, j - 1] + innov[:, j - 1]
    y = BETA[0] + BETA[1] * t[None, :] + b[:, [0]] + b[:, [1]] * t[None, :] + e
    return pd.DataFrame({"id": np.repeat(np.arange(1, n_subj + 1), N_OCC),
                         "t": np.tile(t, n_subj).astype(int),
                         "y": y.ravel()})


TIME_V = Path("/usr/bin/time").exists()

SHIM_C = r'''
#define _GNU_SOURCE
#include <sched.h>
#include <stdlib.h>
#include <dlfcn.h>
/* report FAKE_NCPU CPUs from sched_getaffinity (XLA sizes its intra-op pool from it) */
int sched_getaffinity(pid_t pid, size_t sz, cpu_set_t *mask) {
  static int (*real)(pid_t, size_t, cpu_set_t *) = 0;
  if (!real) real = (int (*)(pid_t, size_t, cpu_set_t *))dlsym(RTLD_NEXT, "sched_getaffinity");
  int r = real(pid, sz, mask);
  const char *e = getenv("FAKE_NCPU");
  if (r != 0 || !e) return r;
  CPU_ZERO_S(sz, mask);
  for (int i = 0; i < atoi(e) && i < (int)(sz * 8); i++) CPU_SET_S(i, sz, mask);
  return 0;
}
'''


def build_shim(tmp: Path) -> Path:
    src, lib = tmp / "fakecpus.c", tmp / "fakecpus.so"
    src.write_text(SHIM_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(src), "-ldl"], check=True)
    return lib


def run_child(cmd: list[str], timeout: float | None, env=None) -> dict:
    """Run cmd (under /usr/bin/time -v if present); wall time, peak RSS, stdout, timeout flag."""
    full = (["/usr/bin/time", "-v"] + cmd) if TIME_V else cmd
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    p = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env=env)
    timed_out = False
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(p.pid, signal.SIGKILL)  # the child's own process group (start_new_session)
        out, err = p.communicate()
    wall = time.perf_counter() - t0
    rss_kb = None
    if TIME_V:
        for line in err.splitlines():
            if "Maximum resident set size" in line:
                rss_kb = int(line.split(":")[-1])
    if rss_kb is None and not timed_out:
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        rss_kb = after if after > before else None  # max over all children: only if it grew
    res = None
    for line in out.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
    prof = None
    if "PROFILE_BEGIN" in out:
        prof = out.split("PROFILE_BEGIN", 1)[1].split("PROFILE_END", 1)[0]
    return dict(wall_s=wall, peak_rss_mb=None if rss_kb is None else rss_kb / 1024.0,
                result=res, timed_out=timed_out, rc=p.returncode,
                stderr_tail="\n".join(err.splitlines()[-15:]), profile=prof)


def fmt(x, spec=".2f", none="n/a"):
    return none if x is None else format(x, spec)


def machine() -> str:
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f", {int(line.split()[1]) / 1024 ** 2:.1f} GiB RAM"
    except OSError:
        pass
    load = ""
    try:
        load = ", load average " + " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        pass
    return f"nproc {os.cpu_count()}, CPU {model}{mem}, {platform.platform()}{load}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--nlme-timeout", type=float, default=900.0)
    ap.add_argument("--repeat", type=int, default=2, help="jaxmixed fits per process (1st = cold)")
    ap.add_argument("--profile", action="store_true", help="pyinstrument the largest jaxmixed fit")
    ap.add_argument("--jax-timeout", type=float, default=900.0)
    ap.add_argument("--fake-ncpu", type=int, default=0,
                    help="jaxmixed child: XLA thread pool of N workers (deadlock workaround, see top)")
    ap.add_argument("--skip-nlme", action="store_true")
    ap.add_argument("--json", type=Path, help="also write all figures to this JSON file")
    args = ap.parse_args()

    rscript = shutil.which("Rscript")
    print(f"machine: {machine()}")
    print(f"python {platform.python_version()}, peak memory via "
          f"{'/usr/bin/time -v' if TIME_V else 'getrusage(RUSAGE_CHILDREN)'}")
    records = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_residuals_"))
    try:
        (tmp / "jax_child.py").write_text(JAX_CHILD)
        (tmp / "nlme_child.R").write_text(R_CHILD)
        jax_env = None
        if args.fake_ncpu:
            jax_env = dict(os.environ, LD_PRELOAD=str(build_shim(tmp)), FAKE_NCPU=str(args.fake_ncpu))
            print(f"jaxmixed child: LD_PRELOAD affinity shim, XLA pool sized for {args.fake_ncpu} CPUs")
        import jax
        print(f"jax {jax.__version__}; R nlme via {rscript}")
        for n in args.subjects:
            df = simulate(n)
            csv = tmp / f"sim_{n}.csv"
            df.to_csv(csv, index=False, float_format="%.17g")
            print(f"\n=== {n} subjects x {N_OCC} occasions = {len(df):,} rows "
                  f"(seed {SEED}, phi {PHI}, sigma {SIGMA}) ===", flush=True)
            prof = args.profile and n == max(args.subjects)
            # two jaxmixed processes on a compilation cache of their own: the first finds it
            # empty (cold: every program traced and compiled), the second filled (warm cache)
            env = dict(jax_env or os.environ, JAXMIXED_CACHE_DIR=str(tmp / f"cache_{n}"))
            runs = []
            for label in ("empty cache", "warm cache"):
                jx = run_child([sys.executable, str(tmp / "jax_child.py"), str(csv),
                                str(args.repeat), "1" if prof and not runs else "0"],
                               timeout=args.jax_timeout, env=env)
                if jx["result"] is None and not jx["timed_out"]:
                    print(f"jaxmixed ({label}) FAILED rc", jx["rc"], "\n", jx["stderr_tail"])
                runs.append(jx)
            jx, jxw = runs
            nl = None
            if not args.skip_nlme and rscript:
                print(f"  (nlme running, limit {args.nlme_timeout:.0f} s)", flush=True)
                nl = run_child([rscript, str(tmp / "nlme_child.R"), str(csv)],
                               timeout=args.nlme_timeout)
                if nl["result"] is None and not nl["timed_out"]:
                    print("nlme FAILED rc", nl["rc"], "\n", nl["stderr_tail"])
            rec = dict(subjects=n, rows=len(df), jaxmixed=jx, jaxmixed_warm_cache=jxw, nlme=nl)
            records.append(rec)
            report(rec, args.nlme_timeout, args.jax_timeout)
            if jx.get("profile"):
                print("\n--- pyinstrument: first (cold) jaxmixed fit ---")
                print(jx["profile"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(dict(machine=machine(), records=records), indent=1,
                                        default=str))
    return 0


def report(rec: dict, limit: float, jax_limit: float) -> None:
    nl = rec["nlme"]
    lines = []  # (label, first fit, refit, process)
    for label, jx in (("empty cache", rec["jaxmixed"]), ("warm cache", rec["jaxmixed_warm_cache"])):
        jr = jx["result"] or {}
        fits = jr.get("fit_s", [])
        first = fits[0] if fits else None
        again = fits[1] if len(fits) > 1 else None
        if jx["timed_out"]:
            print(f"  jaxmixed ({label}): TIMED OUT after {jax_limit:.0f} s (killed; see --fake-ncpu at "
                  f"the top for the known XLA:CPU deadlock)")
            continue
        print(f"  jaxmixed ({label}): first fit {fmt(first)} s"
              + (f", refit {fmt(again)} s" if again is not None else "")
              + f"; total process {fmt(jx['wall_s'])} s; peak RSS {fmt(jx['peak_rss_mb'], '.0f')} MB"
              f" ({fmt(jr.get('first_fit_peak_rss_mb'), '.0f')} MB up to the end of the first fit);"
              f" logLik {fmt(jr.get('loglik'), '.6f')}; converged {jr.get('converged')},"
              f" singular {jr.get('singular')}")
        if jr:
            print("            fixed " + json.dumps({k: round(v, 6) for k, v in jr["fixed"].items()})
                  + "  random " + json.dumps({k: round(v, 6) for k, v in jr["random"].items()}))
            lines.append((label, first, again, jx, jr))
    if nl is None:
        print("  nlme: not run")
        return
    if nl["timed_out"]:
        print(f"  nlme: TIMED OUT after {limit:.0f} s (killed)")
        return
    nr = nl["result"] or {}
    if "error" in nr or not nr:
        print(f"  nlme: ERROR {nr.get('error', nl['stderr_tail'])} after {fmt(nr.get('fit_s'))} s")
        return
    print(f"  nlme:     fit {fmt(nr['fit_s'])} s; total Rscript {fmt(nl['wall_s'])} s; peak RSS "
          f"{fmt(nl['peak_rss_mb'], '.0f')} MB; logLik {fmt(nr['loglik'], '.6f')}")
    print("            fixed " + json.dumps({k: round(v, 6) for k, v in nr["fixed"].items()})
          + "  random " + json.dumps({k: round(v, 6) for k, v in nr["random"].items()}))
    for label, first, again, jx, jr in lines:
        if first:
            print(f"  ratios nlme/jaxmixed ({label}): first fit {nr['fit_s'] / first:.3g}x"
                  + (f", refit {nr['fit_s'] / again:.3g}x" if again else "")
                  + f"; total {nl['wall_s'] / jx['wall_s']:.3g}x"
                  + (f"; peak RSS jaxmixed/nlme {jx['peak_rss_mb'] / nl['peak_rss_mb']:.2f}x (process),"
                     f" {jr['first_fit_peak_rss_mb'] / nl['peak_rss_mb']:.2f}x (one fit, as nlme's)"
                     if nl["peak_rss_mb"] and jx["peak_rss_mb"] else "")
                  + f"; logLik jaxmixed - nlme = {jr['loglik'] - nr['loglik']:.3e}")


if __name__ == "__main__":
    sys.exit(main())
