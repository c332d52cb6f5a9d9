"""Embedding the mixed-model likelihood in a larger JAX model.

A response depends on a covariate that is an unknown linear combination of five measured
features, x = F a, plus a random intercept per group:

    y = 1 + 2 x + b_group + ε,   b ~ N(0, 1.5²),   ε ~ N(0, 1).

We learn the feature weights a (up to scale, which the slope absorbs) by gradient descent on
the mixed model's ML deviance, two ways:

1. jointly over (a, θ) through ``jaxmixed.functional.deviance`` (β and σ profiled out in closed
   form, θ a free parameter of the optimisation);
2. over a alone, with θ profiled out by the fit itself: ``functional.fit_stats`` returns
   θ̂(a), β̂(a), σ̂(a) and the deviance at the optimum, differentiable in a by implicit
   differentiation through the optimum.

Then one more use of the implicit derivatives: the influence of each observation's weight on
the estimated slope, dβ̂/dw_i, in one reverse pass.

Run:  python examples/embed_deviance.py      (about half a minute on 2 cores, most of it compiling)
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxmixed as jm  # noqa: F401  (turns on float64)
from jaxmixed import functional as F

rng = np.random.default_rng(0)
G, PER, K = 60, 10, 5
n = G * PER
groups = np.repeat(np.arange(G), PER)
feats = jnp.asarray(rng.normal(size=(n, K)))
a_true = np.array([0.8, -0.5, 0.0, 0.3, 0.0])
a_true /= np.linalg.norm(a_true)
y = jnp.asarray(1.0 + 2.0 * np.asarray(feats) @ a_true + 1.5 * rng.normal(size=G)[groups] + rng.normal(size=n))


def design(a):
    """X = [F a/|a|, 1]: the learned covariate and an intercept."""
    x = feats @ (a / jnp.linalg.norm(a))
    return jnp.column_stack([x, jnp.ones(n)])


def stats_of(a):
    return F.stats_from_arrays(y, design(a), groups, n_groups=G)


def adam(loss, params, steps, lr):
    """Plain Adam on a PyTree of parameters (value_and_grad jitted once)."""
    vg = jax.jit(jax.value_and_grad(loss))
    m = jax.tree.map(jnp.zeros_like, params)
    v = jax.tree.map(jnp.zeros_like, params)
    for t in range(1, steps + 1):
        val, g = vg(params)
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, g)
        v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, v, g)
        params = jax.tree.map(lambda p, m, v: p - lr * (m / (1 - 0.9**t)) / (jnp.sqrt(v / (1 - 0.999**t)) + 1e-8),
                              params, m, v)
    return params, float(val)


def cosine(a):
    a = np.asarray(a)
    return float(abs(a @ a_true) / np.linalg.norm(a))


a0 = jnp.asarray(rng.normal(size=K))
print(f"start: |cos(a, a_true)| = {cosine(a0):.3f}")

# 1. joint descent over (a, log θ) on the profiled deviance
t0 = time.perf_counter()
params = {"a": a0, "log_theta": jnp.zeros(1)}
params, dev = adam(lambda p: F.deviance(jnp.exp(p["log_theta"]), stats_of(p["a"]), False), params, 300, 0.05)
print(f"1. joint (a, θ) through functional.deviance: deviance {dev:.3f}, |cos| = {cosine(params['a']):.4f}, "
      f"θ = {float(jnp.exp(params['log_theta'][0])):.3f}  ({time.perf_counter() - t0:.1f} s)")

# 2. θ profiled out by the fit; gradients through the optimum (implicit differentiation)
t0 = time.perf_counter()
a, dev = adam(lambda a: F.fit_stats(stats_of(a), reml=False).deviance, a0, 150, 0.05)
est = jax.jit(lambda a: F.fit_stats(stats_of(a), reml=False))(a)
print(f"2. a alone, θ̂(a) from fit_stats: deviance {dev:.3f}, |cos| = {cosine(a):.4f}, θ̂ = {float(est.theta[0]):.3f}, "
      f"slope {float(est.beta[0]):.3f}, σ̂ {float(est.sigma):.3f}  ({time.perf_counter() - t0:.1f} s)")

# 3. influence of each observation's prior weight on the slope: one reverse pass
X = design(a)
slope_of_w = jax.jit(jax.grad(lambda w: F.fit_arrays(y, X, groups, None, w, n_groups=G, reml=False).beta[0]))
infl = np.asarray(slope_of_w(jnp.ones(n)))
top = np.argsort(-np.abs(infl))[:3]
print("3. most influential observations on the slope (dβ̂/dw_i):",
      ", ".join(f"#{i} ({infl[i]:+.4f})" for i in top))
