"""ManyResult: fits of one model to many responses (``jm.fit_many``), and its tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from jaxmixed.inference import distributions as sps
from jaxmixed.inference.tables import component_layout, component_values, covariances_from_hessians
from jaxmixed.engine.pls import residual_rows
from jaxmixed.model.covariance import is_singular


@dataclass(frozen=True)
class ManyResult:
    """Fits of one model to many responses (``jm.fit_many``).

    summary  DataFrame indexed by response: loglik, converged, singular, iterations
    fixed    tidy DataFrame: response, term, coef, se, z, p, ci_lower, ci_upper
    random   tidy DataFrame: response, group, name, estimate, se, ci_lower, ci_upper
             (the rows and metric of FitResult.random, e.g. sd(_cons), sd(Residual))
    responses  response names, in order
    theta, beta, sigma, loglik   arrays with one row per response
    nobs, n_dropped   observations used (the same for every response) and rows dropped
    converged and singular follow jm.fit's rules exactly.
    """

    responses: tuple
    method: str
    nobs: int
    n_dropped: int
    level: float
    variance: bool
    summary: pd.DataFrame
    fixed: pd.DataFrame
    random: pd.DataFrame
    theta: np.ndarray
    beta: np.ndarray
    sigma: np.ndarray
    loglik: np.ndarray
    notes: tuple
    design: Any = field(repr=False)

    def __len__(self) -> int:
        return len(self.responses)

    def wide(self) -> pd.DataFrame:
        """One row per response: loglik, converged, singular, then coef[term], se[term] for each
        fixed effect and one column per variance-component row ("school: sd(_cons)")."""
        out = self.summary[["loglik", "converged", "singular"]].copy()
        for col in ("coef", "se"):
            w = self.fixed.pivot(index="response", columns="term", values=col)
            for term in self.design.xnames:
                out[f"{col}[{term}]"] = w[term].reindex(out.index).to_numpy()
        labels = [f"{g}: {n}" if g else n for g, n in zip(self.random.group, self.random.name)]
        per = len(self.random) // max(len(self), 1)
        vals = self.random.estimate.to_numpy().reshape(len(self), per)
        for c, lab in enumerate(labels[:per]):
            out[lab] = vals[:, c]
        return out

    def __str__(self) -> str:
        s = self.summary
        lines = [f"fit_many: {len(self)} responses, {self.nobs} observations, {self.method.upper()}",
                 f"  converged {int(s.converged.sum())}/{len(self)}, singular {int(s.singular.sum())}"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def summarise(design: Design, raw: dict, names: Sequence, reml: bool, level: float, variance: bool,
              n_dropped: int = 0, notes: tuple = ()) -> ManyResult:
    """ManyResult from the arrays of ``fit_responses``."""
    k = len(names)
    z = sps.norm.ppf(0.5 + level / 200.0)
    theta = raw["theta"]
    singular = is_singular(theta, [t.structure for t in design.terms], [t.theta for t in design.terms],
                           design.theta_scale)
    cov_eta, hess_ok = covariances_from_hessians(raw["H"], ~singular)
    converged = raw["opt_converged"] & (singular | hess_ok)
    loglik = -0.5 * raw["fun"]
    names = list(names)
    summary = pd.DataFrame({"loglik": loglik, "converged": converged, "singular": singular,
                            "iterations": raw["n_iter"].astype(int)}, index=pd.Index(names, name="response"))
    beta = raw["beta"]
    se = np.sqrt(np.diagonal(raw["cov_beta"], axis1=1, axis2=2))
    p = design.p
    with np.errstate(invalid="ignore", divide="ignore"):
        zs = beta / se
    fixed = pd.DataFrame({
        "response": np.repeat(names, p), "term": np.tile(design.xnames, k),
        "coef": beta.ravel(), "se": se.ravel(), "z": zs.ravel(), "p": (2 * sps.norm.sf(np.abs(zs))).ravel(),
        "ci_lower": (beta - z * se).ravel(), "ci_upper": (beta + z * se).ravel()})
    layout = component_layout(design.terms, variance, residual_rows(variance))
    est, vse, lo, hi = component_values(raw["eta"], layout, cov_eta, z)
    nr = len(layout)
    random = pd.DataFrame({
        "response": np.repeat(names, nr), "group": [r.group for r in layout] * k,
        "name": [r.name for r in layout] * k, "estimate": est.ravel(), "se": vse.ravel(),
        "ci_lower": lo.ravel(), "ci_upper": hi.ravel()})
    notes = list(notes)
    if (~converged).any():
        notes.append(f"{int((~converged).sum())} response(s) did not converge (see summary.converged)")
    return ManyResult(responses=tuple(names), method="reml" if reml else "ml", nobs=design.nobs,
                      n_dropped=n_dropped, level=float(level), variance=bool(variance), summary=summary,
                      fixed=fixed, random=random, theta=theta, beta=beta, sigma=raw["sigma"], loglik=loglik,
                      notes=tuple(notes), design=design)


