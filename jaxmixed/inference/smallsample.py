"""Small-sample inference for the fixed effects of linear mixed models: denominator degrees of
freedom (Stata's ``dfmethod()``, lmerTest's Satterthwaite, pbkrtest's Kenward-Roger) and the
t and F tests that use them.

The engines provide exact derivatives (:meth:`PLSEngine.satterthwaite_parts`,
:meth:`PLSEngine.kenward_roger_parts`: autodiff of the cross-product solve, p × p and k × k
quantities only); the algebra here is numpy.

- **Satterthwaite** (lmerTest): for a contrast ℓ, ν = 2 (ℓᵀΦℓ)² / (gᵀAg) with Φ = Var(β̂) as a
  function of x = (θ, σ), g_j = ℓᵀ(∂Φ/∂x_j)ℓ and A = 2 H⁻¹, H the Hessian of −2ℓ in x. Several
  rows: eigen-decompose LΦLᵀ = Σ d_m v_m v_mᵀ, ν_m per direction, E = Σ ν_m/(ν_m − 2),
  ddf = 2E/(E − q) (lmerTest's ``contestMD``).
- **Kenward-Roger** (pbkrtest's ``vcovAdj`` and ``KRmodcomp``): γ the linear covariance
  parameters, W = 2 IE2⁻¹, U = Σ W_rs (Q_rs − P_rΦP_s), Φ_A = Φ + 2ΦUΦ; the scaled F and its
  ddf from A₁, A₂.
- **residual**, **repeated**, **anova**: Stata's counting rules (:func:`counting_df`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from jaxmixed.errors import ModelError
from jaxmixed.inference import distributions as sps
from jaxmixed.inference.tables import wald_statistic

METHODS = ("residual", "repeated", "anova", "satterthwaite", "kroger")
_ALIASES = {"kenward-roger": "kroger", "kenwardroger": "kroger", "kr": "kroger", "kenward_roger": "kroger",
            "satterth": "satterthwaite", "sat": "satterthwaite"}
TITLES = {"residual": "Residual", "repeated": "Repeated", "anova": "ANOVA", "satterthwaite": "Satterthwaite",
          "kroger": "Kenward-Roger"}


def check_method(method, reml: bool | None = None) -> str | None:
    """The canonical df method name (None for none), or a ModelError naming the choices; with
    ``reml`` given, also one for Kenward-Roger on an ML fit."""
    if method is None:
        return None
    m = str(method).strip().lower()
    m = _ALIASES.get(m, m)
    if m not in METHODS:
        raise ModelError(f"unknown dfmethod {method!r}; choose one of {', '.join(METHODS)}")
    if m == "kroger" and reml is False:
        raise ModelError("dfmethod kroger needs a REML fit (as in Stata and pbkrtest); refit with method='reml'")
    return m


@dataclass(frozen=True)
class TestResult:
    """A test of linear hypotheses Lβ = rhs: F (with a df method) or χ² (without)."""

    stat: float
    df1: int
    df2: float  # inf for a χ² test
    p: float
    kind: str  # "F" or "chi2"

    def __iter__(self):
        return iter((self.stat, self.df1, self.df2, self.p, self.kind))


@dataclass(frozen=True)
class SmallSample:
    """A fit's df method and what its tests need.

    ``vcov``: Var(β̂) the tables use (Kenward-Roger: the adjusted Φ_A); ``vcov_model``: the
    model-based Φ; ``df``: per coefficient. Satterthwaite keeps ``jac`` (k × p × p) and ``A``;
    Kenward-Roger ``P`` (k × p × p) and ``W``; the counting rules their per-coefficient df."""

    method: str
    vcov: np.ndarray
    vcov_model: np.ndarray
    df: np.ndarray
    jac: np.ndarray | None = None
    A: np.ndarray | None = None
    P: np.ndarray | None = None
    W: np.ndarray | None = None

    @property
    def title(self) -> str:
        return TITLES[self.method]

    # -- one contrast --------------------------------------------------------------------
    def contrast_df(self, ell) -> float:
        ell = np.asarray(ell, dtype=float).reshape(-1)
        if self.method == "satterthwaite":
            v = ell @ self.vcov_model @ ell
            g = np.einsum("i,kij,j->k", ell, self.jac, ell)
            return float(2.0 * v * v / (g @ self.A @ g))
        if self.method == "kroger":
            return _kr_ddf(self, ell[None, :])[0]
        nz = np.abs(ell) > 0
        return float(np.min(self.df[nz])) if nz.any() else float(np.min(self.df))

    # -- several contrasts ---------------------------------------------------------------
    def test(self, beta, L, rhs) -> TestResult:
        """F test of Lβ = rhs with this method's ddf (L of full row rank, see :func:`reduce_rows`)."""
        beta = np.asarray(beta, dtype=float)
        q = L.shape[0]
        if self.method == "satterthwaite":
            d, vec = np.linalg.eigh(L @ self.vcov_model @ L.T)
            order = np.argsort(d)[::-1]
            d, vec = d[order], vec[:, order]
            PL = vec.T @ L
            t2 = (PL @ beta - vec.T @ rhs) ** 2 / d
            F = float(np.sum(t2) / q)
            nu = np.array([2 * dm**2 / (g @ self.A @ g) for dm, g in
                           zip(d, np.einsum("mi,kij,mj->mk", PL, self.jac, PL))])
            ddf = _fstat_ddf(nu)
            return TestResult(F, q, ddf, float(sps.f.sf(F, q, ddf)), "F")
        if self.method == "kroger":
            ddf, scaling = _kr_ddf(self, L)
            F = wald_statistic(L, beta, self.vcov, rhs) / q * scaling
            return TestResult(F, q, ddf, float(sps.f.sf(F, q, ddf)), "F")
        F = wald_statistic(L, beta, self.vcov, rhs) / q
        used = np.any(np.abs(L) > 0, axis=0)
        ddf = float(np.min(self.df[used]))
        return TestResult(F, q, ddf, float(sps.f.sf(F, q, ddf)), "F")


def _fstat_ddf(nu, tol: float = 1e-8) -> float:
    """lmerTest's ddf of an F statistic from the per-direction Satterthwaite df ν_m."""
    nu = np.asarray(nu, dtype=float)
    if nu.size == 1:
        return float(nu[0])
    if np.all(np.abs(np.diff(nu)) < tol):
        return float(np.mean(nu))
    if np.any(nu <= 2):
        return 2.0
    E = np.sum(nu / (nu - 2))
    return float(2 * E / (E - nu.size))


def _kr_ddf(ss: SmallSample, L) -> tuple[float, float]:
    """pbkrtest's (ddf, F scaling) for the rows of L (``KRmodcomp``; one row: ``Lb_ddf``)."""
    Phi, P, W = ss.vcov_model, ss.P, ss.W
    q = L.shape[0]
    Theta = L.T @ np.linalg.solve(L @ Phi @ L.T, L)
    u = np.einsum("ij,jk,rkl,lm->rim", Theta, Phi, P, Phi)  # ΘΦ P_r Φ
    tr = np.einsum("rii->r", u)
    A1 = float(tr @ W @ tr)
    A2 = float(np.einsum("rs,rij,sji->", W, u, u))
    B = (A1 + 6 * A2) / (2 * q)
    g = ((q + 1) * A1 - (q + 4) * A2) / ((q + 2) * A2)
    den = 3 * q + 2 * (1 - g)
    c1, c2, c3 = g / den, (q - g) / den, (q + 2 - g) / den
    V0, V1, V2 = 1 + c1 * B, 1 - c2 * B, 1 - c3 * B
    V0 = 0.0 if abs(V0) < 1e-10 else V0
    ratio = (1 - A2 / q) / V1 if V1 != 0 else 0.0
    rho = ratio**2 * V0 / V2 / q
    df2 = 4 + (q + 2) / (q * rho - 1)
    scaling = 1.0 if abs(df2 - 4) < 1e-2 else df2 * (1 - A2 / q) / (df2 - 2)
    return float(df2), float(scaling)


def reduce_rows(L, rhs, tol: float = 1e-10):
    """L and rhs with linearly dependent rows dropped (a ModelError for an inconsistent rhs)."""
    L = np.atleast_2d(np.asarray(L, dtype=float))
    try:
        rhs = np.asarray(rhs, dtype=float)
    except (TypeError, ValueError):
        raise ModelError(f"rhs must be a number or one number per hypothesis row, not {rhs!r}") from None
    if rhs.ndim > 1 or (rhs.ndim == 1 and rhs.shape[0] not in (1, L.shape[0])):
        raise ModelError(f"rhs has {rhs.size} values for {L.shape[0]} hypothesis row(s)")
    if not np.all(np.isfinite(rhs)):
        raise ModelError("rhs has non-finite values")
    rhs = np.broadcast_to(rhs, (L.shape[0],)).copy()
    keep: list[int] = []
    for i in range(L.shape[0]):
        cand = keep + [i]
        if np.linalg.matrix_rank(L[cand], tol=tol * max(1.0, np.abs(L).max())) == len(cand):
            keep.append(i)
        else:
            coef = np.linalg.lstsq(L[keep].T, L[i], rcond=None)[0] if keep else np.zeros(0)
            if keep and abs(coef @ rhs[keep] - rhs[i]) > 1e-8 * max(1.0, abs(rhs[i])):
                raise ModelError(f"hypothesis row {i + 1} is a combination of earlier rows with a different "
                                 "right-hand side: the constraints are inconsistent")
    if not keep:
        raise ModelError("the hypothesis matrix L has no non-zero row")
    return L[keep], rhs[keep]


# ---------------------------------------------------------------------------------------------
# the methods


def boundary_coordinates(engine, params, sigma, design) -> np.ndarray:
    """Mask of Satterthwaite's x = the engine's variance parameters (then σ for the PLS engine)
    that sit on their lower bound 0 (a zero sd): not estimated in the interior, so left out of
    x, as if fixed (a model without that variance component)."""
    params = np.asarray(params, dtype=float)
    if hasattr(engine, "shape"):  # PLS: x = (θ, σ)
        lower, unit = np.asarray(design.theta_lower, dtype=float), np.asarray(design.theta_scale, dtype=float)
        mask = (lower == 0) & (np.abs(params) <= 1e-6 * unit)
        return np.concatenate([mask, [False]])
    lower = np.asarray(engine.lower(), dtype=float)
    unit = np.asarray(engine.unit(design.theta_scale, sigma), dtype=float)
    return np.isfinite(lower) & (lower == 0) & (np.abs(params - lower) <= 1e-6 * unit)


def satterthwaite(engine, data, params, sigma, reml, design=None) -> SmallSample:
    V, J, H = engine.satterthwaite_parts(params, sigma, data, reml)
    if design is not None:
        keep = ~boundary_coordinates(engine, params, sigma, design)
        J, H = J[keep], H[np.ix_(keep, keep)]
    w = np.linalg.eigvalsh(H)
    if not np.all(np.isfinite(H)) or w[0] <= 1e-10 * max(abs(w[-1]), 1.0):
        raise ModelError("Satterthwaite degrees of freedom need a Hessian of the log likelihood that is negative "
                         "definite in the variance parameters; this fit's is not (a boundary fit, or one that did "
                         "not converge)")
    A = 2.0 * np.linalg.inv(H)
    ss = SmallSample("satterthwaite", V, V, np.empty(0), jac=J, A=0.5 * (A + A.T))
    p = V.shape[0]
    return _with_df(ss, np.array([ss.contrast_df(np.eye(p)[j]) for j in range(p)]))


def kenward_roger(engine, data, params, sigma) -> SmallSample:
    parts = getattr(engine, "kenward_roger_parts", None)
    if parts is None:
        raise ModelError("dfmethod kroger is not available for this model; use dfmethod satterthwaite")
    Phi, P, Q, IE2, *rest = parts(params, sigma, data)
    w = np.linalg.eigvalsh(IE2)
    W = 2.0 * (np.linalg.inv(IE2) if np.min(np.abs(w)) > 1e-10 else np.linalg.pinv(IE2))
    W = 0.5 * (W + W.T)
    # U = Σ_rs W_rs (Q_rs − P_r Φ P_s − ¼ R_rs) (Kenward and Roger 1997; R = 0 when Σ is linear
    # in γ, as pbkrtest assumes), with ∂²(XᵀΣ⁻¹X)/∂γ_r∂γ_s = Q_rs + Q_sr − R_rs:
    # Σ_rs W_rs (Q_rs − ¼R_rs) = ½ Σ_rs W_rs ∂²(XᵀΣ⁻¹X)/∂γ_r∂γ_s + ¼ Σ_rs W_rs R_rs
    U = 0.5 * np.einsum("rs,rsij->ij", W, Q) - np.einsum("rs,rij,jk,skl->il", W, P, Phi, P)
    if rest and rest[0] is not None:
        U = U + 0.25 * np.einsum("rs,rsij->ij", W, rest[0])
    PhiA = Phi + 2.0 * Phi @ U @ Phi
    ss = SmallSample("kroger", 0.5 * (PhiA + PhiA.T), Phi, np.empty(0), P=P, W=W)
    p = Phi.shape[0]
    return _with_df(ss, np.array([ss.contrast_df(np.eye(p)[j]) for j in range(p)]))


def _with_df(ss: SmallSample, df) -> SmallSample:
    return replace(ss, df=np.asarray(df, dtype=float))


def _rank(M) -> int:
    if M.size == 0:
        return 0
    s = np.linalg.svd(M, compute_uv=False)
    return int(np.sum(s > s[0] * max(M.shape) * 1e-12)) if s.size and s[0] > 0 else 0


def _within(X, codes, n_levels):
    """X minus its group means (the part of X outside the span of the group indicators)."""
    counts = np.bincount(codes, minlength=n_levels).astype(float)
    means = np.zeros((n_levels, X.shape[1]))
    np.add.at(means, codes, X)
    means /= np.maximum(counts, 1.0)[:, None]
    return X - means[codes]


def _constant_within(x, codes, n_levels) -> bool:
    lo = np.full(n_levels, np.inf)
    hi = np.full(n_levels, -np.inf)
    np.minimum.at(lo, codes, x)
    np.maximum.at(hi, codes, x)
    used = np.isfinite(lo)
    return bool(np.all(hi[used] - lo[used] <= 1e-10 * max(1.0, np.abs(x).max())))


def counting_df(method: str, design) -> SmallSample:
    """Stata's residual, repeated and anova degrees of freedom (per coefficient).

    - residual: n − rank(X) for every coefficient.
    - repeated (two-level random-intercept models): with m groups, a *between* coefficient
      (constant within every group, the constant included) gets m − p_b and a *within* one
      n − m − p_w, where p_b and p_w count the between and within columns (p_b + p_w = p).
    - anova (random-intercept models, nested or crossed): a coefficient constant within the
      groups of some random factor f gets the smallest rank contribution of such a factor,
      rank([X Z_f]) − rank(X); any other coefficient the residual df n − rank([X Z]) of the
      model with every random factor's indicators Z as fixed effects (for two levels the same
      numbers as repeated).
    Tests of several coefficients use the smallest df among the coefficients involved.
    """
    X = np.asarray(design.X, dtype=float)
    n, p = X.shape
    if method == "residual":
        df = np.full(p, float(n - p))
    else:
        slopes = [tb for tb in design.terms if tb.term.columns != ("_cons",)]
        if slopes:
            raise ModelError(f"dfmethod {method} is defined for random-intercept models; this model has random "
                             f"coefficients at level {slopes[0].term.label!r} (use satterthwaite or kroger)")
        factors = design.factors
        if method == "repeated" and len(factors) != 1:
            raise ModelError("dfmethod repeated is defined for two-level models (one grouping factor); this model has "
                             f"{len(factors)} (use anova, satterthwaite or kroger)")
        rank_X = _rank(X)
        contrib = []
        between = np.zeros((len(factors), p), dtype=bool)
        for k, f in enumerate(factors):
            contrib.append(f.n_levels + _rank(_within(X, f.codes, f.n_levels)) - rank_X)
            between[k] = [_constant_within(X[:, j], f.codes, f.n_levels) for j in range(p)]
        if method == "repeated":
            f = factors[0]
            m = f.n_levels
            p_b = int(np.sum(between[0]))
            df = np.where(between[0], float(m - p_b), float(n - m - (p - p_b)))
        else:
            if len(factors) == 1:
                rank_all = factors[0].n_levels + _rank(_within(X, factors[0].codes, factors[0].n_levels))
            else:
                if n * (p + sum(f.n_levels for f in factors)) > 5e7:
                    raise ModelError("dfmethod anova with several random factors needs the rank of [X Z], too large "
                                     "here; use satterthwaite or kroger")
                Z = [np.eye(f.n_levels)[f.codes] for f in factors]
                rank_all = _rank(np.column_stack([X] + Z))
            resid = float(n - rank_all)
            df = np.empty(p)
            for j in range(p):
                inside = [contrib[k] for k in range(len(factors)) if between[k, j]]
                df[j] = float(min(inside)) if inside else resid
    if np.any(df <= 0):
        raise ModelError(f"dfmethod {method} leaves no degrees of freedom for some coefficient (df {df.min():g})")
    return SmallSample(method, np.empty((0, 0)), np.empty((0, 0)), df)


def small_sample(method: str, result_parts) -> SmallSample:
    """The df method for a fitted linear model; ``result_parts`` = (engine, data, params, sigma,
    reml, design, cov_beta)."""
    engine, data, params, sigma, reml, design, cov_beta = result_parts
    method = check_method(method, reml)
    if method == "kroger":
        return kenward_roger(engine, data, params, sigma)
    if method == "satterthwaite":
        return satterthwaite(engine, data, params, sigma, reml, design)
    V = np.asarray(cov_beta, dtype=float)
    return replace(counting_df(method, design), vcov=V, vcov_model=V)


def df_table(r, methods=None) -> pd.DataFrame:
    """Stata's ``estat df``: the df of every fixed effect under each of ``methods`` (default:
    the fit's own, or every method that applies to this fit), one column per method, without
    refitting."""
    if r.family is not None:
        raise ModelError("df methods are for linear mixed models")
    reml = r.method == "reml"
    if methods is None:
        methods = [r.dfmethod] if r.dfmethod is not None else list(METHODS)
        explicit = r.dfmethod is not None
    else:
        methods = [methods] if isinstance(methods, str) else list(methods)
        explicit = True
    cols = {}
    for m in methods:
        m = check_method(m)  # an unknown name is an error even in the default list's absence
        try:
            ss = small_sample(m, (r.engine, r.data, r.params, r.sigma, reml, r.design, r.solution.cov_beta))
        except ModelError:
            if explicit:
                raise
            continue  # not defined for this model (e.g. repeated with random slopes)
        cols[TITLES[m]] = ss.df
    return pd.DataFrame(cols, index=list(r.fixed.index))
