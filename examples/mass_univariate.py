"""Mass-univariate mixed models: 2,000 simulated "voxels" that share the JSP design.

Every voxel is a response measured on the same 887 pupils in 48 schools, with its own school
intercepts and slopes; in 300 of them math3 truly predicts the response. ``jm.fit_many`` fits
``y ~ math3c + (1 + math3c || school)`` to all of them in one batched program, and we control
the false discovery rate of the math3c effects with Benjamini-Hochberg.

Run:  python examples/mass_univariate.py      (about half a minute on 2 cores, most of it compiling)
"""

import time

import numpy as np

import jaxmixed as jm

N_VOXELS = 2000
N_ACTIVE = 300

d = jm.datasets.load("jsp")
d["math3c"] = d.math3 - d.math3.mean()

# The design (and a realistic scale) from one fit to the real data.
fit = jm.fit("math5 ~ math3c + (1 + math3c || school)", d)
school = fit.design.factors[0].codes  # level of each pupil's school
x = d.math3c.to_numpy()
sd_cons, sd_slope, sd_res = fit.random.estimate.to_numpy()[[1, 0, 2]]

rng = np.random.default_rng(2024)
slope = np.zeros(N_VOXELS)
slope[:N_ACTIVE] = rng.uniform(0.05, 0.3, N_ACTIVE)  # the active voxels
b0 = rng.normal(0, sd_cons, (48, N_VOXELS))
b1 = rng.normal(0, sd_slope, (48, N_VOXELS))
Y = 30 + x[:, None] * slope + b0[school] + x[:, None] * b1[school] + rng.normal(0, sd_res, (len(d), N_VOXELS))

t0 = time.perf_counter()
res = jm.fit_many("y ~ math3c + (1 + math3c || school)", d, responses=Y, progress=True)
t1 = time.perf_counter()
res = jm.fit_many("y ~ math3c + (1 + math3c || school)", d, responses=Y)  # compiled: the fitting alone
t2 = time.perf_counter()
print(f"{N_VOXELS} voxels: first call {t1 - t0:.1f} s (with compilation), again {t2 - t1:.2f} s")
print(res)

# Benjamini-Hochberg at q = 0.05 on the math3c p-values.
fx = res.fixed[res.fixed.term == "math3c"].set_index("response")
p = fx.p.to_numpy()
order = np.argsort(p)
passed = p[order] <= 0.05 * np.arange(1, N_VOXELS + 1) / N_VOXELS
k = np.max(np.flatnonzero(passed)) + 1 if passed.any() else 0
found = np.zeros(N_VOXELS, dtype=bool)
found[order[:k]] = True
true = slope > 0
print(f"BH discoveries: {found.sum()}  (true positives {np.sum(found & true)} of {N_ACTIVE}, "
      f"false discoveries {np.sum(found & ~true)}, FDP {np.sum(found & ~true) / max(found.sum(), 1):.3f})")

# Variance components across voxels (Stata's metric, as FitResult.random reports them).
w = res.wide()
for col in ("school: sd(_cons)", "school: sd(math3c)", "sd(Residual)"):
    q = np.quantile(w[col], [0.05, 0.5, 0.95])
    print(f"{col:20s} median {q[1]:.3f}   90% of voxels in [{q[0]:.3f}, {q[2]:.3f}]")
print(f"converged {int(res.summary.converged.sum())}/{N_VOXELS}, singular fits {int(res.summary.singular.sum())}")
