"""A neural network with random effects: the mixed-model likelihood as an optax training loss.

Simulated clustered data (600 groups, ~10 rows each) with a nonlinear fixed effect of five
covariates and a random intercept and slope per group:

    y = f(x) + b₀_g + b₁_g x₁ + ε,   f(x) = 2 sin(x₀) + x₁² / 2 − x₂ x₃ + 0.5 x₄,
    (b₀, b₁) ~ N(0, diag(1.0², 0.5²)),   ε ~ N(0, 0.5²).

One small MLP (5 → 32 → 32 → 1, tanh), trained three ways with ``optax.adam`` on the same rows,
compared on held-out rows of the same groups (the comparison LMMNN, Simchoni & Rosset 2021,
reports):

(a) the network alone, squared error, ignoring the groups;
(b) the network with a one-hot group embedding in its input, squared error;
(c) the network as the fixed part of a mixed model: the loss is
    ``jaxmixed.functional.nll`` (the marginal likelihood, per group by the Woodbury identity),
    trained jointly with the variance parameters; predictions are η + BLUPs.

Run:  python examples/mixed_network.py      (about 20 s on 2 cores)
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxmixed as jm  # noqa: F401  (turns on float64)
from jaxmixed import functional as F

G, PER, HELD = 600, 10, 3
SD0, SD1, SIGMA = 1.0, 0.5, 0.5


def simulate(seed=0):
    rng = np.random.default_rng(seed)
    n = G * (PER + HELD)
    g = np.repeat(np.arange(G), PER + HELD)
    x = rng.standard_normal((n, 5))
    f = 2 * np.sin(x[:, 0]) + x[:, 1] ** 2 / 2 - x[:, 2] * x[:, 3] + 0.5 * x[:, 4]
    b = rng.standard_normal((G, 2)) * [SD0, SD1]
    y = f + b[g, 0] + b[g, 1] * x[:, 1] + SIGMA * rng.standard_normal(n)
    held = np.tile(np.arange(PER + HELD) >= PER, G)
    return x, y, g, held


def mlp_init(key, d_in, width=32):
    k1, k2, k3 = jax.random.split(key, 3)
    glorot = lambda k, a, b: jax.random.normal(k, (a, b)) * np.sqrt(2.0 / (a + b))  # noqa: E731
    return {"W1": glorot(k1, d_in, width), "b1": jnp.zeros(width), "W2": glorot(k2, width, width),
            "b2": jnp.zeros(width), "W3": glorot(k3, width, 1), "b3": jnp.zeros(1)}


def mlp(w, x):
    h = jnp.tanh(x @ w["W1"] + w["b1"])
    h = jnp.tanh(h @ w["W2"] + w["b2"])
    return (h @ w["W3"] + w["b3"])[:, 0]


def train(loss, params, steps=3000, lr=1e-2):
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps))
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        value, grad = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grad, state, params)
        return optax.apply_updates(params, updates), state, value

    for _ in range(steps):
        params, state, value = step(params, state)
    return params


def main():
    t0 = time.perf_counter()
    x, y, g, held = simulate()
    xt, yt, gt = jnp.asarray(x[~held]), jnp.asarray(y[~held]), jnp.asarray(g[~held])
    xh, yh, gh = jnp.asarray(x[held]), y[held], jnp.asarray(g[held])
    Zt, Zh = jnp.column_stack([jnp.ones(len(yt)), xt[:, 1]]), jnp.column_stack([jnp.ones(len(yh)), xh[:, 1]])
    key = jax.random.PRNGKey(0)
    results = {}

    # (a) the network alone
    wa = train(lambda w: jnp.mean((yt - mlp(w, xt)) ** 2), mlp_init(key, 5))
    results["(a) network, groups ignored"] = np.mean((yh - np.asarray(mlp(wa, xh))) ** 2)

    # (b) a one-hot group indicator as G extra inputs: its first-layer weights are a learned
    # embedding of each group, added to the pre-activation (a lookup, the same function)
    def mlp_b(w, x_, g_):
        h = jnp.tanh(x_ @ w["W1"] + w["E"][g_] + w["b1"])
        h = jnp.tanh(h @ w["W2"] + w["b2"])
        return (h @ w["W3"] + w["b3"])[:, 0]

    wb0 = mlp_init(key, 5)
    wb0["E"] = jax.random.normal(jax.random.PRNGKey(1), (G, 32)) * np.sqrt(2.0 / (G + 32))
    wb = train(lambda w: jnp.mean((yt - mlp_b(w, xt, gt)) ** 2), wb0)
    results["(b) network + one-hot groups"] = np.mean((yh - np.asarray(mlp_b(wb, xh, gh))) ** 2)

    # (c) the mixed-model likelihood: random intercept and slope on x₁, per group
    def loss_c(w):
        return F.nll(mlp(w["net"], xt), yt, gt, w["var"], Zt, n_groups=G) / len(yt)

    wc = train(loss_c, {"net": mlp_init(key, 5), "var": F.init_params(2, sigma=1.0, sd=1.0)})
    b = F.blups(mlp(wc["net"], xt), yt, gt, wc["var"], Zt, n_groups=G)
    pred = F.predict_conditional(mlp(wc["net"], xh), gh, b, Zh)
    results["(c) network + mixed-model likelihood"] = np.mean((yh - np.asarray(pred)) ** 2)

    print(f"{G} groups, {int((~held).sum())} training rows, {int(held.sum())} held-out rows of the same groups")
    print(f"{'':40s} held-out mean squared error")
    for name, mse in results.items():
        print(f"{name:40s} {mse:8.4f}")
    print(f"{'(noise floor: σ² = ' + str(SIGMA ** 2) + ')':40s}")
    rep = F.variance_report(wc["var"], names=["_cons", "x1"])
    truth = {"sd(_cons)": SD0, "sd(x1)": SD1, "corr(_cons,x1)": 0.0, "sd(Residual)": SIGMA}
    print("\nvariance components of (c)      estimate    truth")
    for k, v in rep.items():
        print(f"  {k:28s} {v:9.4f} {truth[k]:8.4f}")
    print(f"\n{time.perf_counter() - t0:.1f} s")
    best = min(results, key=results.get)
    assert best.startswith("(c)"), results


if __name__ == "__main__":
    main()
