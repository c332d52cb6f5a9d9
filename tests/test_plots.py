"""Plots: each writes a PNG; fitted_lines draws exactly the requested groups."""

import numpy as np
import pytest

import jaxmixed as jm
from conftest import cached_fit
from jaxmixed.results import plots

PNG = b"\x89PNG\r\n\x1a\n"
SLOPE = "math5 ~ math3c + (1 + math3c || school)"


@pytest.fixture(scope="module")
def slope():
    return cached_fit("fit", SLOPE, "jsp")  # shared with other test files in the session


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG


def test_fitted_lines_first_groups(slope, jsp, tmp_path):
    out = tmp_path / "sub" / "dir" / "lines.png"  # parent folders are created
    path, fig = plots.fitted_lines(slope, "math3", "school", jsp, n_groups=10, path=out, return_fig=True)
    assert path == out and _is_png(out)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 10
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [str(s) for s in [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]]
    assert ax.get_xlabel() == "math3" and "math5" in ax.get_ylabel() and "school" in ax.get_title()
    # each line: one school's fitted values, sorted by x
    fitted = slope.predict("fitted")
    for line, s in zip(lines, [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]):
        xs, ys = line.get_data()
        rows = np.flatnonzero(jsp.school.to_numpy() == s)
        assert len(xs) == len(rows) and np.all(np.diff(xs) >= 0)
        np.testing.assert_allclose(np.sort(ys), np.sort(fitted.loc[rows].to_numpy()))


def test_fitted_lines_given_groups(slope, jsp, tmp_path):
    path, fig = plots.fitted_lines(slope, "math3c", "school", jsp, groups=[5, 3, 40], path=tmp_path / "g.png",
                                   return_fig=True)
    assert _is_png(path)
    assert len(fig.axes[0].get_lines()) == 3
    assert plots.fitted_lines(slope, "math3", "school", jsp, n_groups=2, path=tmp_path / "p.png") == tmp_path / "p.png"
    with pytest.raises(jm.DataError):
        plots.fitted_lines(slope, "math3", "school", jsp, groups=[10], path=tmp_path / "x.png")
    with pytest.raises(jm.DataError):
        plots.fitted_lines(slope, "nope", "school", jsp, path=tmp_path / "x.png")


def test_caterpillar(slope, tmp_path):
    path, fig = plots.caterpillar(slope, path=tmp_path / "cat.png", return_fig=True)
    assert _is_png(path)
    ax = fig.axes[0]
    assert len(ax.get_yticks()) == 48  # one row per school
    b = slope.blups()["school"]["_cons"]
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(s) for s in b.sort_values(kind="mergesort").index]
    assert _is_png(plots.caterpillar(slope, "school", "math3c", path=tmp_path / "slope.png", level_ci=90))
    with pytest.raises(jm.DataError):
        plots.caterpillar(slope, effect="nope", path=tmp_path / "x.png")
    with pytest.raises(jm.DataError):
        plots.caterpillar(slope, level="class", path=tmp_path / "x.png")


def test_residuals_vs_fitted(slope, tmp_path):
    path, fig = plots.residuals_vs_fitted(slope, path=tmp_path / "res.png", return_fig=True)
    assert _is_png(path)
    offsets = fig.axes[0].collections[0].get_offsets()
    assert len(offsets) == slope.nobs

