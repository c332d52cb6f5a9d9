"""Data beyond memory (issue #16): fits streamed from Parquet against pyarrow's own read time.

    python scripts/bench_big.py                      # 100M rows / 100k groups and 10M crossed rows
    python scripts/bench_big.py --rows 20000000      # smaller
    python scripts/bench_big.py --skip-lme4 --skip-dask

Data (simulated once with fixed seeds into --dir, kept for reruns):

- ``slopes``: ``y ~ x1 + x2 + x3 + (1 + x1 | g)``, --rows rows (default 100,000,000) in ten
  Parquet files, --groups groups (default 100,000), rows in random group order;
- ``crossed``: InstEval-style ``y ~ 1 + (1|s) + (1|d) + (1|dept)``, --crossed-rows rows (default
  10,000,000) over InstEval's levels: 2,972 students each rating 25 of 1,128 lecturers (nested
  in 14 departments) repeatedly, so the model is InstEval's size and the rows 136 times as many.

Every measurement runs in its own fresh process (``python scripts/bench_big.py --child ...``),
so each peak memory (``ru_maxrss``, the whole process: Python, JAX, pyarrow) is its own:

1. pyarrow reading the model's columns once (``pyarrow.parquet.read_table``) and streaming them
   in record batches (``Dataset.to_batches``);
2. ``jm.fit(formula, "dir/*.parquet")``, in two fresh processes: the first compiles the model's
   programs (JAX's persistent cache as it is), the second finds them in the cache (reported);
3. the in-memory fit (pandas) of one file (a 10M-row sample), also twice, and the streamed fit
   of the same file (same rows: the log likelihoods must agree to 1e-10);
4. lme4's ``lmer`` on what it can hold (CSV samples of 1M and 10M rows; its fit call only);
5. Dask on a LocalCluster with 2 worker processes on the same files (``dd.read_parquet``).

Results are printed with the machine and written to scripts/bench_big_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SLOPES = "y ~ x1 + x2 + x3 + (1 + x1 | g)"
CROSSED = "y ~ 1 + (1|s) + (1|d) + (1|dept)"
LME4 = {"slopes": "y ~ x1 + x2 + x3 + (1 + x1 | g)", "crossed": "y ~ 1 + (1|s) + (1|d) + (1|dept)"}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------- simulation


def simulate_slopes(folder: Path, rows: int, groups: int, files: int = 10) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261201)
    u0 = rng.standard_normal(groups) * 1.0
    u1 = rng.standard_normal(groups) * 0.5
    per = rows // files
    for k in range(files):
        n = per if k < files - 1 else rows - per * (files - 1)
        g = rng.integers(0, groups, n)
        x1, x2, x3 = rng.standard_normal((3, n))
        y = 1.0 + 0.5 * x1 - 0.3 * x2 + 0.2 * x3 + u0[g] + u1[g] * x1 + rng.standard_normal(n)
        pq.write_table(pa.table({"g": g, "x1": x1, "x2": x2, "x3": x3, "y": y}), folder / f"part-{k:02d}.parquet",
                       row_group_size=1 << 20)
        del g, x1, x2, x3, y


def simulate_crossed(folder: Path, rows: int, files: int = 4) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(73421)
    S, D, DEPT, K = 2_972, 1_128, 14, 25
    dept_of = rng.integers(0, DEPT, D)
    rated = np.stack([rng.choice(D, K, replace=False) for _ in range(S)])  # each student's lecturers
    us, ud, udept = rng.standard_normal(S) * 0.32, rng.standard_normal(D) * 0.51, rng.standard_normal(DEPT) * 0.08
    per = rows // files
    for k in range(files):
        n = per if k < files - 1 else rows - per * (files - 1)
        s = rng.integers(0, S, n)
        d = rated[s, rng.integers(0, K, n)]
        y = 3.2 + us[s] + ud[d] + udept[dept_of[d]] + rng.standard_normal(n) * 1.18
        pq.write_table(pa.table({"s": s, "d": d, "dept": dept_of[d], "y": y}), folder / f"part-{k:02d}.parquet",
                       row_group_size=1 << 20)


def csv_sample(folder: Path, out: Path, rows: int) -> None:
    """The first ``rows`` rows of the files (in name order) as a CSV for R."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if out.exists():
        return
    tables, n = [], 0
    for f in sorted(folder.glob("*.parquet")):
        tables.append(pq.read_table(f))
        n += tables[-1].num_rows
        if n >= rows:
            break
    pa.concat_tables(tables).slice(0, rows).to_pandas().to_csv(out, index=False)


# ---------------------------------------------------------------------------------- children


def child(kind: str, args: list[str]) -> dict:
    if kind == "read":
        import pyarrow.dataset as ds
        import pyarrow.parquet as pq

        files = sorted(Path(args[0]).glob("*.parquet"))
        cols = args[1].split(",")
        t = time.perf_counter()
        table = pq.read_table([str(f) for f in files], columns=cols)
        t_table = time.perf_counter() - t
        n = table.num_rows
        del table
        t = time.perf_counter()
        rows = sum(b.num_rows for b in ds.dataset([str(f) for f in files]).to_batches(columns=cols,
                                                                                       batch_size=1 << 18))
        return {"read_table_s": t_table, "to_batches_s": time.perf_counter() - t, "rows": n, "rows_batches": rows,
                "peak_mb": peak_mb()}
    import jaxmixed as jm

    if kind == "stream":
        formula, src = args[0], args[1]
        t = time.perf_counter()
        r = jm.fit(formula, src, method="ml")
        return _summary(r, time.perf_counter() - t)
    if kind == "memory":
        import pandas as pd

        formula, path = args
        t = time.perf_counter()
        df = pd.read_csv(path) if path.endswith(".csv") else pd.read_parquet(path)
        t_read = time.perf_counter() - t
        t = time.perf_counter()
        r = jm.fit(formula, df, method="ml")
        out = _summary(r, time.perf_counter() - t)
        out["read_s"] = t_read
        return out
    if kind == "dask":
        import dask.dataframe as dd
        from distributed import Client, LocalCluster

        formula, pattern = args
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=40) as cluster, Client(cluster):
            t = time.perf_counter()
            r = jm.fit(formula, dd.read_parquet(pattern), method="ml")
            return _summary(r, time.perf_counter() - t)
    raise SystemExit(f"unknown child {kind}")


def _summary(r, wall: float) -> dict:
    return {"fit_s": wall, "loglik": r.loglik, "nobs": r.nobs, "beta": [float(b) for b in r.beta],
            "sigma": r.sigma, "peak_mb": peak_mb(), "converged": bool(r.converged)}


def run_child(kind: str, *args, timeout=3600) -> dict:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--child", kind, *args], capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc {p.returncode}"}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t
    return out


def run_lme4(csv: Path, formula: str, timeout: float) -> dict:
    code = f"""
suppressMessages(library(lme4)); library(data.table)
d <- fread("{csv}")
for (v in intersect(c("g", "s", "d", "dept"), names(d))) d[[v]] <- factor(d[[v]])
gc(reset = TRUE)
t <- system.time(m <- lmer({formula}, data = d, REML = FALSE))[["elapsed"]]
mem <- sum(gc()[, 6])
cat(sprintf('{{"fit_s": %.3f, "loglik": %.6f, "nobs": %d, "r_max_mb": %.1f}}\\n', t, as.numeric(logLik(m)), nobs(m), mem))
"""
    t = time.perf_counter()
    try:
        p = subprocess.run(["Rscript", "-e", code], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return {"error": "Rscript not found"}
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:.0f} s"}
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t
    return out


def machine() -> str:
    import platform

    sys.path.insert(0, str(HERE))
    import bench_glmm

    return f"{bench_glmm.machine()}; Python {platform.python_version()}; load average {os.getloadavg()[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--dir", default="/tmp/jaxmixed_big", help="where the simulated files live (default %(default)s)")
    ap.add_argument("--rows", type=int, default=100_000_000)
    ap.add_argument("--groups", type=int, default=100_000)
    ap.add_argument("--crossed-rows", type=int, default=10_000_000)
    ap.add_argument("--lme4-rows", default="1000000,10000000", help="CSV sample sizes lme4 is given")
    ap.add_argument("--lme4-timeout", type=float, default=1200.0)
    ap.add_argument("--skip-lme4", action="store_true")
    ap.add_argument("--lme4-from", default=None, metavar="JSON",
                    help="take lme4's figures from an earlier results file instead of running it again")
    ap.add_argument("--skip-dask", action="store_true")
    ap.add_argument("--skip-crossed", action="store_true")
    ap.add_argument("--out", default=str(HERE / "bench_big_results.json"))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1:])))
        return
    root = Path(a.dir)
    results = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M"), "cases": {}}
    cases = [("slopes", SLOPES, root / f"slopes_{a.rows}_{a.groups}", "g,x1,x2,x3,y")]
    if not a.skip_crossed:
        cases.append(("crossed", CROSSED, root / f"crossed_{a.crossed_rows}", "s,d,dept,y"))
    for name, formula, folder, cols in cases:
        if not any(folder.glob("*.parquet")):
            t = time.perf_counter()
            if name == "slopes":
                simulate_slopes(folder, a.rows, a.groups)
            else:
                simulate_crossed(folder, a.crossed_rows)
            print(f"[{name}] simulated into {folder} in {time.perf_counter() - t:.0f} s", flush=True)
        pattern = str(folder / "*.parquet")
        first = sorted(folder.glob("*.parquet"))[0]
        res: dict = {"formula": formula}
        res["read"] = run_child("read", str(folder), cols)
        print(f"[{name}] pyarrow: read_table {res['read'].get('read_table_s', float('nan')):.2f} s, "
              f"to_batches {res['read'].get('to_batches_s', float('nan')):.2f} s, {res['read'].get('rows')} rows",
              flush=True)
        res["stream_first"] = run_child("stream", formula, pattern)
        res["stream"] = run_child("stream", formula, pattern)
        s = res["stream"]
        print(f"[{name}] jaxmixed from Parquet: {s.get('fit_s', float('nan')):.2f} s (first process "
              f"{res['stream_first'].get('fit_s', float('nan')):.2f} s), peak {s.get('peak_mb', float('nan')):.0f} MB, "
              f"loglik {s.get('loglik')}", flush=True)
        res["sample_memory_first"] = run_child("memory", formula, str(first))
        res["sample_memory"] = run_child("memory", formula, str(first))
        res["sample_stream"] = run_child("stream", formula, str(first))
        m, ms = res["sample_memory"], res["sample_stream"]
        if "loglik" in m and "loglik" in ms:
            res["sample_loglik_rel_diff"] = abs(m["loglik"] - ms["loglik"]) / abs(m["loglik"])
        print(f"[{name}] sample ({m.get('nobs')} rows): in memory {m.get('fit_s', float('nan')):.2f} s fit "
              f"(+{m.get('read_s', float('nan')):.2f} s read), peak {m.get('peak_mb', float('nan')):.0f} MB; streamed "
              f"{ms.get('fit_s', float('nan')):.2f} s, peak {ms.get('peak_mb', float('nan')):.0f} MB; loglik rel diff "
              f"{res.get('sample_loglik_rel_diff')}", flush=True)
        if not a.skip_dask:
            res["dask"] = run_child("dask", formula, pattern)
            d = res["dask"]
            if "loglik" in d and "loglik" in s:
                res["dask_loglik_rel_diff"] = abs(d["loglik"] - s["loglik"]) / abs(s["loglik"])
            print(f"[{name}] Dask LocalCluster (2 workers): {d.get('fit_s', d.get('error'))} s, loglik rel diff "
                  f"{res.get('dask_loglik_rel_diff')}", flush=True)
        if not a.skip_lme4:
            res["lme4"], res["jaxmixed_on_lme4_sample"] = {}, {}
            earlier = json.loads(Path(a.lme4_from).read_text())["cases"][name]["lme4"] if a.lme4_from else {}
            for n in [int(x) for x in a.lme4_rows.split(",") if x]:
                csv = folder / f"sample_{n}.csv"
                csv_sample(folder, csv, n)
                r = earlier[str(n)] if str(n) in earlier else run_lme4(csv, LME4[name], a.lme4_timeout)
                res["lme4"][str(n)] = r
                j = run_child("memory", formula, str(csv))
                res["jaxmixed_on_lme4_sample"][str(n)] = j
                ratio = r["fit_s"] / j["fit_s"] if "fit_s" in r and "fit_s" in j else None
                diff = j["loglik"] - r["loglik"] if "loglik" in r and "loglik" in j else None
                print(f"[{name}] lme4 on {n:,} rows: {r.get('fit_s', r.get('error'))} s; jaxmixed (in memory, same "
                      f"CSV) {j.get('fit_s', j.get('error'))} s: {ratio and round(ratio, 1)}×, loglik jaxmixed − lme4 "
                      f"{diff}", flush=True)
        rd = res["read"].get("read_table_s")
        if rd and "fit_s" in s:
            res["ratio_to_read"] = s["fit_s"] / rd
            print(f"[{name}] streamed fit / pyarrow read_table: {res['ratio_to_read']:.2f}× (target ≤ 3×); "
                  f"peak memory {s['peak_mb']:.0f} MB (target ≤ 2048 MB)", flush=True)
        results["cases"][name] = res
        Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"machine: {results['machine']}")


if __name__ == "__main__":
    main()
