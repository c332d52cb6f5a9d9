"""Diagnostic plots of a fitted model, written to PNG (or any format matplotlib knows).

Figures are built as :class:`matplotlib.figure.Figure` objects on an Agg canvas, so no pyplot
state and no global backend setting is touched: importing or calling these functions never
changes how the user's own matplotlib session behaves. Every function saves its figure to
``path`` (creating parent folders) and returns the path; ``return_fig=True`` returns
``(path, figure)`` instead so that callers (and tests) can inspect what was drawn.

    fitted_lines          fitted values against a covariate, one connected line per group
                          (Stata: ``predict yhat, fitted`` + ``twoway connected yhat x, connect(L)``)
    caterpillar           BLUPs of one random effect, sorted, with conditional-SE intervals
    residuals_vs_fitted   residuals against fitted values with a zero line
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats as sps

from jaxmixed.errors import DataError

__all__ = ["caterpillar", "fitted_lines", "residuals_vs_fitted"]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path, return_fig: bool):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi)
    return (path, fig) if return_fig else path


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def fitted_lines(result, x: str, group: str, data: pd.DataFrame, groups=None, n_groups: int = 10,
                 path="fitted_lines.png", *, return_fig: bool = False):
    """Fitted values (``predict, fitted``: xb + Zb) against ``x``, one line per group.

    ``data``: the frame the model was fitted to (or new rows with the model's variables;
    ``x`` and ``group`` must be columns of it). ``groups``: the group codes to draw, in the
    order given; by default the first ``n_groups`` codes in sorted order. Within a group the
    points are sorted by ``x`` and connected (Stata's ``sort g x; twoway connected yhat x,
    connect(L)``). The figure's single Axes holds exactly one line per drawn group.
    """
    for col in (x, group):
        if col not in data.columns:
            raise DataError(f"fitted_lines: no column {col!r} in the data")
    fitted = result.predict("fitted", data=data)
    rows = data.iloc[np.asarray(fitted.index)]
    frame = pd.DataFrame({"x": rows[x].to_numpy(), "g": rows[group].to_numpy(), "yhat": fitted.to_numpy()})
    frame = frame[frame["x"].notna() & frame["g"].notna()]
    present = pd.unique(frame["g"])
    if groups is None:
        if int(n_groups) < 1:
            raise DataError("fitted_lines: n_groups must be at least 1")
        try:
            chosen = sorted(present)[: int(n_groups)]
        except TypeError:  # mixed types: sort by their text
            chosen = sorted(present, key=str)[: int(n_groups)]
    else:
        chosen = list(groups)
        unknown = [g for g in chosen if g not in set(present)]
        if unknown:
            raise DataError(f"fitted_lines: group(s) {', '.join(map(repr, unknown))} not in column {group!r}")
    if not chosen:
        raise DataError("fitted_lines: no groups to draw")

    fig = _figure(9.0, 6.0)
    ax = fig.add_subplot()
    for k, (g, color) in enumerate(zip(chosen, _colors(len(chosen)))):
        part = frame[frame["g"] == g].sort_values("x", kind="mergesort")
        ax.plot(part["x"].to_numpy(), part["yhat"].to_numpy(), color=color, marker=_MARKERS[k % len(_MARKERS)],
                markersize=4, linewidth=1.3, label=str(g))
    response = result.design.response
    ax.set_xlabel(x)
    ax.set_ylabel(f"Fitted values of {response} (xb + Zu)")
    ax.set_title(f"Fitted lines per {group}" + ("" if groups is not None else
                                                 f" (first {len(chosen)} of {len(present)})"))
    ax.grid(True, alpha=0.3)
    ncol = 1 if len(chosen) <= 15 else 2
    ax.legend(title=group, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              fontsize="small", ncol=ncol, frameon=False)
    return _save(fig, path, return_fig)


def caterpillar(result, level: str | None = None, effect: str = "_cons", path="caterpillar.png",
                level_ci: float = 95.0, *, return_fig: bool = False):
    """Predicted random effects of one level, sorted, with ± z·(conditional SE) intervals.

    ``level``: a key of ``result.blups()`` (default: the first); ``effect``: one of its
    columns (default ``_cons``, the random intercept). One row per group.
    """
    tables = result.blups()
    if not tables:
        raise DataError("caterpillar: the model has no random effects")
    if level is None:
        level = next(iter(tables))
    if level not in tables:
        raise DataError(f"caterpillar: no level {level!r}; the levels are {', '.join(map(repr, tables))}")
    if effect not in tables[level].columns:
        raise DataError(f"caterpillar: level {level!r} has no effect {effect!r}; "
                        f"its effects are {', '.join(map(repr, tables[level].columns))}")
    if not (0.0 < float(level_ci) < 100.0):
        raise DataError(f"caterpillar: level_ci must be between 0 and 100, not {level_ci}")
    est = tables[level][effect]
    se = result.blups(se=True)[level][effect]
    order = np.argsort(est.to_numpy(), kind="mergesort")
    est, se = est.iloc[order], se.iloc[order]
    z = float(sps.norm.ppf(0.5 + float(level_ci) / 200.0))
    n = len(est)
    ypos = np.arange(n)

    fig = _figure(7.5, min(max(4.0, 0.9 + 0.16 * n), 30.0))
    ax = fig.add_subplot()
    ax.errorbar(est.to_numpy(), ypos, xerr=z * se.to_numpy(), fmt="o", markersize=3.5, color="tab:blue",
                ecolor="tab:blue", elinewidth=1.0, capsize=0)
    ax.axvline(0.0, color="0.4", linewidth=0.9, linestyle="--")
    step = max(1, int(np.ceil(n / 80)))  # at most ~80 tick labels
    ax.set_yticks(ypos[::step])
    ax.set_yticklabels([str(v) for v in est.index[::step]], fontsize=7 if n > 30 else 9)
    ax.set_ylim(-1, n)
    ax.set_ylabel(str(level))
    ax.set_xlabel(f"BLUP of {effect} (± {level_ci:g}% interval from conditional SEs)")
    ax.set_title(f"Predicted random effects: {level}: {effect}")
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path, return_fig)


def residuals_vs_fitted(result, path="residuals_vs_fitted.png", *, return_fig: bool = False):
    """Residuals (y − xb − Zu) against fitted values (xb + Zu), with a zero line."""
    fitted = result.predict("fitted")
    resid = result.predict("residuals")
    fig = _figure(8.0, 5.5)
    ax = fig.add_subplot()
    ax.scatter(fitted.to_numpy(), resid.to_numpy(), s=12, alpha=0.6, color="tab:blue", edgecolors="none")
    ax.axhline(0.0, color="tab:red", linewidth=1.0)
    response = result.design.response
    ax.set_xlabel(f"Fitted values of {response} (xb + Zu)")
    ax.set_ylabel("Residuals")
    ax.set_title(f"Residuals vs fitted ({result.nobs:,} observations)")
    ax.grid(True, alpha=0.3)
    return _save(fig, path, return_fig)
