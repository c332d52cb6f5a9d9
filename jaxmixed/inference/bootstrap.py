"""Parametric bootstrap: percentile intervals for a fit, and a bootstrap likelihood-ratio test.

Draws are simulated from the fitted model,

    y* = Xβ̂ + Σ_f Z_f b*_f + ε*,   b*_f ~ N(0, σ̂² Λ̂_f Λ̂_fᵀ) per level,   ε* ~ N(0, σ̂² I),

on the observations the fit used, and refitted with the batched fitter of :mod:`jaxmixed.fit.batched`
(one vmapped program; each draw fitted as ``jm.fit`` would, started from the fit's θ̂). Draw d
uses the key ``jax.random.split(jax.random.key(seed), n)[d]``, so results depend only on
``seed`` and ``n`` (not on chunking or the device).

Percentile intervals are reported for every fixed effect and every row of ``FitResult.random``
(in the fit's metric: sd/corr, or var/cov for a fit with ``variance=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxmixed.inference import distributions as sps
from jaxmixed.inference.compare import LRTest, lrtest
from jaxmixed.errors import ModelError, integer_argument
from jaxmixed.engine.pls import factor_lambdas
from jaxmixed.fit.batched import fit_responses
from jaxmixed.inference.tables import component_layout, component_values
from jaxmixed.runtime import programs
from jaxmixed.runtime.devices import put, resolve_device

__all__ = ["BootstrapResult", "BootstrapLRTest", "bootstrap", "bootstrap_lrtest", "simulate"]

SIM_BLOCK = 64  # draws are simulated in blocks of this many (one compiled shape)


@programs.tracked
@partial(jax.jit, static_argnames=("n_levels",))
def _simulate_block(keys, xb, sigma, lams, codes, Zs, n_levels):
    """(nobs, len(keys)) responses, one column per key."""

    def one(key):
        ks = jax.random.split(key, len(n_levels) + 1)
        y = xb + sigma * jax.random.normal(ks[-1], xb.shape, dtype=xb.dtype)
        for f, L in enumerate(n_levels):
            lam = lams[f]
            u = jax.random.normal(ks[f], (L, lam.shape[0]), dtype=xb.dtype)
            b = sigma * u @ lam.T  # rows ~ N(0, σ² Λ Λᵀ)
            y = y + jnp.sum(Zs[f] * b[codes[f]], axis=1)
        return y

    return jax.vmap(one)(keys).T


class _Simulator:
    """Draws from a fitted model, by index range (reproducible per draw)."""

    def __init__(self, result, n: int, seed: int, device=None):
        _check_simulable(result)
        des = result.design
        dev = resolve_device(device)
        struct = result.engine.shape
        self.keys = jax.random.split(jax.random.key(int(seed)), int(n))
        lams = tuple(factor_lambdas(jnp.asarray(result.theta), struct))
        self.args = put((jnp.asarray(des.X @ np.asarray(result.beta)), jnp.asarray(float(result.sigma)), lams,
                         tuple(jnp.asarray(f.codes) for f in des.factors),
                         tuple(jnp.asarray(f.Z) for f in des.factors)), dev)
        self.n_levels = tuple(int(f.n_levels) for f in des.factors)
        self.dev = dev

    def __call__(self, i: int, j: int) -> np.ndarray:
        out = []
        for a in range(i, j, SIM_BLOCK):
            b = min(a + SIM_BLOCK, j)
            keys = self.keys[a:b]
            if b - a < SIM_BLOCK:  # pad to the block size (one compiled shape)
                keys = jnp.concatenate([keys, jnp.repeat(keys[:1], SIM_BLOCK - (b - a), axis=0)])
            Y = _simulate_block(put(keys, self.dev), *self.args, n_levels=self.n_levels)
            out.append(np.asarray(Y)[:, : b - a])
        return np.concatenate(out, axis=1)


def _check_simulable(result):
    if not result.engine.supports_batched:
        raise ModelError("bootstrap supports models with independent, homoskedastic residuals only "
                         "(this fit has a residuals() structure)")
    if not np.all(np.isfinite(np.asarray(result.theta))) or not np.isfinite(result.sigma):
        raise ModelError("bootstrap needs finite estimates; this fit broke down")


def simulate(result, n: int = 1, seed: int = 0, device=None) -> np.ndarray:
    """``n`` responses simulated from a fitted model (nobs × n), the bootstrap's draws: column d
    is the same whatever ``n`` ≥ d+1. Rows follow the observations the fit used
    (``result.design.rows`` of the data)."""
    n = integer_argument(n, "n")
    if getattr(result, "family", None) is not None:  # a GLMM: draws from its family (numpy)
        from jaxmixed.inference import glmm

        return glmm.simulate(result, n, seed)
    return _Simulator(result, n, seed, device)(0, n)


def _labels(result) -> list[str]:
    random = [f"{g}: {nm}" if g else nm for g, nm in zip(result.random.group, result.random.name)]
    return list(result.fixed.index) + random


@dataclass(frozen=True)
class BootstrapResult:
    """A parametric bootstrap of a fit (``FitResult.bootstrap``).

    table   DataFrame indexed by parameter (fixed effects, then FitResult.random's rows as
            "group: name"): estimate (the fit's), mean, se (sd of the draws), ci_lower,
            ci_upper (percentile interval at ``level``)
    draws   DataFrame, one row per successful draw, one column per parameter
    n, n_failed (draws whose refit broke down, left out), n_nonconverged (kept), seed, level
    """

    table: pd.DataFrame
    draws: pd.DataFrame
    n: int
    n_failed: int
    n_nonconverged: int
    seed: int
    level: float
    method: str
    notes: tuple = ()
    theta: Any = field(default=None, repr=False)  # (n, n_theta) refitted θ

    def __str__(self) -> str:
        head = (f"Parametric bootstrap: {self.n} draws ({self.n_failed} failed, {self.n_nonconverged} not converged), "
                f"seed {self.seed}, {self.method.upper()}, {self.level:g}% percentile intervals")
        return head + "\n" + self.table.to_string(float_format=lambda v: f"{v:.6g}")


def _params(result, raw) -> np.ndarray:
    """(k × parameters) in the fit's metric: β then the random-effects rows."""
    layout = component_layout(result.design.terms, bool(result.variance),
                              result.engine.residual_rows(bool(result.variance)))
    est, *_ = component_values(raw["eta"], layout)
    return np.concatenate([raw["beta"], est], axis=1)


def bootstrap(result, n: int = 1000, seed: int = 0, level: float | None = None, *, chunk_size: int | None = None,
              progress: bool = False, device=None) -> BootstrapResult:
    """Parametric bootstrap of a fitted model (see the module docstring).

    n          number of draws
    seed       integer seed of ``jax.random`` (same seed and n: same draws, same intervals)
    level      confidence level in percent (default: the fit's ``level``, 95 unless set)
    chunk_size, progress, device   as for ``jm.fit_many``
    """
    n = integer_argument(n, "n", 2)
    level = float(result.level if level is None else level)
    if not (10.0 <= level <= 99.99):
        raise ModelError(f"level must be between 10 and 99.99, not {level}")
    if getattr(result, "family", None) is not None:  # a GLMM: simulate from its family, refit, vmapped
        from jaxmixed.inference import glmm

        P, ok, converged, x = glmm.bootstrap_draws(result, n, seed, chunk_size, progress)
        p = result.design.p
        theta = x[:, p:p + result.engine.shape.re.n_theta]
    else:
        sim = _Simulator(result, n, seed, device)
        reml = result.method == "reml"
        raw = fit_responses(result.design, sim, n, reml, chunk_size=chunk_size, progress=progress, device=device,
                            engine=result.engine.shape.kind,
                            hessian=False, label="bootstrap", warm_start=np.asarray(result.theta))
        P = _params(result, raw)
        ok = np.isfinite(raw["fun"]) & np.all(np.isfinite(raw["beta"]), axis=1)
        converged, theta = raw["opt_converged"], raw["theta"]
    labels = _labels(result)
    draws = pd.DataFrame(P[ok], columns=labels)
    alpha = 1.0 - level / 100.0
    est = np.concatenate([result.fixed["coef"].to_numpy(), result.random["estimate"].to_numpy()])
    with np.errstate(invalid="ignore"):
        table = pd.DataFrame({
            "estimate": est,
            "mean": np.nanmean(P[ok], axis=0) if ok.any() else np.nan,
            "se": np.nanstd(P[ok], axis=0, ddof=1) if ok.sum() > 1 else np.nan,
            "ci_lower": np.nanquantile(P[ok], alpha / 2, axis=0) if ok.any() else np.nan,
            "ci_upper": np.nanquantile(P[ok], 1 - alpha / 2, axis=0) if ok.any() else np.nan,
        }, index=pd.Index(labels, name="parameter"))
    n_failed = int((~ok).sum())
    n_nc = int((ok & ~converged).sum())
    notes = []
    if n_failed:
        notes.append(f"{n_failed} draw(s) left out: the refit broke down")
    if n_nc:
        notes.append(f"{n_nc} draw(s) kept although the optimiser did not meet its tolerance")
    return BootstrapResult(table=table, draws=draws, n=n, n_failed=n_failed, n_nonconverged=n_nc, seed=int(seed),
                           level=level, method=result.method, notes=tuple(notes), theta=theta[ok])


class BootstrapLRTest(LRTest):
    """(stat, df, p) with p the parametric-bootstrap p-value, plus ``p_chi2`` (the asymptotic
    χ²(df) p-value), ``n``, ``n_valid``, ``seed`` and ``draws`` (the simulated LR statistics)."""

    def __new__(cls, stat, df, p, note="", *, p_chi2=np.nan, n=0, n_valid=0, seed=0, draws=None):
        obj = super().__new__(cls, stat, df, p, note)
        obj.p_chi2, obj.n, obj.n_valid, obj.seed = p_chi2, n, n_valid, seed
        obj.draws = np.asarray(draws if draws is not None else [])
        return obj

    def __repr__(self):
        return (f"BootstrapLRTest(stat={self[0]:.4f}, df={self[1]}, p={self[2]:.4g}, p_chi2={self.p_chi2:.4g}, "
                f"n={self.n}, n_valid={self.n_valid})")


def bootstrap_lrtest(a, b, n: int = 1000, seed: int = 0, *, chunk_size: int | None = None, progress: bool = False,
                     device=None) -> BootstrapLRTest:
    """Parametric-bootstrap likelihood-ratio test of the smaller of two nested fits against
    the larger: draws are simulated from the smaller (the null) model, both models are refitted
    to every draw, and p = (1 + #{LR* ≥ LR}) / (1 + draws). Unlike the χ² reference
    distribution this stays valid when the null puts a variance on its boundary.

    Both fits must use the same observations and criterion (and, for REML, the same fixed
    effects), as for ``jm.lrtest``. GLMMs too (same family, link and integration method): the
    draws come from the null GLMM's family, and each model's refits run in one vmapped program
    (``device`` is then JAX's default).
    """
    n = integer_argument(n, "n", 2)
    observed = lrtest(a, b)  # same criterion, observations, REML rule and nesting checks
    if not np.array_equal(np.asarray(a.design.rows), np.asarray(b.design.rows)):
        raise ModelError("bootstrap_lrtest: the models use different observations")
    small, big = (a, b) if a.n_params <= b.n_params else (b, a)
    df, stat = observed.df, observed.stat
    if getattr(small, "family", None) is not None:  # GLMMs: one vmapped program per model
        from jaxmixed.inference import glmm

        f_small, f_big = glmm.lrtest_draws(small, big, n, seed, chunk_size, progress)
        lr = f_small - f_big
    else:
        _check_simulable(big)
        sim = _Simulator(small, n, seed, device)
        reml = small.method == "reml"
        kw = dict(chunk_size=chunk_size, progress=progress, device=device, hessian=False)
        r_small = fit_responses(small.design, sim, n, reml, label="bootstrap_lrtest (null model)",
                                engine=small.engine.shape.kind,
                                warm_start=np.asarray(small.theta), **kw)
        r_big = fit_responses(big.design, sim, n, reml, label="bootstrap_lrtest (alternative)",
                              engine=big.engine.shape.kind,
                              warm_start=np.asarray(big.theta), **kw)
        lr = r_small["fun"] - r_big["fun"]  # 2(ℓ_big − ℓ_small): fun is −2ℓ
    ok = np.isfinite(lr)
    lr = np.maximum(lr[ok], 0.0)
    n_valid = int(ok.sum())
    tol = 1e-8 * (1.0 + stat)
    p = (1.0 + float(np.sum(lr >= stat - tol))) / (1.0 + n_valid)
    note = f"parametric bootstrap with {n_valid} valid draw(s) of {n}"
    if len(big.random) != len(small.random):
        note += "; the null puts a variance on its boundary (the χ² p-value p_chi2 is conservative)"
    return BootstrapLRTest(stat, df, p, note, p_chi2=float(sps.chi2.sf(stat, df)), n=n, n_valid=n_valid,
                           seed=int(seed), draws=lr)
