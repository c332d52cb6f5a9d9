#!/usr/bin/env python
"""Do two versions of jaxmixed give the same estimates on the benchmark cases?

    git worktree add /tmp/before <commit>
    python scripts/same_estimates.py /tmp/before .          # before, after (package roots)

Each root's package is imported in its own child process (``PYTHONPATH=<root>``, its own empty
compilation cache), fits every case and prints log likelihood, β, θ (or the engine's
parameters), σ and the standard errors; this script then reports the largest relative
difference per case (|a − b| / max(|a|, 1e-8 · scale)) and whether it is within ``--rtol``
(default 1e-8). Cases: the seed models of ``bench.py --case small``, the 1M-row and InstEval
models (``bench.py``'s data in ~/.cache/jaxmixed/data, made by running bench.py once), AR(1)
residuals on 10,000 and 100,000 rows (``bench_residuals.py``'s simulation) and ``fit_many`` on
1,000 simulated JSP responses (``bench_many.py``'s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r'''
import json, os, sys, warnings
import numpy as np, pandas as pd
warnings.simplefilter("ignore")
import jaxmixed as jm
here = sys.argv[1]
sys.path.insert(0, here)
out = {}

def record(name, r):
    out[name] = dict(loglik=[float(r.loglik)], beta=np.asarray(r.beta, float).tolist(),
                     params=np.asarray(r.params, float).ravel().tolist(), sigma=[float(r.sigma)],
                     se=np.asarray(r.random["se"], float).tolist() + np.asarray(r.fixed["se"], float).tolist())

pig, prod, jsp = (jm.datasets.load(n) for n in ("pig", "productivity", "jsp"))
jsp["math3c"] = jsp.math3 - jsp.math3.mean()
for name, f, d in [("pig_ri", "weight ~ week + (1|id)", pig), ("pig_slope", "weight ~ week + (1 + week|id)", pig),
                   ("pig_crossed", "weight ~ week + (1|id) + (1|week)", pig),
                   ("productivity", "gsp ~ private + emp + hwy + water + other + unemp + (1|region) + (1|region:state)", prod),
                   ("jsp", "math5 ~ math3 + (1 + math3 | school)", jsp), ("jsp_c", "math5 ~ math3c + (1 + math3c | school)", jsp)]:
    record(name, jm.fit(f, d))
data = os.path.join(os.path.expanduser("~"), ".cache", "jaxmixed", "data")
for name, f, method, factors in [("million", "y ~ x1 + x2 + x3 + x4 + (1 + x1 | g)", "reml", ["g"]),
                                 ("insteval", "y ~ 1 + service + (1|s) + (1|d) + (1|dept)", "ml", ["s", "d", "dept", "service"])]:
    path = os.path.join(data, name + ".csv")
    if os.path.exists(path):
        d = pd.read_csv(path)
        for c in factors:
            d[c] = d[c].astype(str)
        record(name, jm.fit(f, d, method))
import bench_residuals as br
for n in (1000, 10000):
    record(f"ar1_{n * 10}", jm.fit("y ~ t + (1 + t | id)", br.simulate(n), "reml", residuals=jm.ar(1, time="t")))
from bench_many import FORMULA, simulate
fit = jm.fit(FORMULA, jsp)
res = jm.fit_many(FORMULA, jsp, responses=simulate(fit, 1000, seed=2024))
out["fit_many_1000"] = dict(loglik=np.asarray(res.loglik).tolist(), beta=np.asarray(res.beta).ravel().tolist(),
                            theta=np.asarray(res.theta).ravel().tolist())
print("RESULT " + json.dumps(out))
'''


def run(root: str) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "PYTHONPATH": os.path.abspath(root), "JAXMIXED_CACHE_DIR": cache}
        env.pop("JAXMIXED_NO_CACHE", None)
        p = subprocess.run([sys.executable, "-c", CHILD, here], env=env, capture_output=True, text=True,
                           cwd=tempfile.gettempdir())
    if p.returncode != 0:
        raise SystemExit(f"{root}: failed\n{p.stderr[-3000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rtol", type=float, default=1e-8)
    args = ap.parse_args(argv)
    import numpy as np

    a, b = run(args.before), run(args.after)
    worst_all, ok = 0.0, True
    print(f"{'case':<16} {'quantity':<8} {'max relative difference':>24}")
    for case in a:
        if case not in b:
            print(f"{case:<16} missing in {args.after}")
            ok = False
            continue
        for key in a[case]:
            x, y = np.asarray(a[case][key], float), np.asarray(b[case][key], float)
            if x.shape != y.shape:
                print(f"{case:<16} {key:<8} shapes differ {x.shape} {y.shape}")
                ok = False
                continue
            scale = max(float(np.max(np.abs(x[np.isfinite(x)]), initial=0.0)), 1e-300)
            both = np.isfinite(x) & np.isfinite(y)
            if not np.array_equal(np.isfinite(x), np.isfinite(y)):
                print(f"{case:<16} {key:<8} finite entries differ")
                ok = False
                continue
            rel = np.abs(x[both] - y[both]) / np.maximum(np.abs(x[both]), 1e-8 * scale)
            worst = float(rel.max(initial=0.0))
            worst_all = max(worst_all, worst)
            flag = "" if worst <= args.rtol else "   > rtol"
            ok &= worst <= args.rtol
            print(f"{case:<16} {key:<8} {worst:>24.2e}{flag}")
    print(f"largest relative difference {worst_all:.2e}; within {args.rtol:g}: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
