"""The command line: jaxmixed fit / tour, JSON output, errors (exit 2, no traceback)."""

import json
import math
import subprocess
import sys

import pandas as pd
import pytest

import jaxmixed as jm
from jaxmixed.app.cli import main

LOGLIK = -1015.4214
CROSSED = "weight ~ week + (1|id) + (1|week)"


@pytest.fixture(scope="module")
def pig_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "pig.csv"
    jm.datasets.load("pig").to_csv(path, index=False)
    return str(path)


def test_fit_report(pig_csv, capsys):
    assert main(["fit", pig_csv, CROSSED]) == 0
    out = capsys.readouterr().out
    assert "Log restricted-likelihood = -1015.4214" in out
    assert "Iteration 0:" in out
    assert main(["fit", pig_csv, CROSSED, "--nolog"]) == 0
    out = capsys.readouterr().out
    assert "Log restricted-likelihood = -1015.4214" in out and "Iteration" not in out


def test_fit_json(pig_csv, capsys):
    assert main(["fit", pig_csv, CROSSED, "--json"]) == 0
    out = capsys.readouterr().out
    d = json.loads(out)  # valid JSON: NaN would not parse with a strict loader either
    json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert d["loglik"] == pytest.approx(LOGLIK, abs=2e-4)
    assert d["method"] == "reml" and d["nobs"] == 432 and d["converged"] is True and d["singular"] is False
    assert set(d["fixed"]) == {"week", "_cons"}
    assert set(d["fixed"]["week"]) == {"coef", "se", "z", "p", "ci_lower", "ci_upper"}
    assert d["fixed"]["week"]["coef"] == pytest.approx(6.209896, abs=1e-5)
    assert [r["name"] for r in d["random"]][-1] == "sd(Residual)"
    assert len(d["random"]) == 3
    assert d["wald"]["df"] == 1 and d["lr_vs_linear"]["df"] == 2
    assert d["groups"]["id"]["n_groups"] == 48 and d["groups"]["week"]["n_groups"] == 9
    assert d["notes"] == []


def test_json_nan_is_null(capsys):
    # singular ML fit: variance-component SEs are NaN -> null
    from jaxmixed.app.cli import to_json
    from conftest import cached_fit

    r = cached_fit("xtmixed", "math5 math3c || school: math3c, cov(unstructured) variance mle", "jsp")  # shared with test_reference
    d = json.loads(to_json(r), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert d["singular"] is True
    assert all(row["se"] is None for row in d["random"])


def test_fit_stata(pig_csv, capsys):
    assert main(["fit", pig_csv, "--stata", "weight week || _all: R.id || _all: R.week"]) == 0
    out = capsys.readouterr().out
    assert "Log restricted-likelihood = -1015.4214" in out and "sd(R.id)" in out
    assert main(["fit", pig_csv, "--stata", "--json", "--ml", "weight week || _all: R.id || _all: R.week"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["method"] == "ml"
    assert main(["fit", pig_csv, "--stata", "--json", "weight week || _all: R.id || _all: R.week, mle"]) == 0
    assert json.loads(capsys.readouterr().out)["loglik"] == pytest.approx(d["loglik"], abs=1e-6)


def test_bad_formula(pig_csv, capsys):
    assert main(["fit", pig_csv, "weight ~ week + (1|id"]) == 2
    cap = capsys.readouterr()
    assert cap.err.startswith("jaxmixed: error:") and "Traceback" not in cap.err
    assert cap.out == ""
    assert main(["fit", pig_csv, "weight ~ wk + (1|id)"]) == 2  # unknown column: DataError
    assert "jaxmixed: error:" in capsys.readouterr().err


def test_missing_file(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "nope.csv"), CROSSED]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxmixed: error:") and "nope.csv" in err
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert main(["fit", str(empty), CROSSED]) == 2
    assert "jaxmixed: error:" in capsys.readouterr().err


def test_usage_errors(capsys):
    assert main([]) == 2
    assert main(["fit"]) == 2
    assert main(["--help"]) == 0
    assert "tour" in capsys.readouterr().out


def test_tour(tmp_path, capsys, monkeypatch):
    tour = pytest.importorskip("jaxmixed.app.tour")
    monkeypatch.setattr(tour, "run", lambda out_dir: f"TOUR TEXT {out_dir}")  # the real tour takes ~1 min
    assert main(["tour", "--out", str(tmp_path / "t")]) == 0
    assert capsys.readouterr().out.strip() == f"TOUR TEXT {tmp_path / 't'}"
    assert main(["tour"]) == 0
    assert "jaxmixed_tour" in capsys.readouterr().out


def test_python_m_help():
    p = subprocess.run([sys.executable, "-m", "jaxmixed", "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "fit" in p.stdout and "tour" in p.stdout


def test_tour_runs_its_fits_in_chains_and_raises_where_a_fit_is_needed(monkeypatch):
    """The tour starts its fits two chains at a time; a chain's fits run in order, a failed fit
    raises where its result is taken (the chain's later fits with it), other chains go on."""
    tour = pytest.importorskip("jaxmixed.app.tour")
    from concurrent.futures import ThreadPoolExecutor

    order = []

    def fake_fit(cmd, data, fail=False):
        order.append(cmd)
        if fail:
            raise jm.ModelError(f"{cmd} failed")
        return cmd.upper() + data

    monkeypatch.setattr(tour, "_chains", lambda: [
        [(fake_fit, "a", "x", {}), (fake_fit, "b", "x", {"fail": True}), (fake_fit, "c", "x", {})],
        [(fake_fit, "d", "y", {}), (fake_fit, "e", "y", {})]])
    with ThreadPoolExecutor(max_workers=2) as pool:
        fits, tasks = tour._start({"x": "1", "y": "2"}, pool)
        assert fits["a"].result() == "A1" and fits["d"].result() == "D2" and fits["e"].result() == "E2"
        for name in ("b", "c"):
            with pytest.raises(jm.ModelError, match="b failed"):
                fits[name].result()
    assert order.index("a") < order.index("b") and "c" not in order and order.index("d") < order.index("e")
    assert all(t.done() for t in tasks)


def test_tour_chains_name_every_fit_once():
    tour = pytest.importorskip("jaxmixed.app.tour")
    names = [cmd for chain in tour._chains() for _, cmd, _, _ in chain]
    assert len(names) == len(set(names)) == 17


def test_tour_prints_no_python_warning_lines(tmp_path, capsys, monkeypatch):
    """A fit of the tour that warns (a boundary fit) shows its note under its table, and the
    command prints no Python warning line ("file:line: JaxmixedWarning: ...")."""
    tour = pytest.importorskip("jaxmixed.app.tour")

    def run(out_dir):
        r = jm.fit("y ~ 1 + (1|g)", pd.DataFrame({"y": [1.0, 3, 2, 2, 3, 1], "g": [0, 0, 1, 1, 2, 2]}))
        assert r.singular
        return str(r)

    monkeypatch.setattr(tour, "run", run)
    assert main(["tour", "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr()
    assert "JaxmixedWarning" not in out.err and out.err == ""
    assert "Note: boundary (singular) fit" in out.out


def test_fit_command_says_each_note_once(tmp_path, capsys):
    f = tmp_path / "d.csv"
    pd.DataFrame({"y": [1.0, 3, 2, 2, 3, 1], "g": [0, 0, 1, 1, 2, 2]}).to_csv(f, index=False)
    assert main(["fit", str(f), "y ~ 1 + (1|g)"]) == 0
    out = capsys.readouterr()
    assert "Warning" not in out.err and "boundary" not in out.err
    assert out.out.count("boundary (singular) fit") == 1


def test_fit_glmm_family_and_stata_me_command(tmp_path, capsys):
    path = tmp_path / "cbpp.csv"
    jm.datasets.load("cbpp").to_csv(path, index=False)
    assert main(["fit", str(path), "cbind(incidence, size - incidence) ~ C(period) + (1|herd)",
                 "--family", "binomial", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "laplace" and abs(out["loglik"] - (-92.0262818647569)) < 1e-6
    assert main(["fit", str(path), "meglm incidence i.period || herd:, family(binomial size) intmethod(laplace)",
                 "--stata", "--nolog"]) == 0
    assert "Mixed-effects GLM" in capsys.readouterr().out


def test_fit_parquet_files_streamed(tmp_path, capsys):
    """`jaxmixed fit data/*.parquet "formula"`: the shell's expansion (several paths) and a quoted
    glob both stream the files and give the CSV fit's numbers."""
    pytest.importorskip("pyarrow")
    d = jm.datasets.load("pig")
    for k in range(3):
        d.iloc[k::3].to_parquet(tmp_path / f"part{k}.parquet")
    files = sorted(str(p) for p in tmp_path.glob("*.parquet"))
    assert main(["fit", *files, CROSSED, "--json", "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["nobs"] == len(d) and abs(got["loglik"] - LOGLIK) < 1e-4
    assert main(["fit", str(tmp_path / "*.parquet"), "--stata", "weight week || id:", "--nolog"]) == 0
    assert "Number of obs      =       432" in capsys.readouterr().out
    assert main(["fit", str(tmp_path / "none-*.parquet"), CROSSED]) == 2
    assert "no file matches" in capsys.readouterr().err
