"""The per-panel engine: correlated and heteroskedastic residuals (Stata's ``residuals()``).

For each top-level group (panel) i, with all random-effects terms nested in it,

    V_i = Σ_k M_k ∘ (Z_ik Σ_k Z_ikᵀ) + R_i,     M_k[j, l] = [row j and l share term k's level]

and R_i from a :mod:`jaxmixed.model.residuals` structure. With β profiled (GLS),

    ML:   -2ℓ   = Σ log|V_i| + rᵀV⁻¹r + n log 2π
    REML: -2ℓ_R = Σ log|V_i| + log|XᵀV⁻¹X| + rᵀV⁻¹r + (n−p) log 2π

computed from A = Σ_i [X y]_iᵀ V_i⁻¹ [X y]_i: its Cholesky gives log|XᵀV⁻¹X| and, in the last
diagonal entry, rᵀV⁻¹r at β̂. Panels are vmapped in buckets of equal padded size; a padded row
has V = 1 on its diagonal, 0 elsewhere, and zero data, so it changes nothing.

The parameters x = (θ, ln s, c): θ the absolute Cholesky factors of each Σ_k (as in
:mod:`jaxmixed.model.covariance`), ln s the residual sds of the variance groups, c the correlation
parameters (atanh of correlations or partial autocorrelations; MA coefficients as they are;
the exponential structure's logit r).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxmixed.engine import kernels as xla
from jaxmixed.data.design import Design, _numeric, outer_factor
from jaxmixed.data.pattern import size_buckets
from jaxmixed.errors import DataError, ModelError
from jaxmixed.engine.numerics import LOG_2PI, hessian, hessian_through, jacobian, logdet_from_chol_diag, second_order
from jaxmixed.model.covariance import interior_covariance, theta_from_gamma, thetas_from_eta
from jaxmixed.model.residuals import ResidualStructure
from jaxmixed.runtime import programs
from jaxmixed.runtime.devices import host_array

@dataclass(frozen=True)
class PanelStruct:
    """Static description of a per-panel model (hashable; jit's static argument)."""

    structures: tuple  # covariance.* of each random-effects term
    kind: str
    order: int
    n_vgroups: int  # residual variance groups
    n_cgroups: int  # correlation-parameter groups (by levels)
    n_times: int  # time levels (unstructured / banded)
    max_lag: int
    p: int
    term_factor: tuple = ()  # factor (engine order) of each term
    n_levels: tuple = ()  # levels of each factor
    markov: bool = False  # the deviance by prewhitening (see _markov_parts)
    markov_lags: tuple = ()  # AR(1) and markov: the lags between a panel's consecutive rows

    @property
    def n_theta(self) -> int:
        return sum(s.n_theta for s in self.structures)

    @property
    def n_corr(self) -> int:
        """Correlation parameters per correlation group."""
        k, T = self.kind, self.n_times
        if k in ("exchangeable", "exponential"):
            return 1
        if k in ("ar", "ma", "toeplitz"):
            return self.order
        if k == "unstructured":
            return T * (T - 1) // 2
        if k == "banded":
            return len(_band_pairs(T, self.order))
        return 0

    @property
    def n_params(self) -> int:
        return self.n_theta + self.n_vgroups + self.n_cgroups * self.n_corr


def _band_pairs(T: int, q: int | None):
    return [(a, b) for a in range(T) for b in range(a + 1, T) if q is None or b - a <= q]


class Bucket(NamedTuple):
    """Panels padded to one size m: every array is (P, m, ...)."""

    W: jnp.ndarray  # (P, m, p+1) = [X y], zero on padded rows
    valid: jnp.ndarray  # (P, m) bool
    low: jnp.ndarray  # (P, m) lowest-level group code (padded rows: unique negatives)
    t: jnp.ndarray  # (P, m) time
    tl: jnp.ndarray  # (P, m) time level
    vg: jnp.ndarray  # (P, m) variance group
    cg: jnp.ndarray  # (P, m) correlation group
    Z: tuple  # per term (P, m, q_k)
    codes: tuple  # per term (P, m) level codes (padded rows: unique negatives)
    rows: jnp.ndarray  # (P, m) original row (−1 padded)


# ---- correlation ------------------------------------------------------------------------------

def _acf_ar(c, max_lag: int):
    """AR(p) autocorrelations at lags 0..max_lag from partial autocorrelations tanh(c)
    (Durbin–Levinson)."""
    pac = jnp.tanh(c)
    p = pac.shape[0]
    rho = [jnp.ones(()), pac[0]]
    phi = [pac[0]]
    for k in range(2, p + 1):
        pk = pac[k - 1]
        rk = sum(phi[j] * rho[k - 1 - j] for j in range(k - 1)) + pk * (
            1 - sum(phi[j] * rho[j + 1] for j in range(k - 1)))
        phi = [phi[j] - pk * phi[k - 2 - j] for j in range(k - 1)] + [pk]
        rho.append(rk)
    for k in range(len(rho), max_lag + 1):
        rho.append(sum(phi[j] * rho[k - 1 - j] for j in range(p)))
    return jnp.stack(rho[: max_lag + 1])


def _acf_ma(theta, max_lag: int):
    th = jnp.concatenate([jnp.ones(1), theta])
    q = theta.shape[0]
    g = [jnp.sum(th[: q + 1 - k] * th[k:]) for k in range(q + 1)]
    acf = jnp.stack(g) / g[0]
    return jnp.concatenate([acf, jnp.zeros(max(0, max_lag - q))])[: max_lag + 1]


def _acf_toeplitz(c, max_lag: int):
    q = c.shape[0]
    return jnp.concatenate([jnp.ones(1), jnp.tanh(c), jnp.zeros(max(0, max_lag - q))])[: max_lag + 1]


def _corr_matrix(c, T: int, q):
    C = jnp.eye(T)
    for k, (a, b) in enumerate(_band_pairs(T, q)):
        C = C.at[a, b].set(jnp.tanh(c[k])).at[b, a].set(jnp.tanh(c[k]))
    return C


def _rho(cpar, bk: Bucket, ps: PanelStruct):
    """(P, m, m) correlation of the residuals within each panel (before the same-group mask)."""
    m = bk.valid.shape[1]
    eye = jnp.eye(m, dtype=bool)
    k = ps.kind
    if k == "independent":
        return jnp.broadcast_to(eye, bk.low.shape + (m,)).astype(float)
    cg = bk.cg[:, :, None]
    lag = jnp.abs(bk.t[:, :, None] - bk.t[:, None, :])
    if k == "exchangeable":
        r = jnp.tanh(cpar[:, 0])[cg]
        return jnp.where(eye, 1.0, r)
    if k == "exponential":
        r = jax.nn.sigmoid(cpar[:, 0])[cg]
        return jnp.where(eye, 1.0, r ** lag)
    if k in ("ar", "ma", "toeplitz"):
        fn = {"ar": _acf_ar, "ma": _acf_ma, "toeplitz": _acf_toeplitz}[k]
        table = jax.vmap(lambda c: fn(c, ps.max_lag))(cpar)  # (n_cgroups, max_lag+1)
        idx = jnp.clip(jnp.round(lag).astype(int), 0, ps.max_lag)
        return jnp.where(eye, 1.0, table[cg, idx])
    q = ps.order if k == "banded" else None
    Cs = jax.vmap(lambda c: _corr_matrix(c, ps.n_times, q))(cpar)  # (n_cgroups, T, T)
    return Cs[cg, bk.tl[:, :, None], bk.tl[:, None, :]]


def split_params(x, ps: PanelStruct):
    th = x[: ps.n_theta]
    logs = x[ps.n_theta: ps.n_theta + ps.n_vgroups]
    cpar = x[ps.n_theta + ps.n_vgroups:].reshape(ps.n_cgroups, ps.n_corr)
    return th, logs, cpar


def marginal_V(x, bk: Bucket, ps: PanelStruct):
    """V_i for every panel of a bucket, padded rows set to the identity."""
    th, logs, cpar = split_params(x, ps)
    pos = 0
    V = 0.0
    for s, Z, codes in zip(ps.structures, bk.Z, bk.codes):
        lam = s.lam(th[pos:pos + s.n_theta])
        pos += s.n_theta
        S = lam @ lam.T
        same = codes[:, :, None] == codes[:, None, :]
        V = V + same * jnp.einsum("pjq,qr,plr->pjl", Z, S, Z)
    sd = jnp.exp(logs)[bk.vg]
    same_low = bk.low[:, :, None] == bk.low[:, None, :]
    V = V + same_low * sd[:, :, None] * sd[:, None, :] * _rho(cpar, bk, ps)
    both = bk.valid[:, :, None] & bk.valid[:, None, :]
    return jnp.where(both, V, jnp.eye(V.shape[-1]))


def _gls_parts(x, buckets, ps: PanelStruct):
    A = 0.0
    logdet = 0.0
    for bk in buckets:
        L = xla.cholesky(marginal_V(x, bk, ps))
        Y = xla.solve_lower(L, bk.W)
        A = A + jnp.einsum("pjr,pjs->rs", Y, Y)
        logdet = logdet + logdet_from_chol_diag(jnp.diagonal(L, axis1=1, axis2=2))
    LA = xla.cholesky(A)
    return LA, logdet


@programs.tracked
@partial(jax.jit, static_argnames=("ps",))
def deviance(x, buckets, n, ps: PanelStruct, reml):
    """-2 × (restricted) log likelihood with β profiled out (see the module docstring)."""
    LA, logdet = _gls_parts(x, buckets, ps)
    return _deviance_from(LA, logdet, n, ps.p, reml)


def _by_group(values, codes, n: int):
    """values[codes] for a handful of groups as selections (the reverse pass of a gather is a
    scatter, slow on XLA:CPU); a gather for many."""
    if n == 1:
        return jnp.broadcast_to(values[0], codes.shape)
    if n > 8:
        return values[codes]
    return sum(jnp.where(codes == g, values[g], 0.0) for g in range(n))


class MarkovBucket(NamedTuple):
    """A bucket's arrays for the Markov deviance, panels last and one (m, P) slab per column
    (every reduction then runs over whole slabs or along m; XLA:CPU is slow at reducing a
    leading axis of a 3-d array, 3 ms for 300,000 numbers against 0.3 ms for a full sum):
    W (p+1, m, P), Z (Q, m, P) (every term's columns) and their rows shifted by one (Wp, Zp: row
    j holds row j−1, zero for the first), valid / t / vg / cg (m, P); rows in time order."""

    W: jnp.ndarray
    Wp: jnp.ndarray
    Z: jnp.ndarray
    Zp: jnp.ndarray
    valid: jnp.ndarray
    t: jnp.ndarray
    vg: jnp.ndarray
    cg: jnp.ndarray


def markov_buckets(buckets) -> tuple:
    """:class:`MarkovBucket` of each :class:`Bucket` (rearranged on the host, once per fit)."""
    def shifted(a):
        return np.concatenate([np.zeros_like(a[:, :1]), a[:, :-1]], axis=1)

    out = []
    for bk in buckets:
        W = np.transpose(np.asarray(bk.W), (2, 1, 0))
        Z = np.transpose(np.concatenate([np.asarray(z) for z in bk.Z], axis=-1), (2, 1, 0))
        out.append(MarkovBucket(W=W, Wp=shifted(W), Z=Z, Zp=shifted(Z), valid=np.asarray(bk.valid).T,
                                t=np.asarray(bk.t).T, vg=np.asarray(bk.vg).T, cg=np.asarray(bk.cg).T))
    return jax.device_put(tuple(out))  # no one-operation program per array (see devices.host_array)


def _markov_lag_corr(cpar, mb: MarkovBucket, ps: PanelStruct):
    """(m, P) a = ρ(t_j − t_{j−1}) of every row but a panel's first (0 there and on padding):
    the rows of a Markov panel are in time order (:func:`build_panels`); AR(1): φ^lag for the
    lags that occur (``ps.markov_lags``), the exponential structure: r^Δt."""
    dt = mb.t[1:] - mb.t[:-1]
    valid = mb.valid[1:]
    if ps.kind == "exponential":
        r = _by_group(jax.nn.sigmoid(cpar[:, 0]), mb.cg[1:], ps.n_cgroups)
        a = r ** jnp.where(valid, dt, 1.0)
    else:
        phi = _by_group(jnp.tanh(cpar[:, 0]), mb.cg[1:], ps.n_cgroups)
        a = sum(jnp.where(jnp.round(dt) == lag, phi ** lag, 0.0) for lag in ps.markov_lags)
    a = jnp.where(valid, a, 0.0)
    return jnp.concatenate([jnp.zeros_like(a[:1]), a], axis=0)


def _markov_parts(x, markov, ps: PanelStruct):
    """(LA, Σ_i log|V_i|) as :func:`_gls_parts` gives them, for a Markov residual correlation
    (``ps.markov``: AR(1) on integer times or the exponential structure, every random-effects
    term on the panel factor, rows in time order) without forming V_i: R_i⁻¹ is tridiagonal,
    and with a_j = ρ(t_j − t_{j−1}) (0 for a panel's first row), s_j² = 1 − a_j², the
    prewhitened rows ũ_j = (u_j/σ_j − a_j u_{j−1}/σ_{j−1}) / s_j give uᵀR_i⁻¹v = Σ_j ũ_j ṽ_j and
    log|R_i| = Σ_j (2 log σ_j + log s_j²). The Woodbury identity then needs only q × q blocks:
    log|V_i| = log|R_i| + log|ΛᵀZ̃_iᵀZ̃_iΛ + I| and
    [X y]ᵀV⁻¹[X y] = Σ_i (W̃_iᵀW̃_i − Y_iᵀY_i), Y_i = L_i⁻¹ΛᵀZ̃_iᵀW̃_i: O(n (q + p)²) a call.
    ``markov``: :func:`markov_buckets`; the q × q factorisations are unrolled here over (P,)
    vectors of panels rather than left to :func:`~jaxmixed.engine.kernels.cholesky`, which needs
    the blocks stacked as (P, q, q) first (measured: its Hessian 94–102 ms against 83–88 ms at
    100,000 rows). Padded rows (zero data, a = 0, σ = 1) add nothing."""
    th, logs, cpar = split_params(x, ps)
    pos, lams = 0, []
    for s in ps.structures:
        lams.append(s.lam(th[pos:pos + s.n_theta]))
        pos += s.n_theta
    lam = jax.scipy.linalg.block_diag(*lams)
    Q = lam.shape[0]
    A, logdet = 0.0, 0.0
    for mb in markov:
        sd = jnp.where(mb.valid, _by_group(jnp.exp(logs), mb.vg, ps.n_vgroups), 1.0)  # (m, P)
        a = _markov_lag_corr(cpar, mb, ps)
        s2 = 1.0 - a * a
        inv_s = jax.lax.rsqrt(s2)
        sd_prev = jnp.concatenate([jnp.ones_like(sd[:1]), sd[:-1]], axis=0)
        c0, c1 = inv_s / sd, -a * inv_s / sd_prev  # ũ_j = c0_j u_j + c1_j u_{j−1}
        Wt = [mb.W[r] * c0 + mb.Wp[r] * c1 for r in range(mb.W.shape[0])]  # (m, P) each
        Zt = [mb.Z[k] * c0 + mb.Zp[k] * c1 for k in range(Q)]
        ZL = [sum(Zt[k] * lam[k, c] for k in range(Q)) for c in range(Q)]  # (Z̃Λ)_c
        # per panel: L Lᵀ = ΛᵀZ̃ᵀZ̃Λ + I, unrolled over (P,) vectors; Y = L⁻¹ΛᵀZ̃ᵀW̃, Q × (p+1) of them
        L = {}
        for j in range(Q):
            d = jnp.sum(ZL[j] * ZL[j], axis=0) + 1.0
            for k in range(j):
                d = d - L[j, k] * L[j, k]
            L[j, j] = jnp.sqrt(d)
            for i in range(j + 1, Q):
                e = jnp.sum(ZL[i] * ZL[j], axis=0)
                for k in range(j):
                    e = e - L[i, k] * L[j, k]
                L[i, j] = e / L[j, j]
        Y = []
        for i in range(Q):
            row = []
            for r in range(len(Wt)):
                v = jnp.sum(ZL[i] * Wt[r], axis=0)
                for k in range(i):
                    v = v - L[i, k] * Y[k][r]
                row.append(v / L[i, i])
            Y.append(row)
        k1 = len(Wt)
        entries = {}
        for r in range(k1):
            for s_ in range(r + 1):
                entries[r, s_] = jnp.sum(Wt[r] * Wt[s_]) - sum(jnp.sum(Y[i][r] * Y[i][s_]) for i in range(Q))
        A = A + jnp.stack([jnp.stack([entries[max(r, s_), min(r, s_)] for s_ in range(k1)]) for r in range(k1)])
        logdet = (logdet + jnp.sum(jnp.where(mb.valid, 2.0 * jnp.log(sd) + jnp.log(s2), 0.0))
                  + 2.0 * sum(jnp.sum(jnp.log(L[j, j])) for j in range(Q)))
    return xla.cholesky(A), logdet


def _deviance_from(LA, logdet, n, p, reml):
    rss = LA[p, p] ** 2
    ld_X = logdet_from_chol_diag(jnp.diagonal(LA)[:p])
    dev = logdet + rss
    return jnp.where(reml, dev + ld_X + (n - p) * LOG_2PI, dev + n * LOG_2PI)


def data_deviance(x, data, ps: PanelStruct, reml):
    """The deviance of a :class:`PanelData`: without panel matrices where ``ps.markov``."""
    if ps.markov:
        LA, logdet = _markov_parts(x, data.markov, ps)
        return _deviance_from(LA, logdet, data.n, ps.p, reml)
    return deviance(x, data.buckets, data.n, ps, reml)


@programs.tracked
@partial(jax.jit, static_argnames=("ps",))
def gls_solution(x, buckets, ps: PanelStruct):
    """β̂, Cov(β̂) = (XᵀV⁻¹X)⁻¹ and, per bucket, V⁻¹(y − Xβ̂) and V⁻¹."""
    LA, _ = _gls_parts(x, buckets, ps)
    p = ps.p
    RXt = LA[:p, :p]
    beta = xla.solve_lower_t(RXt, LA[p, :p][:, None])[:, 0]
    RXt_inv = xla.solve_lower(RXt, jnp.eye(p))
    cov_beta = RXt_inv.T @ RXt_inv
    ws, Vinvs = [], []
    for bk in buckets:
        L = xla.cholesky(marginal_V(x, bk, ps))
        Linv = xla.solve_lower(L, jnp.broadcast_to(jnp.eye(L.shape[-1]), L.shape))
        Vinv = jnp.einsum("pkj,pkl->pjl", Linv, Linv)
        r = (bk.W[..., p] - bk.W[..., :p] @ beta) * bk.valid
        ws.append(jnp.einsum("pjl,pl->pj", Vinv, r))
        Vinvs.append(Vinv)
    return beta, cov_beta, ws, Vinvs


@programs.tracked
@partial(jax.jit, static_argnames=("ps",))
def satterthwaite_parts(x, buckets, n, ps: PanelStruct, reml):
    """(Var(β̂), ∂Var(β̂)/∂x (p × p × k), ∇²_x −2ℓ) at x, the engine's unprofiled parameters."""
    def vcov(x_):
        return gls_solution(x_, buckets, ps)[1]

    J = jnp.moveaxis(jacobian(vcov)(x), 0, -1)  # one direction at a time (see pls.satterthwaite_parts)
    H = hessian(deviance)(x, buckets, n, ps, reml)
    return vcov(x), J, 0.5 * (H + H.T)


def _corr_forward(c, kind: str):
    """The correlation parameters Kenward-Roger works in (γ) from the engine's c: correlations or
    partial autocorrelations tanh(c), MA coefficients as they are, the exponential's r."""
    if kind == "ma":
        return c
    if kind == "exponential":
        return jax.nn.sigmoid(c)
    return jnp.tanh(c)


def _corr_inverse(g, kind: str):
    if kind == "ma":
        return g
    if kind == "exponential":
        return jnp.log(g) - jnp.log1p(-g)
    return jnp.arctanh(g)


def gamma_to_x(gamma, ps: PanelStruct):
    """x = (θ absolute, ln s, c) from γ = (each term's linear covariance parameters, the residual
    variances s², the correlation parameters on their natural scale)."""
    parts, pos = [], 0
    for s in ps.structures:
        parts.append(theta_from_gamma(s, gamma[pos:pos + s.n_theta], 1.0))
        pos += s.n_theta
    parts.append(0.5 * jnp.log(gamma[pos:pos + ps.n_vgroups]))
    pos += ps.n_vgroups
    parts.append(_corr_inverse(gamma[pos:], ps.kind))
    return jnp.concatenate(parts)


def x_to_gamma(x, ps: PanelStruct):
    """γ at x (the inverse of :func:`gamma_to_x`; a covariance on its boundary moved just inside
    the cone by :func:`~jaxmixed.model.covariance.interior_covariance`); traceable."""
    th, logs, cpar = split_params(x, ps)
    scale = jnp.exp(2.0 * jnp.max(logs))
    parts, pos = [], 0
    for s in ps.structures:
        lam = s.lam(th[pos:pos + s.n_theta])
        parts.append(s.gamma_from_sigma(interior_covariance(lam @ lam.T, scale), jnp))
        pos += s.n_theta
    parts.append(jnp.exp(2.0 * logs))
    parts.append(_corr_forward(cpar.reshape(-1), ps.kind))
    return jnp.concatenate(parts)


@programs.tracked
@partial(jax.jit, static_argnames=("ps",))
def kenward_roger_parts(x, buckets, ps: PanelStruct):
    """At γ̂ = γ(x) (:func:`x_to_gamma`): (M = XᵀV⁻¹X, ∂M/∂γ (p × p × k), ∂²M/∂γ∂γ (p × p × k × k),
    R = XᵀV⁻¹(∂²V/∂γ∂γ)V⁻¹X (p × p × k × k), IE2 = tr(P V_r P V_s) (k × k)): Kenward and Roger's
    (1997) quantities for a covariance that is not linear in γ (the correlations), by
    forward-over-forward autodiff of per-panel factorisations, one direction pair at a time;
    V⁻¹ at γ̂ is held fixed inside R and tr(V⁻¹ ∂²V)."""
    p = ps.p
    gamma = jax.lax.stop_gradient(x_to_gamma(x, ps))
    x0 = gamma_to_x(gamma, ps)
    fixed = []
    for bk in buckets:
        L0 = xla.cholesky(marginal_V(x0, bk, ps))
        Li = xla.solve_lower(L0, jnp.broadcast_to(jnp.eye(L0.shape[-1]), L0.shape))
        V0i = jax.lax.stop_gradient(jnp.einsum("pkj,pkl->pjl", Li, Li))
        fixed.append((V0i, jax.lax.stop_gradient(jnp.einsum("pjl,plr->pjr", V0i, bk.W[..., :p]))))

    def F(g):
        x = gamma_to_x(g, ps)
        LA, logdet = _gls_parts(x, buckets, ps)
        R = LA[:p, :p]
        M = R @ R.T
        N, T = 0.0, 0.0
        for bk, (V0i, Y) in zip(buckets, fixed):
            V = marginal_V(x, bk, ps)
            N = N + jnp.einsum("pjr,pjl,pls->rs", Y, V, Y)
            T = T + jnp.sum(V0i * V)
        ell = logdet + logdet_from_chol_diag(jnp.diagonal(R))
        return jnp.concatenate([ell[None], M.reshape(-1), N.reshape(-1), jnp.reshape(T, (1,))])

    k = gamma.shape[0]
    v, J, H = second_order(F)(gamma)  # (m,), (k, m), (k, k, m)
    J = J.T
    H = jnp.moveaxis(H, -1, 0)  # (m, k, k)
    pp = p * p
    M = v[1:1 + pp].reshape(p, p)
    P = J[1:1 + pp].reshape(p, p, -1)
    d2M = H[1:1 + pp].reshape(p, p, k, k)
    Rm = H[1 + pp:1 + 2 * pp].reshape(p, p, k, k)
    Phi = jnp.linalg.inv(M)
    IE2 = -H[0] + H[-1] - jnp.einsum("ij,jikl->kl", Phi, Rm)
    return M, P, d2M, Rm, IE2


# ---- data -------------------------------------------------------------------------------------

def _panel_factor(design: Design) -> int:
    """The outermost factor (:func:`~jaxmixed.data.design.outer_factor`); every other
    factor's group must extend its group (nesting)."""
    k = outer_factor(design)
    outer = design.factors[k].group
    for f in design.factors:
        if f.group[: len(outer)] != outer:
            raise ModelError("residual structures need nested random effects (one top-level group whose "
                             f"panels contain every other level); {':'.join(f.group)!r} is crossed with "
                             f"{':'.join(outer)!r}")
    return k


def _codes(values) -> tuple[np.ndarray, pd.Index]:
    codes, uniques = pd.factorize(pd.Series(values), sort=True)
    return codes.astype(np.int64), pd.Index(uniques)


def build_panels(design: Design, data: pd.DataFrame, res: ResidualStructure):
    """Bucketed panel arrays, the static PanelStruct, and labels for the report."""
    df = data.iloc[design.rows].reset_index(drop=True)
    n = design.nobs
    outer = _panel_factor(design)
    panel = design.factors[outer].codes
    lowest = max(design.factors, key=lambda f: (len(f.group), f.n_levels))
    low = lowest.codes
    t = _numeric(df[res.time], "time variable") if res.time else np.zeros(n)
    if res.time:
        key = pd.DataFrame({"low": low, "t": t})
        if key.duplicated().any():
            raise DataError(f"time variable {res.time!r} repeats a value within a "
                            f"{':'.join(lowest.group)} panel; residual structures need distinct times")
        if res.kind in ("ar", "ma", "toeplitz") and not np.allclose(t, np.round(t)):
            raise DataError(f"residuals({res.kind}) needs integer times in {res.time!r}; use exponential for "
                            "continuous time")
    tl, tlevels = _codes(t)
    by_codes, by_levels = _codes(df[res.by].to_numpy()) if res.by else (np.zeros(n, np.int64), pd.Index([""]))
    if res.by and res.kind != "independent":
        per_low = pd.DataFrame({"low": low, "by": by_codes}).groupby("low").by.nunique()
        if (per_low > 1).any():
            raise DataError(f"by({res.by}) must be constant within each {':'.join(lowest.group)} panel for "
                            f"residuals({res.kind})")
    if res.kind in ("unstructured", "banded"):
        vg = by_codes * len(tlevels) + tl
        n_vgroups = len(by_levels) * len(tlevels)
    else:
        vg = by_codes
        n_vgroups = len(by_levels)
    cg = by_codes if res.kind != "independent" else np.zeros(n, np.int64)
    n_cgroups = len(by_levels) if res.kind != "independent" else 1
    max_lag = int(np.max(t) - np.min(t)) if res.kind in ("ar", "ma", "toeplitz") else 0

    # rows of each panel in time order, panels bucketed by size (a few padded sizes)
    order = np.lexsort((t, panel))
    sizes = np.bincount(panel)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    bucket_of, edges = size_buckets(sizes)
    W = np.column_stack([design.X, design.y])
    term_codes = [design.factors[tb.factor].codes for tb in design.terms]
    term_Z = [design.factors[tb.factor].Z[:, tb.cols[0]:tb.cols[1]] for tb in design.terms]
    buckets = []
    for b, m in enumerate(edges):
        panels = np.flatnonzero(bucket_of == b)
        if len(panels) == 0:
            continue
        m = int(m)
        idx = -np.ones((len(panels), m), dtype=np.int64)
        for r, pnl in enumerate(panels):
            rows = order[starts[pnl]:starts[pnl + 1]]
            idx[r, : len(rows)] = rows
        valid = idx >= 0
        safe = np.where(valid, idx, 0)
        pad = -1 - np.arange(m)[None, :] - np.zeros_like(idx)

        def take(a, fill=0):
            out = a[safe]
            return np.where(valid.reshape(valid.shape + (1,) * (out.ndim - 2)), out, fill)

        # put on the device as they are (jnp.asarray would run a one-operation program per
        # array: 5-15 ms each in a fresh process, see runtime.devices.host_array)
        buckets.append(jax.device_put(Bucket(
            W=take(W), valid=valid, low=np.where(valid, low[safe], pad),
            t=take(t), tl=take(tl), vg=take(vg), cg=take(cg),
            Z=tuple(take(z) for z in term_Z),
            codes=tuple(np.where(valid, c[safe], pad) for c in term_codes),
            rows=idx)))
    markov = bool(((res.kind == "ar" and res.order == 1) or res.kind == "exponential") and res.time
                  and design.terms and len(design.factors) == 1 and design.factors[0].q <= 8)
    lags = ()
    if markov and res.kind == "ar":
        ts, ps_ = t[order], panel[order]
        same = ps_[1:] == ps_[:-1]
        lags = tuple(int(v) for v in np.unique(np.round(ts[1:][same] - ts[:-1][same])))
        markov = len(lags) <= 16  # many distinct gaps: the panel matrices instead
    ps = PanelStruct(structures=tuple(tb.structure for tb in design.terms), kind=res.kind, order=res.order,
                     n_vgroups=n_vgroups, n_cgroups=n_cgroups, n_times=len(tlevels), max_lag=max_lag, p=design.p,
                     term_factor=tuple(tb.factor for tb in design.terms),
                     n_levels=tuple(f.n_levels for f in design.factors),
                     markov=markov, markov_lags=lags)
    labels = dict(by_levels=list(by_levels), time_levels=list(tlevels))
    return tuple(buckets), ps, labels


def residual_param_info(ps: PanelStruct, res: ResidualStructure, labels: dict):
    """(name, kind) of each residual parameter, kind in sd / corr / free / logit."""
    by = labels["by_levels"]
    tls = labels["time_levels"]

    def tag(g):
        return f"{res.by}={by[g]}: " if res.by else ""

    out = []
    if ps.kind in ("unstructured", "banded"):
        for g in range(len(by)):
            out += [(f"{tag(g)}sd(e{_fmt(t)})", "sd") for t in tls]
    else:
        out += [(f"{tag(g)}sd(e)", "sd") for g in range(ps.n_vgroups)]
    for g in range(ps.n_cgroups if ps.n_corr else 0):
        k = ps.kind
        if k in ("exchangeable",):
            out.append((f"{tag(g)}rho", "corr"))
        elif k == "exponential":
            out.append((f"{tag(g)}rho", "logit"))
        elif k == "ar":
            out += [(f"{tag(g)}rho", "corr")] if ps.order == 1 else \
                [(f"{tag(g)}pacf{j + 1}", "corr") for j in range(ps.order)]
        elif k == "ma":
            out += [(f"{tag(g)}theta{j + 1}", "free") for j in range(ps.order)]
        elif k == "toeplitz":
            out += [(f"{tag(g)}rho{j + 1}", "corr") for j in range(ps.order)]
        else:
            q = ps.order if k == "banded" else None
            out += [(f"{tag(g)}corr(e{_fmt(tls[a])},e{_fmt(tls[b])})", "corr") for a, b in _band_pairs(len(tls), q)]
    return out


def _fmt(v):
    v = float(v)
    return str(int(v)) if v.is_integer() else f"{v:g}"


# ---- the fit ----------------------------------------------------------------------------------

def eta_to_x(eta, ps: PanelStruct):
    """Stata-metric η (term parameters, then the residual parameters as they are) → x."""
    theta, pos = thetas_from_eta(eta, ps.structures, 1.0)
    return jnp.concatenate([theta, eta[pos:]])


def _hessian_eta(eta, data, ps: PanelStruct, reml):
    return hessian(lambda e: -0.5 * data_deviance(eta_to_x(e, ps), data, ps, reml))(eta)


# kept on disk by runtime.programs (with its compile options); the profile intervals use it (a
# fit takes its η-Hessian from the optimiser's, hessian_eta_from_x)
hessian_eta = programs.cached(_hessian_eta, static_argnames=("ps",))


def _hessian_eta_from_x(eta, grad_x, hess_x, ps: PanelStruct):
    """∇²_η ℓ at η from the deviance's gradient and Hessian in x at x(η)
    (:func:`jaxmixed.engine.numerics.hessian_through`): a program over η alone, so the fit
    needs no second program through the panels' factorisations."""
    return hessian_through(lambda e: eta_to_x(e, ps), eta, grad_x, hess_x)


hessian_eta_from_x = programs.cached(_hessian_eta_from_x, static_argnames=("ps",))


def _term_covariances(x, ps: PanelStruct):
    th, _, _ = split_params(x, ps)
    out, pos = [], 0
    for s in ps.structures:
        lam = s.lam(th[pos:pos + s.n_theta])
        out.append(lam @ lam.T)
        pos += s.n_theta
    return out


def _solve(x, buckets, ps: PanelStruct):
    """β̂, Cov(β̂) = (XᵀV⁻¹X)⁻¹ and the BLUPs b_f = Σ_k Σ_{rows of a level} Σ_k z V⁻¹(y − Xβ̂), per
    factor (terms in their column order)."""
    beta, cov_beta, ws, _ = gls_solution(x, buckets, ps)
    covs = _term_covariances(x, ps)
    per_factor = [[] for _ in ps.n_levels]
    for k, (S, f) in enumerate(zip(covs, ps.term_factor)):
        sums = 0.0
        for bk, w in zip(buckets, ws):
            codes = bk.codes[k]
            contrib = bk.Z[k] * w[..., None]
            sums = sums + jax.ops.segment_sum(contrib.reshape(-1, contrib.shape[-1]),
                                              jnp.where(codes >= 0, codes, ps.n_levels[f]).reshape(-1),
                                              num_segments=ps.n_levels[f] + 1)[:-1]
        per_factor[f].append(sums @ S)
    return beta, cov_beta, tuple(jnp.concatenate(parts, axis=1) for parts in per_factor)


solve = programs.cached(_solve, static_argnames=("ps",))


class PanelData(NamedTuple):
    """The marginal engine's data (jit arguments): panels in size buckets, n, and where
    ``ps.markov`` the buckets' :class:`MarkovBucket` (the deviance uses those)."""

    buckets: tuple
    n: jnp.ndarray
    markov: tuple | None = None


@dataclass(frozen=True)
class MarginalEngine:
    """The engine interface (:mod:`jaxmixed.engine.interface`) for a residual structure:
    marginal GLS per panel. Parameters x = (θ absolute, ln s, c) (module docstring); data:
    :class:`PanelData`. ``residual``: the :mod:`jaxmixed.model.residuals` structure;
    ``labels``: its by-levels and time levels (tuples), for the report's names."""

    ps: PanelStruct
    residual: ResidualStructure
    by_levels: tuple
    time_levels: tuple
    name = "marginal"
    quasi_newton = False
    supports_batched = False
    # its programs are kept on disk (runtime.programs) like the PLS engine's, so that a fresh
    # process with a warm cache neither traces nor compiles them. (Clean-clone test runs that
    # crashed in XLA on an AR(1) fit late in the suite had reached Linux's limit on memory
    # maps with compiled programs held in memory: runtime.programs, "Programs in memory".)
    keep_programs = True

    @property
    def n_params(self) -> int:
        return self.ps.n_params

    @property
    def residual_title(self) -> str:
        return self.residual.title

    def deviance(self, params, data, reml):
        return data_deviance(params, data, self.ps, reml)

    def solve(self, params, data, reml):
        from jaxmixed.engine.pls import Solution

        beta, cov_beta, b = solve(host_array(params), data.buckets, self.ps)
        return Solution(beta=np.asarray(beta), sigma=self.sigma(params), cov_beta=np.asarray(cov_beta),
                        b=tuple(np.asarray(v) for v in b))

    def sigma(self, params) -> float:
        """The residual sd of the first variance group (the reference for θ)."""
        _, logs, _ = split_params(np.asarray(params, dtype=float), self.ps)  # on the host: no JAX op
        return float(np.exp(logs[0]))

    def theta(self, params, sigma) -> np.ndarray:
        """θ relative to ``sigma`` (lme4's parameterisation): the absolute factors / σ (each
        structure's Λ is linear in θ)."""
        return np.asarray(params, dtype=float)[: self.ps.n_theta] / sigma

    def start(self, theta, sigma) -> np.ndarray:
        """x from an independent-errors fit's θ and σ: θσ, ln σ for every variance group,
        correlations 0."""
        ps = self.ps
        return np.concatenate([np.asarray(theta) * sigma, np.full(ps.n_vgroups, np.log(sigma)),
                               np.zeros(ps.n_cgroups * ps.n_corr)])

    def lower(self) -> np.ndarray:
        ps = self.ps
        return np.concatenate([np.concatenate([s.lower for s in ps.structures]),
                               np.full(ps.n_params - ps.n_theta, -np.inf)])

    def unit(self, theta_scale, sigma) -> np.ndarray:
        """The optimiser's units: the θ part (absolute, θσ) in units of Design.theta_scale × σ₀,
        so that it is O(1) for covariates and responses on any scale."""
        return np.concatenate([np.asarray(theta_scale) * sigma, np.ones(self.ps.n_params - self.ps.n_theta)])

    def _relative(self, params, theta_scale):
        th, logs, cpar = split_params(np.asarray(params, dtype=float), self.ps)
        scale = float(np.exp(np.mean(logs))) * np.asarray(theta_scale)  # θ relative to σ, optimiser's units
        return th, logs, cpar, th / scale

    def singular(self, params, theta_scale) -> bool:
        """A term on its boundary, or a residual correlation within 1e-6 of ±1."""
        from jaxmixed.model.covariance import is_singular

        ps = self.ps
        _, logs, cpar, rel = self._relative(params, theta_scale)
        slices, pos = [], 0
        for s in ps.structures:
            slices.append((pos, pos + s.n_theta))
            pos += s.n_theta
        if is_singular(rel, ps.structures, slices):
            return True
        kinds = np.array([k == "corr" for _, k in self.residual_rows(False)])
        res_eta = np.concatenate([logs, cpar.ravel()])
        return bool(np.any(np.abs(np.tanh(res_eta[kinds])) > 1 - 1e-6))

    def eta(self, params, sigma, theta_scale, lams=None) -> np.ndarray:
        """η: each term's (ln sd, atanh corr) (−inf for a term on its boundary, relative to
        σ in the optimiser's units), then the residual parameters as they are."""
        th, logs, cpar, rel = self._relative(params, theta_scale)
        parts, pos = [], 0
        for s in self.ps.structures:
            sl = slice(pos, pos + s.n_theta)
            lam = s.lam(th[sl], xp=np)
            parts.append(np.full(s.n_eta, -np.inf) if s.boundary(rel[sl], 1e-12) else s.eta_from_sigma(lam @ lam.T))
            pos += s.n_theta
        return np.concatenate(parts + [logs, cpar.ravel()])

    def hessian_eta(self, eta, data, reml):
        return hessian_eta(jnp.asarray(eta, dtype=float), data, self.ps, jnp.asarray(bool(reml)))

    def hessian_eta_from(self, grad_x, hess_x):
        """``hessian_eta`` at the optimiser's x̂ from its gradient and Hessian there
        (:func:`hessian_eta_from_x`), for ``tables.variance_components``'s ``hessian_program``
        (:meth:`hessian_eta` itself where the optimiser gave no Hessian)."""
        if hess_x is None:
            return self.hessian_eta
        g, H = np.asarray(grad_x, dtype=float), np.asarray(hess_x, dtype=float)
        return lambda eta, data, reml: hessian_eta_from_x(jnp.asarray(eta, dtype=float), g, H, self.ps)

    def prefetch(self, data, reml) -> None:
        """Trace and compile, in the background, the programs that follow the optimiser (the
        solve and the η-Hessian from the optimiser's), so that they overlap its compile and run."""
        ps = self.ps
        f64 = np.dtype("float64")
        n_eta = sum(s.n_eta for s in ps.structures) + ps.n_params - ps.n_theta
        vec = jax.ShapeDtypeStruct((ps.n_params,), f64)
        solve.prefetch(vec, data.buckets, ps, trace=True)
        hessian_eta_from_x.prefetch(jax.ShapeDtypeStruct((n_eta,), f64), vec,
                                    jax.ShapeDtypeStruct((ps.n_params, ps.n_params), f64), ps, trace=True)

    def kenward_roger_parts(self, params, sigma, data):
        """(Φ, P (k × p × p), ∂²(XᵀV⁻¹X) (k × k × p × p), IE2, R (k × k × p × p)) at the REML
        estimate in γ = (linear covariance parameters, residual variances, correlations)."""
        M, P, d2M, R, IE2 = (np.asarray(a) for a in kenward_roger_parts(jnp.asarray(params, dtype=float),
                                                                         data.buckets, self.ps))
        Phi = np.linalg.inv(M)
        return (0.5 * (Phi + Phi.T), np.moveaxis(P, -1, 0), np.moveaxis(d2M, (-2, -1), (0, 1)), 0.5 * (IE2 + IE2.T),
                np.moveaxis(R, (-2, -1), (0, 1)))

    def satterthwaite_parts(self, params, sigma, data, reml):
        """(Var(β̂), ∂Var(β̂)/∂x (k × p × p), ∇²_x −2ℓ) in the engine's parameters x."""
        V, J, H = satterthwaite_parts(jnp.asarray(params, dtype=float), data.buckets, data.n, self.ps, reml)
        return np.asarray(V), np.moveaxis(np.asarray(J), -1, 0), np.asarray(H)

    def residual_rows(self, variance: bool) -> list[tuple[str, str]]:
        return residual_param_info(self.ps, self.residual, dict(by_levels=list(self.by_levels),
                                                                 time_levels=list(self.time_levels)))

    @property
    def n_variance_params(self) -> int:
        return self.ps.n_params - 1

    def term_covariances(self, params, sigma) -> list[np.ndarray]:
        return [np.asarray(S) for S in _term_covariances(jnp.asarray(params), self.ps)]

    def conditional_variances(self, params, sigma, data, design) -> list[np.ndarray]:
        """Per factor (L_f, q_f, q_f): Var(b | y) = Σ − Σ (Σ_{j,l∈ℓ} z_j (V⁻¹)_{jl} z_lᵀ) Σ."""
        _, _, _, Vinvs = gls_solution(jnp.asarray(params), data.buckets, self.ps)
        covs = self.term_covariances(params, sigma)
        out = [np.zeros((f.n_levels, f.q, f.q)) for f in design.factors]
        for k, (tb, S) in enumerate(zip(design.terms, covs)):
            f = design.factors[tb.factor]
            M = np.zeros((f.n_levels, S.shape[0], S.shape[0]))
            for bk, Vinv in zip(data.buckets, Vinvs):
                Z, codes = np.asarray(bk.Z[k]), np.asarray(bk.codes[k])
                same = codes[:, :, None] == codes[:, None, :]
                per_row = np.einsum("pjq,pjl,plr->pjqr", Z, np.asarray(Vinv) * same, Z)
                ok = codes >= 0
                np.add.at(M, codes[ok], per_row[ok])
            a, b = tb.cols
            out[tb.factor][:, a:b, a:b] = S[None] - np.einsum("ij,ljk,kh->lih", S, M, S)
        return out

    def marginal_covariance(self, params, sigma, data, design, level: int):
        """V of the rows of one panel (the outer factor's level ``level``) and their positions
        in the design's rows."""
        outer = design.factors[_panel_factor(design)]
        target = np.flatnonzero(outer.codes == level)[0]
        for bk in data.buckets:
            rows = np.asarray(bk.rows)
            hit = np.argwhere(rows == target)
            if len(hit):
                p = hit[0, 0]
                V = np.asarray(marginal_V(jnp.asarray(params), jax.tree_util.tree_map(lambda a: a[p:p + 1], bk),
                                          self.ps))[0]
                keep = rows[p] >= 0
                return V[np.ix_(keep, keep)], rows[p][keep]
        raise ModelError("panel not found")  # unreachable: every row belongs to a bucket


def marginal_engine(design: Design, data: pd.DataFrame, res: ResidualStructure):
    """(MarginalEngine, PanelData) for a design, its data frame and a residual structure."""
    buckets, ps, labels = build_panels(design, data, res)
    engine = MarginalEngine(ps=ps, residual=res, by_levels=tuple(labels["by_levels"]),
                            time_levels=tuple(labels["time_levels"]))
    return engine, PanelData(buckets=buckets, n=float(design.nobs), markov=markov_buckets(buckets) if ps.markov else None)
