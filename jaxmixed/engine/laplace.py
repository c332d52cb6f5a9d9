"""The GLMM engine: conditional modes by PIRLS, the Laplace approximation and adaptive
Gauss-Hermite quadrature, with exact derivatives by implicit differentiation.

Model: η = Xβ + offset + ZΛu, u ~ N(0, I), yᵢ | u ~ family(g⁻¹(ηᵢ)) (``jaxmixed.model.family``).
Parameters x = (β, θ, s): fixed effects (in the design's basis X̃ = X R₀⁻¹), each term's Cholesky
factor Λ_k(θ) of the random effects' covariance (absolute, Σ_k = Λ_kΛ_kᵀ: no residual σ), and the
log scale s of families that have one.

- **Conditional mode** û(x) maximises h(u) = Σᵢ ℓᵢ(ηᵢ) − ½‖u‖² by Newton's method (PIRLS with the
  observed curvature as weights; rows whose curvature is not positive get a small positive
  weight, which keeps every step an ascent step) with step halving. Each step forms the
  *weighted* cross-products of Z (:func:`jaxmixed.data.crossprod.accumulate`, traced) and
  factorises ΛᵀZᵀWZΛ + I with the linear engine's blocked Cholesky
  (:func:`jaxmixed.engine.pls_dense.factorize_random`): the GLMM is a reweighted LMM.
- **Derivatives**: û is a ``custom_jvp`` function; its tangent is dû = H⁻¹ ∂ₓ∇ᵤh · dx (implicit
  function theorem at ∇ᵤh = 0, H = −∇²ᵤᵤh), never a derivative through the Newton iterations.
  Gradients and Hessians of the objectives are then exact to all orders.
- **Laplace**: −2 log L ≈ −2[Σℓᵢ(η̂ᵢ) − ½‖û‖²] + log|H(û)|, with H the *observed* curvature (as
  glmmTMB and Stata; lme4 uses expected weights, which differ for non-canonical links).
- **Adaptive Gauss-Hermite** (one grouping factor, vector effects included): the integral factors
  over groups; for group g with q effects, nodes u = û_g + L_g⁻ᵀz on the k^q product grid of
  probabilists' Hermite nodes z (L_g the Cholesky factor of H's block for g), so that

      log L_g = −log|L_g| + log Σ_k w_k exp(h_g(u_k) + ½‖z_k‖²),

  which is the Laplace value for k = 1. Nested grouping factors (any depth): level by level on the joint
  Laplace Gaussian (:func:`nested_agq_deviance`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmixed.data.crossprod import CrossProducts, accumulate
from jaxmixed.data.pattern import dense_block_index
from jaxmixed.engine import kernels, pls, pls_dense, pls_sparse
from jaxmixed.model.family import family_of
from jaxmixed.runtime import programs
from jaxmixed.runtime.devices import host_array

PIRLS_MAX_ITER = 60
PIRLS_MAX_HALVINGS = 30
PIRLS_TOL = 1e-11  # Newton decrement ∇hᵀH⁻¹∇h at which the mode is taken as found
MIN_WEIGHT = 1e-10  # curvature weight floor of a PIRLS step (rows with ℓ'' ≥ 0)


class GLMMSolution(NamedTuple):
    """The estimates a GLMM's post-estimation reads (numpy)."""

    beta: np.ndarray  # in the data's units
    cov_beta: np.ndarray
    u: np.ndarray  # spherical conditional modes
    b: tuple  # per factor (L_f, q_f): b = Λu
    V: tuple  # per factor (L_f, q_f, q_f): Var(b | y) at the mode (inverse curvature, through Λ)


class GLMMArrays(NamedTuple):
    """Row data of a GLMM (jit arguments)."""

    y: jnp.ndarray  # (n,) response (successes for the binomial)
    m: jnp.ndarray  # (n,) binomial trials, 1 elsewhere
    pw: jnp.ndarray  # (n,) prior weights
    offset: jnp.ndarray  # (n,)
    X: jnp.ndarray  # (n, p) fixed-effects columns in the design's basis
    codes: tuple  # per factor (n,) int32, engine order
    Z: tuple  # per factor (n, q_f)
    const: jnp.ndarray  # Σᵢ of the rows' parameter-free log-density terms (Family.constant)
    # one grouping factor: (idx, valid) of shape (m_max, G), the rows of each group padded to one
    # length: idx a row of the group (its first on padded slots), valid False on those; ()
    # otherwise.
    # :func:`panel_view` turns the rows into that layout (see there).
    panel: tuple = ()
    # the blocked sparse layout (``shape.re.layout`` set: large crossed or many-panel designs):
    # where the rows' weighted products land (:class:`jaxmixed.engine.pls_sparse.WeightedRows`)
    sparse: tuple = ()


@dataclass(frozen=True)
class GLMMShape:
    """Static description (hashable): the random-effects shape (the linear engine's, dense
    layout, no fixed-effects columns), the family and link, and the quadrature points."""

    re: pls.ModelShape
    family: str
    link: str
    p: int
    nagq: int = 1
    adaptive: bool = True  # False: plain Gauss-Hermite nodes on the prior (Stata's ghermite)

    @property
    def n_scale(self) -> int:
        return 1 if family_of(self.family).has_scale else 0

    @property
    def n_params(self) -> int:
        return self.p + self.re.n_theta + self.n_scale

    @property
    def n_u(self) -> int:
        return self.re.L[0] * self.re.q[0] + self.re.m2


def split(x, shape: GLMMShape):
    """(β, θ, s) from the parameter vector (s = 0 for families without a scale)."""
    p, k = shape.p, shape.re.n_theta
    s = x[p + k] if shape.n_scale else jnp.zeros((), x.dtype)
    return x[:p], x[p:p + k], s


def _effects(u, lams, shape: GLMMShape):
    """b per factor, (L_f, q_f) = U_f Λ_fᵀ."""
    re = shape.re
    L1, q1 = re.L[0], re.q[0]
    out = [u[:L1 * q1].reshape(L1, q1) @ lams[0].T]
    base = L1 * q1
    for lam, off, L, q in zip(lams[1:], re.offsets, re.L[1:], re.q[1:]):
        out.append(u[base + off:base + off + L * q].reshape(L, q) @ lam.T)
    return out


def _is_panel(data) -> bool:
    """Whether ``data`` is in :func:`panel_view`'s layout (groups × padded rows)."""
    return len(data.codes) == 0


def panel_view(data: GLMMArrays) -> GLMMArrays:
    """The rows of a one-factor GLMM laid out as (slot, group): y, m, prior weights and offset of
    shape (m_max, G), X (m_max, G, p), Z as q slabs (q, m_max, G), slot j of group g its j-th
    row; a padded slot is a copy of one of its group's rows with prior weight 0 (so that it
    adds exactly nothing: every family but the Gaussian, which does not get this layout,
    multiplies its log density by the weight). A group's sum over its rows is then a sum
    along the leading axis, vectorised over the groups, and ZΛu elementwise, where the row
    layout needs XLA's scatter-adds and gathers (the reweighting pass of PIRLS;
    ``scripts/README_glmm.md``). Unchanged when ``data`` has no panel index. Traceable: the
    optimiser's program converts once and every evaluation runs on the view; values equal
    the row layout's to rounding."""
    if not data.panel or _is_panel(data):
        return data
    idx, valid = data.panel
    return data._replace(y=data.y[idx], m=data.m[idx], pw=jnp.where(valid, data.pw[idx], 0.0),
                         offset=data.offset[idx], X=data.X[idx], codes=(),
                         Z=(jnp.moveaxis(data.Z[0][idx], -1, 0),))


def panel_index(codes: np.ndarray, n_levels: int, max_ratio: float = 1.5):
    """(idx, valid) of shape (m_max, G) for :attr:`GLMMArrays.panel` from one factor's level
    codes (numpy), or () when padding every group to the largest would hold more than
    ``max_ratio`` × the rows."""
    codes = np.asarray(codes)
    n = len(codes)
    sizes = np.bincount(codes, minlength=n_levels)
    m_max = int(sizes.max(initial=0))
    if n == 0 or np.any(sizes == 0) or n_levels * m_max > max_ratio * n:
        return ()
    order = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    slot = np.arange(m_max)[:, None]
    valid = slot < sizes[None, :]
    pos = starts[None, :] + np.where(valid, slot, 0)
    return order[pos].astype(np.int32), valid


def _group_sums(Zs, r):
    """(G, q): Σ over each group's rows of z_a r, from Z's slabs (q, m, G) and r (m, G)."""
    return jnp.stack([jnp.sum(z * r, axis=0) for z in Zs], axis=1)


def _z_lambda(v, lams, data, shape):
    """ZΛv per row (the random part of η for spherical effects v)."""
    if _is_panel(data):
        b = _effects(v, lams, shape)[0]  # (G, q)
        return sum(z * b[:, a] for a, z in enumerate(data.Z[0]))
    out = jnp.zeros(data.y.shape, data.y.dtype)
    for b, c, Z in zip(_effects(v, lams, shape), data.codes, data.Z):
        out = out + jnp.sum(Z * b[c], axis=1)
    return out


def linear_predictor(u, x, data: GLMMArrays, shape: GLMMShape, lams=None):
    """η = X̃β̃ + offset + ZΛu."""
    beta, theta, _ = split(x, shape)
    lams = pls.factor_lambdas(theta, shape.re) if lams is None else lams
    return data.X @ beta + data.offset + _z_lambda(u, lams, data, shape)


def row_loglik(eta, x, data: GLMMArrays, shape: GLMMShape):
    _, _, s = split(x, shape)
    return family_of(shape.family).loglik(shape.link, data.y, data.m, data.pw, eta, s, constant=False)


def _h_at(u, eta, x, data, shape):
    """h = Σ ℓᵢ(ηᵢ) − ½‖u‖² with η = η(u) given."""
    return jnp.sum(row_loglik(eta, x, data, shape)) - 0.5 * jnp.dot(u, u)


def _h(u, x, data, shape):
    """h(u) = Σ ℓᵢ − ½‖u‖²."""
    return _h_at(u, linear_predictor(u, x, data, shape), x, data, shape)


def _curvature(eta, x, data, shape):
    """(ℓ', −ℓ'') per row: closed forms for canonical binomial and Poisson models
    (:meth:`Family.eta_derivatives`), else forward-mode autodiff of the elementwise log density."""
    closed = family_of(shape.family).eta_derivatives(shape.link, data.y, data.m, data.pw, eta)
    if closed is not None:
        return closed
    f = lambda e: row_loglik(e, x, data, shape)  # noqa: E731
    ones = jnp.ones_like(eta)
    d1 = lambda e: jax.jvp(f, (e,), (ones,))[1]  # noqa: E731
    g1, g2 = jax.jvp(d1, (eta,), (ones,))
    return g1, -g2


def weighted_arrays(data: GLMMArrays, shape: GLMMShape, weights):
    """The linear engine's arrays of ZᵀWZ (W = diag(weights)), from the blocks of Z alone: in
    the blocked sparse layout when the shape has one (:func:`pls_sparse.weighted_system`), else
    the dense layout (:func:`jaxmixed.data.crossprod.accumulate` without fixed-effects or
    response columns, over the full pattern's blocks)."""
    re = shape.re
    if re.layout is not None:
        return pls_sparse.weighted_system(data.sparse[0], data.codes, data.Z, weights, re)
    if _is_panel(data):
        Zs = data.Z[0]
        q, G = Zs.shape[0], Zs.shape[2]
        wz = [z * weights for z in Zs]
        D11 = jnp.stack([_group_sums(Zs, wz[a]) for a in range(q)], axis=1)  # (G, q, q)
        cp = CrossProducts(n=jnp.sum(data.panel[1]).astype(Zs.dtype), WW=jnp.zeros((1, 1), Zs.dtype), D11=D11,
                           Z1W=jnp.zeros((G, q, 1), Zs.dtype), Z2W=(), D22=(), A21=(), X22=())
        return pls.arrange(cp, re, None, xp=jnp)
    cp = accumulate(None, data.codes, data.Z, re.L, dense_block_index(data.codes, re.L, jnp), weights, xp=jnp)
    return pls.arrange(cp._replace(n=jnp.asarray(float(data.y.shape[0]))), re, None, xp=jnp)


def factor_at(u, x, data: GLMMArrays, shape: GLMMShape, weights=None):
    """The blocked Cholesky factor of ΛᵀZᵀWZΛ + I at u, W the observed curvature (or
    ``weights``), from weighted cross-products of Z."""
    _, theta, _ = split(x, shape)
    lams = pls.factor_lambdas(theta, shape.re)
    if weights is None:
        _, weights = _curvature(linear_predictor(u, x, data, shape, lams), x, data, shape)
    return _factorize(weighted_arrays(data, shape, weights), shape, lams)


def _factorize(arrays, shape: GLMMShape, lams):
    """The blocked Cholesky factor of ΛᵀZᵀWZΛ + I from :func:`weighted_arrays`' arrays, by the
    shape's layout (the factor's ``logdet`` is log|ΛᵀZᵀWZΛ + I|)."""
    return _layout(shape).factorize_random(arrays, shape.re, lams)


def _layout(shape: GLMMShape):
    """The linear engine module of the shape's layout (dense, or blocked sparse)."""
    return pls_dense if shape.re.layout is None else pls_sparse


def _solve(f, r, shape: GLMMShape):
    """(ΛᵀZᵀWZΛ + I)⁻¹ r through the factor ``f`` of :func:`_factorize`."""
    re = shape.re
    n1 = re.L[0] * re.q[0]
    r1 = r[:n1].reshape(re.L[0], re.q[0])
    x1, x2 = _layout(shape).solve_random(f, r1, r[n1:], re)
    return jnp.concatenate([x1.reshape(-1), x2])


def _z_lambda_t(r, lams, data, shape):
    """ΛᵀZᵀr (the transpose of :func:`_z_lambda`): per factor segment sums, then Λᵀ."""
    if _is_panel(data):
        return (_group_sums(data.Z[0], r) @ lams[0]).reshape(-1)
    parts = []
    for lam, c, Z, L in zip(lams, data.codes, data.Z, shape.re.L):
        parts.append((jax.ops.segment_sum(Z * r[:, None], c, num_segments=L) @ lam).reshape(-1))
    return jnp.concatenate(parts)


def pirls(x, data: GLMMArrays, shape: GLMMShape, u0=None):
    """(û, converged, iterations): the conditional mode at x by damped Newton.

    Each step: ℓ' and ℓ'' at the current η (carried: η(u + t d) = η(u) + t ZΛd is linear in u,
    so the step's trial points cost elementwise work only), the gradient ΛᵀZᵀℓ' − u, the
    weighted cross-products of Z and their blocked Cholesky factor, the Newton direction, and
    step halving on h."""
    _, theta, _ = split(x, shape)
    lams = pls.factor_lambdas(theta, shape.re)
    u0 = jnp.zeros((shape.n_u,), data.y.dtype) if u0 is None else u0

    def direction(u, eta):
        l1, w = _curvature(eta, x, data, shape)
        f = _factorize(weighted_arrays(data, shape, jnp.maximum(w, MIN_WEIGHT * data.pw)), shape, lams)
        g = _z_lambda_t(l1, lams, data, shape) - u
        d = _solve(f, g, shape)
        return d, jnp.dot(g, d), _z_lambda(d, lams, data, shape)

    return _newton_ascent(u0, linear_predictor(u0, x, data, shape, lams),
                          lambda u, eta: _h_at(u, eta, x, data, shape), direction, PIRLS_MAX_ITER)


def _newton_ascent(z0, eta0, h_of, direction, max_iter: int):
    """(z, converged, iterations): damped Newton ascent on h(z) (z a pytree) whose linear
    predictor η is linear in z, so trial points cost elementwise work only. ``direction(z, η)``
    gives (the step d, the Newton decrement, η's change along d); step halving until h does not
    fall; stops at a decrement ≤ PIRLS_TOL or when h no longer changes."""
    def moved(z, t, d):
        return jax.tree_util.tree_map(lambda a, b: a + t * b, z, d)

    def step(state):
        k, z, eta, hz, _, _ = state
        d, dec, deta = direction(z, eta)
        tol = 1e-12 * (1.0 + jnp.abs(hz))

        def ls_cond(ls):
            j, t, hn = ls
            return (j < PIRLS_MAX_HALVINGS) & ~(hn >= hz - tol)

        def ls_body(ls):
            j, t, _ = ls
            t = 0.5 * t
            return j + 1, t, h_of(moved(z, t, d), eta + t * deta)

        j, t, hn = jax.lax.while_loop(ls_cond, ls_body, (0, 1.0, h_of(moved(z, 1.0, d), eta + deta)))
        ok = jnp.isfinite(hn) & (hn >= hz - tol)
        z_next = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, b, a), z, moved(z, t, d))
        conv = (dec <= PIRLS_TOL) | (ok & (jnp.abs(hn - hz) <= 1e-14 * (1 + jnp.abs(hz))))
        done = (dec <= PIRLS_TOL) | ~ok | ~jnp.isfinite(dec)
        return k + 1, z_next, jnp.where(ok, eta + t * deta, eta), jnp.where(ok, hn, hz), done, conv

    init = (0, z0, eta0, h_of(z0, eta0), False, False)
    k, z, _, _, _, conv = jax.lax.while_loop(lambda st: (st[0] < max_iter) & ~st[4], step, init)
    return z, conv, k


@partial(jax.custom_jvp, nondiff_argnums=(3,))
def _mode(x, u0, data: GLMMArrays, shape: GLMMShape):
    return jax.lax.stop_gradient(pirls(x, data, shape, u0)[0])


@_mode.defjvp
def _mode_jvp(shape, primals, tangents):
    x, u0, data = primals
    dx = tangents[0]  # the start and the data have no derivatives
    u = _mode(x, u0, data, shape)
    _, r = jax.jvp(lambda x_: jax.grad(_h)(u, x_, data, shape), (x,), (dx,))
    f = factor_at(u, x, data, shape)
    return u, _solve(f, r, shape)


def mode(x, data: GLMMArrays, shape: GLMMShape, u0=None):
    """û(x), differentiable by the implicit function theorem (module docstring). ``u0``: where
    PIRLS starts (0 by default; a nearby mode, e.g. the previous evaluation's, saves steps — the
    mode itself does not depend on it)."""
    u0 = jnp.zeros((shape.n_u,), data.y.dtype) if u0 is None else u0
    return _mode(x, u0, data, shape)


def laplace_deviance(x, data: GLMMArrays, shape: GLMMShape, u0=None):
    """−2 × the Laplace approximation of the log likelihood at x."""
    return laplace_deviance_and_mode(x, data, shape, u0)[0]


def laplace_deviance_and_mode(x, data: GLMMArrays, shape: GLMMShape, u0=None):
    """(−2 × the Laplace log likelihood at x, û) with PIRLS started at ``u0``."""
    u = mode(x, data, shape, u0)
    f = factor_at(u, x, data, shape)
    return -2.0 * (_h(u, x, data, shape) + data.const) + f.logdet, u


def gh_grid(nagq: int, q: int):
    """(nodes (K, q), log weights (K,)) of the k^q product rule for ∫ f(z) φ_q(z) dz."""
    z, w = np.polynomial.hermite_e.hermegauss(nagq)
    w = w / w.sum()
    grids = np.meshgrid(*([z] * q), indexing="ij")
    wg = np.meshgrid(*([np.log(w)] * q), indexing="ij")
    nodes = np.stack([g.reshape(-1) for g in grids], axis=1)
    logw = np.sum(np.stack([g.reshape(-1) for g in wg], axis=1), axis=1)
    return nodes, logw


def agq_deviance(x, data: GLMMArrays, shape: GLMMShape, u0=None):
    """:func:`agq_deviance_and_mode`'s value."""
    return agq_deviance_and_mode(x, data, shape, u0)[0]


def agq_deviance_and_mode(x, data: GLMMArrays, shape: GLMMShape, u0=None):
    """(value, modes; ``u0`` where PIRLS starts): −2 × the adaptive Gauss-Hermite log
    likelihood (one grouping factor; ``shape.nagq`` points per dimension). With
    ``shape.adaptive`` False the nodes are those of the prior N(0, I) itself, not moved to the
    mode nor scaled by the curvature (Stata's ``ghermite``: needs many more points for the same
    accuracy)."""
    re = shape.re
    L1, q = re.L[0], re.q[0]
    beta, theta, _ = split(x, shape)
    lams = pls.factor_lambdas(theta, re)
    nodes, logw = gh_grid(shape.nagq, q)
    K = nodes.shape[0]
    Zn = jnp.broadcast_to(jnp.asarray(nodes.T), (L1, q, K))
    if shape.adaptive:
        u = mode(x, data, shape, u0)
        f = factor_at(u, x, data, shape)
        shift = kernels.solve_lower_t(f.L1, Zn)  # L_g⁻ᵀ z_k: (L1, q, K)
        U = u.reshape(L1, q)[:, :, None] + shift  # (L1, q, K)
        logdet_g = jnp.sum(jnp.log(jnp.diagonal(f.L1, axis1=1, axis2=2)), axis=1)
    else:
        u = u0
        U = Zn
        logdet_g = jnp.zeros((L1,), x.dtype)
    B = jnp.einsum("lqk,pq->lkp", U, lams[0])  # b = Λu per node: (L1, K, q)
    Z = data.Z[0]
    eta0 = data.X @ beta + data.offset
    _, _, s = split(x, shape)
    fam = family_of(shape.family)
    if _is_panel(data):  # (m, G, K), summed over each group's rows (the leading axis)
        eta = eta0[..., None] + sum(z[..., None] * B[None, :, :, a] for a, z in enumerate(Z))
        ll = fam.loglik(shape.link, data.y[..., None], data.m[..., None], data.pw[..., None], eta, s, constant=False)
        S = jnp.sum(ll, axis=0)
    else:
        codes = data.codes[0]
        eta = eta0[:, None] + jnp.einsum("iq,ikq->ik", Z, B[codes])  # (n, K)
        ll = fam.loglik(shape.link, data.y[:, None], data.m[:, None], data.pw[:, None], eta, s, constant=False)
        S = jax.ops.segment_sum(ll, codes, num_segments=L1)
    S = S - 0.5 * jnp.sum(U**2, axis=1)  # (L1, K)
    S = S + 0.5 * jnp.sum(jnp.asarray(nodes) ** 2, axis=1) + jnp.asarray(logw)
    return -2.0 * (jnp.sum(jax.scipy.special.logsumexp(S, axis=1) - logdet_g) + data.const), u


def nested_agq_deviance(x, data: GLMMArrays, shape: GLMMShape, u0=None):
    """:func:`nested_agq_deviance_and_mode`'s value."""
    return nested_agq_deviance_and_mode(x, data, shape, u0)[0]


def _ancestors(codes, n_levels) -> list:
    """anc[l][m] for m > l: the level-m group of each level-l group (engine order, innermost
    first, each level nested in the next)."""
    D = len(codes)
    return [{m: jax.ops.segment_max(codes[m], codes[l], num_segments=n_levels[l]) for m in range(l + 1, D)}
            for l in range(D)]


def _conditional_precisions(x, u, data: GLMMArrays, shape: GLMMShape, lams, anc):
    """(chols, gains) per level l, innermost first, from the joint Laplace precision H = −∇²h(û)
    eliminated level by level from the innermost (block Gaussian elimination along the tree):
    after the levels below l are gone, R_ll (L_l, q_l, q_l) is the precision of u_g given its
    ancestors and R_lm (L_l, q_l, q_m) its coupling to the level-m ancestor; chols[l] is R_ll's
    Cholesky factor, gains[l][m] = R_ll⁻¹R_lm."""
    re = shape.re
    D = len(re.L)
    beta, _, _ = split(x, shape)
    codes, Zs = data.codes, data.Z
    A = [Z @ lam for Z, lam in zip(Zs, lams)]  # ZΛ per row and level
    ub = _level_modes(u, re)
    eta = data.X @ beta + data.offset + sum(jnp.sum(a * v[c], axis=1) for a, v, c in zip(A, ub, codes))
    _, w = _curvature(eta, x, data, shape)
    R = []
    for l in range(D):
        wA = w[:, None] * A[l]
        R.append({m: jax.ops.segment_sum(wA[:, :, None] * A[m][:, None, :], codes[l], num_segments=re.L[l])
                  for m in range(l, D)})
        R[l][l] = R[l][l] + jnp.eye(re.q[l])
    chols, gains = [], []
    for l in range(D):  # eliminate level l into its ancestors' blocks
        C = kernels.cholesky(R[l][l])
        G = {m: kernels.solve_lower_t(C, kernels.solve_lower(C, R[l][m])) for m in range(l + 1, D)}  # R_ll⁻¹R_lm
        for m in range(l + 1, D):
            for m2 in range(m, D):
                upd = jnp.einsum("gab,gac->gbc", R[l][m], G[m2])
                R[m][m2] = R[m][m2] - jax.ops.segment_sum(upd, anc[l][m], num_segments=re.L[m])
        chols.append(C)
        gains.append(G)
    return chols, gains


def _level_modes(u, re) -> list:
    """The spherical effects per level, (L_l, q_l), from the stacked vector."""
    out, pos = [], 0
    for L, q in zip(re.L, re.q):
        out.append(u[pos:pos + L * q].reshape(L, q))
        pos += L * q
    return out


def nested_agq_deviance_and_mode(x, data: GLMMArrays, shape: GLMMShape, u0=None):
    """(value, modes; ``u0`` where PIRLS starts): −2 × the adaptive Gauss-Hermite log
    likelihood of D ≥ 2 nested grouping factors (engine order: factor 0 the innermost, each
    level's groups inside one group of the next), vector effects at any level, ``shape.nagq``
    points per dimension. Memory: n × k^(q_0 + … + q_{D−1}) evaluations at once.

    The nodes follow the joint Laplace Gaussian N(û, H⁻¹) written level by level from the top:
    H's blocks follow the tree (a group couples to its ancestors and descendants only), so
    eliminating the levels from the innermost up (:func:`_conditional_precisions`) gives, for
    each group g of level l, the precision R_g of u_g given its ancestors and the couplings
    R_gm; at each combination of ancestor nodes t_m the effects of g are placed on
    N(û_g − R_g⁻¹ Σ_m R_gm(t_m − û_m), R_g⁻¹), the outermost on their marginal. Then, from the
    innermost level up,

        log I_g(t) = −log|C_g| + log Σ_k w_k exp(½‖z_k‖² − ½‖v_k‖² + Σ_{children c of g} log I_c(t, v_k)),

    with the rows' log densities summed into the innermost groups, C_g the Cholesky factor of
    R_g. One point per dimension gives the Laplace value (log|H| = Σ_g log|R_g|); any Gaussian
    centring converges to the integral as the points grow. With ``shape.adaptive`` False: nodes
    on the prior N(0, I) at every level."""
    re = shape.re
    D = len(re.L)
    beta, theta, s = split(x, shape)
    lams = pls.factor_lambdas(theta, re)
    codes, Zs = data.codes, data.Z
    anc = _ancestors(codes, re.L)
    grids = [gh_grid(shape.nagq, q) for q in re.q]
    Ks = [nd.shape[0] for nd, _ in grids]
    # node values per level, top-down: T[l] is (L_l, q_l, K_{D-1}, ..., K_l)
    T = [None] * D
    logdet = [None] * D
    if shape.adaptive:
        u = mode(x, data, shape, u0)
        ub = _level_modes(u, re)
        chols, gains = _conditional_precisions(x, u, data, shape, lams, anc)
    else:
        u = u0
    for l in reversed(range(D)):
        nodes = jnp.asarray(grids[l][0].T)  # (q_l, K_l)
        n_anc = D - 1 - l  # node axes of the ancestors, outermost first
        if shape.adaptive:
            C = chols[l]
            spread = kernels.solve_lower_t(C, jnp.broadcast_to(nodes, (re.L[l], re.q[l], Ks[l])))  # (L, q, K_l)
            centre = ub[l].reshape((re.L[l], re.q[l]) + (1,) * n_anc)
            for m in range(l + 1, D):
                dev_m = T[m][anc[l][m]] - ub[m][anc[l][m]].reshape((re.L[l], re.q[m]) + (1,) * (D - m))
                dev_m = dev_m.reshape(dev_m.shape + (1,) * (m - l - 1))  # axes of levels m-1 .. l+1
                centre = centre - jnp.einsum("gab,gb...->ga...", gains[l][m], dev_m)
            centre = jnp.broadcast_to(centre, (re.L[l], re.q[l]) + tuple(Ks[D - 1:l:-1]))
            T[l] = centre[..., None] + spread.reshape((re.L[l], re.q[l]) + (1,) * n_anc + (Ks[l],))
            logdet[l] = jnp.sum(jnp.log(jnp.diagonal(C, axis1=1, axis2=2)), axis=1)
        else:
            T[l] = jnp.broadcast_to(nodes.reshape((1, re.q[l]) + (1,) * n_anc + (Ks[l],)),
                                    (re.L[l], re.q[l]) + tuple(Ks[D - 1:l:-1]) + (Ks[l],))
            logdet[l] = jnp.zeros((re.L[l],), x.dtype)
    # each row's linear predictor at every node combination: (n, K_{D-1}, ..., K_0)
    eta = (data.X @ beta + data.offset).reshape((-1,) + (1,) * D)
    for l in range(D):
        B = jnp.einsum("gq...,pq->gp...", T[l], lams[l])  # b = Λu per node
        contrib = jnp.einsum("iq,iq...->i...", Zs[l], B[codes[l]])  # (n, K_{D-1}, ..., K_l)
        eta = eta + contrib.reshape(contrib.shape + (1,) * l)
    fam = family_of(shape.family)
    ex = (slice(None),) + (None,) * D
    ll = fam.loglik(shape.link, data.y[ex], data.m[ex], data.pw[ex], eta, s, constant=False)
    acc = jax.ops.segment_sum(ll, codes[0], num_segments=re.L[0])  # (L_0, K_{D-1}, ..., K_0)
    for l in range(D):
        nodes, logw = grids[l]
        acc = (acc - 0.5 * jnp.sum(T[l] ** 2, axis=1) + jnp.asarray(0.5 * np.sum(nodes**2, axis=1) + logw))
        log_g = jax.scipy.special.logsumexp(acc, axis=-1) - logdet[l].reshape((-1,) + (1,) * (D - 1 - l))
        acc = jax.ops.segment_sum(log_g, anc[l][l + 1], num_segments=re.L[l + 1]) if l + 1 < D else log_g
    return -2.0 * (jnp.sum(acc) + data.const), u


def deviance(x, data: GLMMArrays, shape: GLMMShape, u0=None):
    """The objective: Laplace for ``nagq`` 1, adaptive quadrature above (one grouping factor, or
    nested ones at any depth). ``u0``: where PIRLS starts (see :func:`mode`)."""
    return deviance_and_mode(x, u0, data, shape)[0]


def deviance_and_mode(x, u0, data: GLMMArrays, shape: GLMMShape):
    """(:func:`deviance`, the conditional modes) with PIRLS started at ``u0`` (None: 0): the
    optimiser hands each evaluation's modes to the next as its start (lme4 does the same)."""
    if u0 is None:
        u0 = jnp.zeros((shape.n_u,), data.y.dtype)
    if shape.nagq > 1 or not shape.adaptive:
        if len(shape.re.L) >= 2:
            return nested_agq_deviance_and_mode(x, data, shape, u0)
        return agq_deviance_and_mode(x, data, shape, u0)
    return laplace_deviance_and_mode(x, data, shape, u0)


# ---------------------------------------------------------------------------------------------
# lme4's nAGQ = 0: the fixed effects inside PIRLS, the optimiser over (θ, s) alone


def _joint_system(u, eta, x, data: GLMMArrays, shape: GLMMShape, lams, floor: bool = True):
    """The Newton system of h(u, β) = Σℓᵢ(X̃β + offset + ZΛu) − ½‖u‖² in (u, β), eliminated
    block-wise on the blocked factor of A = ΛᵀZᵀWZΛ + I: (∇_u h, ∇_β h, factor of A, A⁻¹C, S)
    with C = ΛᵀZᵀWX̃ and S = X̃ᵀWX̃ − CᵀA⁻¹C (the curvature of h profiled over u in β)."""
    l1, w = _curvature(eta, x, data, shape)
    if floor:
        w = jnp.maximum(w, MIN_WEIGHT * data.pw)
    f = _factorize(weighted_arrays(data, shape, w), shape, lams)
    g_u = _z_lambda_t(l1, lams, data, shape) - u
    g_b = data.X.T @ l1
    WX = w[:, None] * data.X
    C = jax.vmap(lambda col: _z_lambda_t(col, lams, data, shape), in_axes=1, out_axes=1)(WX)
    AiC = jax.vmap(lambda c: _solve(f, c, shape), in_axes=1, out_axes=1)(C)
    S = data.X.T @ WX - C.T @ AiC
    return g_u, g_b, f, AiC, 0.5 * (S + S.T)


def pirls_joint(x, data: GLMMArrays, shape: GLMMShape, u0, beta0):
    """(û, β̂, converged): the joint maximiser of h(u, β) at the θ and s in x (its β part not
    used), by damped Newton on (u, β) with step halving (lme4's nAGQ = 0 inner loop)."""
    _, theta, _ = split(x, shape)
    lams = pls.factor_lambdas(theta, shape.re)

    def direction(z, eta):
        u, _ = z
        g_u, g_b, f, AiC, S = _joint_system(u, eta, x, data, shape, lams)
        d_b = jnp.linalg.solve(S, g_b - AiC.T @ g_u)
        d_u = _solve(f, g_u, shape) - AiC @ d_b
        return ((d_u, d_b), jnp.dot(g_u, d_u) + jnp.dot(g_b, d_b),
                data.X @ d_b + _z_lambda(d_u, lams, data, shape))

    eta0 = data.X @ beta0 + data.offset + _z_lambda(u0, lams, data, shape)
    (u, b), conv, _ = _newton_ascent((u0, beta0), eta0, lambda z, eta: _h_at(z[0], eta, x, data, shape),
                                     direction, 2 * PIRLS_MAX_ITER)
    return jax.lax.stop_gradient(u), jax.lax.stop_gradient(b), conv


def _profiled_h_grad(b, y, u, data, shape):
    """∇_β of h profiled over u, g(β, y) = h(û(β, y), β, y) with y = (θ, s): X̃ᵀℓ'(η̂) (the
    envelope theorem: ∇_u h = 0 at û). ``u``: PIRLS's start (the mode itself)."""
    x = jnp.concatenate([b, y])
    eta = linear_predictor(mode(x, data, shape, u), x, data, shape)
    return data.X.T @ _curvature(eta, x, data, shape)[0]


@partial(jax.custom_jvp, nondiff_argnums=(4,))
def _beta_hat(y, b, u, data, shape):
    """β̂(y) given its value ``b`` (found by :func:`pirls_joint`, with the modes ``u``),
    differentiable by the implicit function theorem at ∇_β g = 0: dβ̂ = S⁻¹ ∂_y∇_β g dy, S =
    −∇²_ββ g the joint system's Schur complement (:func:`nagq0_beta_information`)."""
    return jax.lax.stop_gradient(b)


@_beta_hat.defjvp
def _beta_hat_jvp(shape, primals, tangents):
    y, b, u, data = primals
    dy = tangents[0]
    b, u = jax.lax.stop_gradient(b), jax.lax.stop_gradient(u)
    S = nagq0_beta_information(jnp.concatenate([b, y]), u, data, shape)
    _, r = jax.jvp(lambda yy: _profiled_h_grad(b, yy, u, data, shape), (y,), (dy,))
    return b, jnp.linalg.solve(S, r)


def nagq0_deviance_and_modes(y, carry, data: GLMMArrays, shape: GLMMShape):
    """lme4's nAGQ = 0 objective in y = (θ, s): the Laplace deviance at (β̂(y), y), β̂ jointly
    with the modes by :func:`pirls_joint` (started from ``carry`` = (u, β)), exact derivatives
    through β̂ (:func:`_beta_hat`) and the modes. Returns (value, (û, β̂)) for the next start."""
    u0, b0 = carry
    u, b, _ = pirls_joint(jnp.concatenate([b0, y]), data, shape, u0, b0)
    b = _beta_hat(y, b, u, data, shape)
    dev, u = laplace_deviance_and_mode(jnp.concatenate([b, y]), data, shape, u)
    return dev, (u, b)


def nagq0_deviance(y, data: GLMMArrays, shape: GLMMShape, beta0):
    """:func:`nagq0_deviance_and_modes`' value from u = 0 and β = ``beta0``."""
    carry = (jnp.zeros((shape.n_u,), y.dtype), beta0)
    return nagq0_deviance_and_modes(y, carry, data, shape)[0]


def nagq0_beta_information(x, u, data: GLMMArrays, shape: GLMMShape):
    """S = X̃ᵀWX̃ − CᵀA⁻¹C at (û, β̂), W the observed curvature: the information on β̃ of the
    joint PIRLS system, whose inverse lme4 reports as the nAGQ = 0 fit's Var(β̃)."""
    _, theta, _ = split(x, shape)
    lams = pls.factor_lambdas(theta, shape.re)
    eta = linear_predictor(u, x, data, shape, lams)
    return _joint_system(u, eta, x, data, shape, lams, floor=False)[4]


def conditional(x, data: GLMMArrays, shape: GLMMShape):
    """(û, b per factor, Var(b | y) blocks per factor (the inverse curvature at the mode,
    mapped through Λ), PIRLS converged)."""
    _, theta, _ = split(x, shape)
    lams = pls.factor_lambdas(theta, shape.re)
    u, conv, _ = pirls(x, data, shape)
    _, w = _curvature(linear_predictor(u, x, data, shape, lams), x, data, shape)
    arrays = weighted_arrays(data, shape, w)
    blocks = _layout(shape).conditional_blocks(theta, arrays, shape.re, lams)
    V = [jnp.einsum("ij,ljk,hk->lih", lam, Vb, lam) for lam, Vb in zip(lams, blocks)]
    return u, _effects(u, lams, shape), V, conv


def link_value(link: str, mu):
    """g(μ) (numpy), for starting values."""
    mu = np.asarray(mu, dtype=float)
    rules = {"identity": lambda: mu, "log": lambda: np.log(mu), "logit": lambda: np.log(mu / (1 - mu)),
             "inverse": lambda: 1 / mu, "probit": lambda: np.sqrt(2) * _erfinv(2 * mu - 1),
             "cloglog": lambda: np.log(-np.log1p(-mu))}
    return rules[link]()


def _erfinv(x):
    from scipy.special import erfinv  # noqa: PLC0415

    return erfinv(x)


@programs.cached(static_argnames=("family", "link", "has_scale", "max_iter"))
def _glm_loop(z0, X, y, m, pw, offset, family: str, link: str, has_scale: bool, max_iter: int = 100):
    """Damped Newton on the GLM log likelihood in z = (β, s): (z, value, converged)."""
    fam = family_of(family)
    p = X.shape[1]

    def ll(z_):
        s_ = z_[p] if has_scale else 0.0
        f = jnp.sum(fam.loglik(link, y, m, pw, X @ z_[:p] + offset, s_))
        return jnp.where(jnp.isfinite(f), f, -jnp.inf)

    def body(state):
        k, z, f, _, _ = state
        g = jax.grad(ll)(z)
        H = jax.hessian(ll)(z)
        w, V = jnp.linalg.eigh(-H)
        d = V @ ((V.T @ g) / jnp.maximum(jnp.abs(w), 1e-12 * jnp.max(jnp.abs(w))))
        dec = g @ d
        conv = dec < 1e-12 * (1 + jnp.abs(f))

        def ls_cond(ls):
            t, fn = ls
            return (t > 1e-10) & ~(fn >= f - 1e-12 * (1 + jnp.abs(f)))

        def ls_body(ls):
            t, _ = ls
            return 0.5 * t, ll(z + 0.5 * t * d)

        t, fn = jax.lax.while_loop(ls_cond, ls_body, (1.0, ll(z + d)))
        ok = ~conv & (t > 1e-10)
        return k + 1, jnp.where(ok, z + t * d, z), jnp.where(ok, fn, f), conv, ~ok

    init = (0, z0, ll(z0), False, False)
    _, z, f, conv, _ = jax.lax.while_loop(lambda st: (st[0] < max_iter) & ~st[4], body, init)
    return z, f, conv


def glm_fit(X, y, m, pw, offset, family: str, link: str, max_iter: int = 100):
    """The GLM without random effects by damped Newton on its exact log likelihood:
    (β, s, log likelihood, converged). Used as the GLMM's start and for the LR test."""
    fam = family_of(family)
    X = np.asarray(X, dtype=float)
    tot = np.sum(pw * y) / np.sum(pw * m)
    if fam.name == "binomial":
        tot = np.clip(tot, 1e-3, 1 - 1e-3)
    elif fam.name != "gaussian":
        tot = max(tot, 1e-3)
    with np.errstate(all="ignore"):
        target = link_value(link, tot) - offset
    beta0 = np.linalg.lstsq(X, target, rcond=None)[0]
    z = beta0
    if fam.has_scale:
        if fam.name == "gaussian":
            s0 = 0.5 * np.log(max(np.mean(pw * (y - tot) ** 2), 1e-8))
        elif fam.name == "gamma":
            s0 = -np.log(max(np.var(y / tot), 1e-3))
        else:
            s0 = 0.0
        z = np.append(beta0, s0)
    z, f, conv = _glm_loop(host_array(z), *(host_array(a) for a in (X, y, m, pw, offset)),
                           family, link, fam.has_scale, max_iter)
    z = np.asarray(z)
    p = X.shape[1]
    return z[:p], (float(z[p]) if fam.has_scale else 0.0), float(f), bool(conv)


# ---------------------------------------------------------------------------------------------
# the reporting metric and the engine interface


def params_of_report(xi, shape: GLMMShape, B):
    """x = (β̃, θ, s) from the reporting parameters ξ = (β in the data's units, each term's η
    (ln sd, atanh corr), s); ``B`` maps β̃ to β (β = B β̃)."""
    p = shape.p
    beta_t = jnp.linalg.solve(B, xi[:p])
    pos, parts = p, []
    for t in shape.re.terms:
        k = t.structure.n_eta
        parts.append(t.structure.theta_from_eta(xi[pos:pos + k], jnp.ones(())))
        pos += k
    out = [beta_t] + parts
    if shape.n_scale:
        out.append(xi[pos:pos + 1])
    return jnp.concatenate(out)


def report_of_params(x, shape: GLMMShape, B) -> np.ndarray:
    """ξ from x (numpy; ln sd = −inf for a zero variance)."""
    x = np.asarray(x, dtype=float)
    beta_t, theta, s = x[:shape.p], x[shape.p:shape.p + shape.re.n_theta], x[shape.p + shape.re.n_theta:]
    parts = [np.asarray(B) @ beta_t]
    with np.errstate(divide="ignore", invalid="ignore"):
        for t in shape.re.terms:
            lam = t.structure.lam(theta[t.theta[0]:t.theta[1]], np)
            parts.append(np.asarray(t.structure.eta_from_sigma(lam @ lam.T, np)))
    parts.append(s)
    return np.concatenate(parts)


def hessian_of_report(xi, data: GLMMArrays, shape: GLMMShape, B, fixed_mask):
    """∇²ξ of the log likelihood in the reporting metric ξ (forward over reverse, the columns
    in sequence); only the columns (and rows) where ``fixed_mask`` is 1 are computed, the rest
    are zero (a boundary fit holds its variance parameters)."""
    def ll(z):
        return -0.5 * deviance(params_of_report(z, shape, B), data, shape)

    g = jax.grad(ll)

    def column(v):
        return jax.jvp(g, (xi,), (v,))[1]

    E = jnp.eye(xi.shape[0], dtype=xi.dtype) * fixed_mask[None, :]
    H = jax.lax.map(column, E)
    return 0.5 * (H + H.T)


@programs.cached(static_argnames=("shape",))
def beta_information(x, data: GLMMArrays, shape: GLMMShape):
    """:func:`nagq0_beta_information` at the modes of x (after an nAGQ = 0 fit)."""
    return nagq0_beta_information(x, mode(x, data, shape), data, shape)


@dataclass(frozen=True)
class LaplaceEngine:
    """The engine interface (:mod:`jaxmixed.engine.interface`) of a GLMM: parameters x =
    (β̃, θ, s), data :class:`GLMMArrays`; ``reml`` is ignored (GLMMs are fitted by ML)."""

    shape: GLMMShape
    B: np.ndarray  # β = B β̃
    name = "laplace"
    supports_batched = False
    residual_title = None
    quasi_newton = False

    @property
    def n_params(self) -> int:
        return self.shape.n_params

    def deviance(self, params, data, reml=False):
        return deviance(jnp.asarray(params), data, self.shape)

    def theta(self, params, sigma=None) -> np.ndarray:
        p = self.shape.p
        return np.asarray(params, dtype=float)[p:p + self.shape.re.n_theta]

    def term_covariances(self, params, sigma=None) -> list[np.ndarray]:
        """Σ_k = Λ_kΛ_kᵀ of each term (absolute: a GLMM has no residual σ to scale by)."""
        lams = pls.term_lambdas(self.theta(params), self.shape.re, np)
        return [lam @ lam.T for lam in lams]

    def conditional_variances(self, params, sigma, data, design=None) -> list[np.ndarray]:
        """Var(b | y) blocks per factor at ``params`` (a fit keeps them in its solution)."""
        return [np.asarray(v) for v in _conditional(jnp.asarray(params), data, self.shape)[2]]

    @property
    def n_variance_params(self) -> int:
        return sum(t.structure.n_eta for t in self.shape.re.terms)

    def singular(self, params, unit) -> bool:
        from jaxmixed.model.covariance import is_singular  # noqa: PLC0415

        return is_singular(self.theta(params), [t.structure for t in self.shape.re.terms],
                           [t.theta for t in self.shape.re.terms], unit)


_conditional = programs.tracked(jax.jit(conditional, static_argnames=("shape",)))


@programs.cached(static_argnames=("shape",))
def after_fit(x, xi, data: GLMMArrays, shape: GLMMShape, B, fixed_mask):
    """One program for what follows the optimiser: the Hessian in the reporting metric
    (:func:`hessian_report`) and the conditional modes and variances (:func:`conditional`)."""
    data = panel_view(data)
    return hessian_of_report(xi, data, shape, B, fixed_mask), conditional(x, data, shape)


hessian_report = programs.tracked(jax.jit(hessian_of_report, static_argnames=("shape",)))
