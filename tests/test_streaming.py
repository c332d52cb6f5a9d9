"""Streamed sources (jaxmixed.data.sources / streaming): every source gives the in-memory fit's numbers.

The reference is the in-memory pandas fit of the same rows (itself checked against Stata and
lme4 elsewhere): log likelihood to 1e-10 relative, every estimate (β, their standard errors,
σ, the variance components and their standard errors) to 1e-8, for a nested, a crossed and a
random-slope model, from a Parquet file, a glob of several files, a pyarrow Dataset and Table,
a polars DataFrame and a Dask DataFrame on a real ``distributed.LocalCluster``; the 8-device
case runs in a subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

import jaxmixed as jm

pa = pytest.importorskip("pyarrow")
import pyarrow.dataset as pads  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def _crossed() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    n, a, b = 2400, 120, 40
    r, i = rng.integers(0, a, n), rng.integers(0, b, n)
    x = rng.standard_normal(n)
    y = 2 + 0.5 * x + rng.standard_normal(a)[r] * 0.8 + rng.standard_normal(b)[i] * 0.5 + rng.standard_normal(n)
    return pd.DataFrame({"y": y, "x": x, "rater": [f"r{k:03d}" for k in r], "item": i})


def _jsp() -> pd.DataFrame:
    d = jm.datasets.load("jsp")
    d["math3c"] = d.math3 - d.math3.mean()
    return d


MODELS = {
    "nested": ("math5 ~ math3c + C(gender) + (1|school) + (1|school:class)", _jsp, {}),
    "crossed": ("y ~ x + (1|rater) + (1|item)", _crossed, {"engine": "sparse"}),
    "slope": ("Reaction ~ Days + (1 + Days|Subject)", lambda: jm.datasets.load("sleepstudy"), {}),
}


def assert_same(a, b, loglik_rtol=1e-10, rtol=1e-8):
    """The streamed fit ``b`` equals the in-memory fit ``a``."""
    assert b.nobs == a.nobs and b.n_dropped == a.n_dropped
    assert abs(b.loglik - a.loglik) <= loglik_rtol * abs(a.loglik), (a.loglik, b.loglik)
    fa, fb = a.fixed[["coef", "se"]].to_numpy(float), b.fixed[["coef", "se"]].to_numpy(float)
    np.testing.assert_allclose(fb, fa, rtol=rtol, atol=rtol * np.max(np.abs(fa)))
    ra, rb = a.random[["estimate", "se"]].to_numpy(float), b.random[["estimate", "se"]].to_numpy(float)
    np.testing.assert_allclose(rb, ra, rtol=rtol, atol=rtol * np.nanmax(np.abs(ra)))
    np.testing.assert_allclose(b.sigma, a.sigma, rtol=rtol)
    assert list(b.fixed.index) == list(a.fixed.index)
    pd.testing.assert_frame_equal(b.groups, a.groups, check_dtype=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Each model's data as one Parquet file and as three (a glob), and its in-memory fit."""
    root = tmp_path_factory.mktemp("streaming")
    out = {}
    for name, (formula, make, kw) in MODELS.items():
        d = make()
        one = root / f"{name}.parquet"
        d.to_parquet(one)
        (root / name).mkdir()
        for k, part in enumerate(np.array_split(np.arange(len(d)), 3)):
            d.iloc[part].to_parquet(root / name / f"part-{k}.parquet")
            d.iloc[part].to_csv(root / name / f"part-{k}.csv", index=False)
        d.to_feather(root / f"{name}.arrow")
        out[name] = dict(data=d, path=str(one), glob=str(root / name / "*.parquet"),
                         ref=jm.fit(formula, d, **kw), formula=formula, kw=kw)
    return out


SOURCES = {
    "parquet path": lambda f: f["path"],
    "parquet glob": lambda f: f["glob"],
    "list of paths": lambda f: sorted(__import__("glob").glob(f["glob"])),
    "pyarrow Dataset": lambda f: pads.dataset(sorted(__import__("glob").glob(f["glob"])), format="parquet"),
    "pyarrow Table": lambda f: pa.Table.from_pandas(f["data"], preserve_index=False),
    "CSV glob": lambda f: f["glob"].replace(".parquet", ".csv"),
    "Arrow IPC file": lambda f: f["path"].replace(".parquet", ".arrow"),
}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("source", list(SOURCES))
def test_source_gives_in_memory_fit(files, model, source):
    f = files[model]
    r = jm.fit(f["formula"], SOURCES[source](f), **f["kw"])
    assert_same(f["ref"], r)
    assert type(r.design).__name__ == "StreamedDesign"


@pytest.mark.parametrize("model", list(MODELS))
def test_polars(files, model):
    pl = pytest.importorskip("polars")
    f = files[model]
    assert_same(f["ref"], jm.fit(f["formula"], pl.from_pandas(f["data"]), **f["kw"]))


@pytest.mark.parametrize("model", ["nested", "slope"])
def test_batch_size_does_not_change_the_answer(files, model):
    f = files[model]
    small = jm.fit(f["formula"], jm.source(f["path"], batch_rows=13), **f["kw"])
    large = jm.fit(f["formula"], jm.source(f["path"], batch_rows=100_000), **f["kw"])
    assert_same(large, small)
    assert_same(f["ref"], small)


@pytest.mark.parametrize("one_pass", [False, True])
def test_missing_values_dropped_and_counted(tmp_path, one_pass):
    """Rows missing the response, a covariate, a grouping variable or a categorical fixed effect
    are dropped and counted as in memory (the two-pass schema for nested groupings; the single
    pass for one grouping factor without categorical fixed effects)."""
    d = _jsp()
    rng = np.random.default_rng(3)
    d.loc[rng.choice(len(d), 11, replace=False), "math5"] = np.nan
    d["gender"] = d["gender"].astype(object)
    d.loc[rng.choice(len(d), 5, replace=False), "gender"] = None
    d["school"] = d["school"].astype(float)
    d.loc[rng.choice(len(d), 4, replace=False), "school"] = np.nan
    d.loc[rng.choice(len(d), 6, replace=False), "math3c"] = np.nan
    path = tmp_path / "gappy.parquet"
    d.to_parquet(path)
    formula = "math5 ~ math3c + (1 + math3c|school)" if one_pass else MODELS["nested"][0]
    ref = jm.fit(formula, d)
    assert ref.n_dropped >= (18 if one_pass else 24)
    r = jm.fit(formula, jm.source(str(path), batch_rows=100))
    assert r.n_dropped == ref.n_dropped and r.nobs == ref.nobs == len(d) - ref.n_dropped
    assert_same(ref, r)
    assert f"{r.nobs}" in str(r)


def test_weights_stata_syntax_and_ml(files, tmp_path):
    d = files["slope"]["data"].copy()
    d["w"] = np.random.default_rng(1).uniform(0.5, 2.0, len(d))
    path = tmp_path / "w.parquet"
    d.to_parquet(path)
    formula = "Reaction ~ Days + (1 + Days|Subject)"
    assert_same(jm.fit(formula, d, weights="w"), jm.fit(formula, str(path), weights="w"))
    cmd = "Reaction Days || Subject: Days, covariance(unstructured) mle"
    assert_same(jm.xtmixed(cmd, d), jm.xtmixed(cmd, str(path)))


def test_small_sample_inference_and_tests(files):
    f = files["slope"]
    a = jm.fit(f["formula"], f["data"], dfmethod="kroger")
    b = jm.fit(f["formula"], f["path"], dfmethod="kroger")
    assert_same(a, b)
    np.testing.assert_allclose(b.fixed["df"], a.fixed["df"], rtol=1e-7)
    n = files["nested"]
    a, b = jm.fit(n["formula"], n["data"]), jm.fit(n["formula"], n["path"])
    pd.testing.assert_frame_equal(b.anova(type=3), a.anova(type=3), rtol=1e-7)
    pd.testing.assert_frame_equal(b.anova(type=1), a.anova(type=1), rtol=1e-7)


def test_blups_and_predictions_to_parquet(files, tmp_path):
    f = files["nested"]
    ref, r = f["ref"], jm.fit(f["formula"], f["path"])
    for key, table in ref.blups().items():
        np.testing.assert_allclose(r.blups()[key].to_numpy(), table.to_numpy(), rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(r.blups(se=True)[key].to_numpy(), ref.blups(se=True)[key].to_numpy(), rtol=1e-7)
    out = tmp_path / "pred.parquet"
    assert r.predict("residuals", jm.source(f["path"], batch_rows=100), out=str(out)) == str(out)
    written = pq.read_table(out).to_pandas()
    assert list(written.columns) == ["row", "residuals"] and len(written) == ref.nobs
    np.testing.assert_allclose(written["residuals"], ref.predict("residuals").to_numpy(), atol=1e-8)
    fitted = r.predict("fitted", f["glob"])
    np.testing.assert_allclose(fitted.to_numpy(), ref.predict("fitted").to_numpy(), atol=1e-8)
    with pytest.raises(jm.DataError, match="streamed source"):
        r.predict("fitted")  # the training rows are not kept


def test_streamed_errors(files, tmp_path):
    f = files["slope"]
    with pytest.raises(jm.DataError, match="no file matches"):
        jm.fit(f["formula"], str(tmp_path / "nothing-*.parquet"))
    with pytest.raises(jm.DataError, match="does not exist"):
        jm.fit(f["formula"], str(tmp_path / "absent.parquet"))
    with pytest.raises(jm.DataError, match="'Reactoin' is not a column .*did you mean 'Reaction'"):
        jm.fit("Reactoin ~ Days + (1|Subject)", f["path"])
    with pytest.raises(jm.ModelError, match="expressions"):
        jm.fit("Reaction ~ I(Days**2) + (1|Subject)", f["path"])
    with pytest.raises(jm.ModelError, match="residual structures"):
        jm.fit("Reaction ~ Days + (1|Subject)", f["path"], residuals=jm.ar(1, time="Days"))
    with pytest.raises(jm.ModelError, match="in memory"):
        jm.fit("Reaction ~ Days + (1|Subject)", f["path"], family="poisson")
    with pytest.raises(jm.ModelError, match="satterthwaite"):
        jm.fit("Reaction ~ Days + (1|Subject)", f["path"], dfmethod="residual")
    with pytest.raises(jm.DataError, match="positive integer"):
        jm.source(f["path"], batch_rows=0)
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(jm.DataError, match="unknown format"):
        jm.fit(f["formula"], str(tmp_path / "x.txt"))
    with pytest.raises(jm.DataError, match="pandas DataFrame, a path"):
        jm.fit(f["formula"], pa.array([1, 2]))


# ---------------------------------------------------------------------------------------------
# Dask on a real LocalCluster


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    pytest.importorskip("dask.dataframe")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                       silence_logs=40)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.mark.parametrize("model", list(MODELS))
def test_dask_local_cluster(files, client, model):
    import dask.dataframe as dd

    f = files[model]
    from distributed import get_task_stream

    ddf = dd.from_pandas(f["data"], npartitions=4)
    with get_task_stream(client) as stream:
        r = jm.fit(f["formula"], ddf, **f["kw"])
    assert_same(f["ref"], r)
    # the per-partition function ran as tasks on the cluster's worker processes
    ran = [t for t in stream.data if "_in_batches" in str(t.get("key"))]
    assert len(ran) >= 4 and {t["worker"] for t in ran} <= set(client.scheduler_info()["workers"])
    ddf2 = dd.read_parquet(f["glob"])
    assert_same(f["ref"], jm.fit(f["formula"], ddf2, **f["kw"]))


# ---------------------------------------------------------------------------------------------
# several devices: 8 virtual CPU devices in a subprocess

DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, pandas as pd, jax
    import jaxmixed as jm
    assert len(jax.devices()) == 8, jax.devices()
    out = {}
    for name, formula, path, kw in json.loads(sys.argv[1]):
        d = pd.read_parquet(path)
        res = {"memory": jm.fit(formula, d, devices=jax.devices(), **kw),
               "parquet": jm.fit(formula, jm.source(path, batch_rows=500), devices=jax.devices()[:8], **kw)}
        out[name] = {k: dict(loglik=r.loglik, fixed=r.fixed[["coef", "se"]].to_numpy().tolist(),
                             random=r.random[["estimate", "se"]].to_numpy().tolist(), sigma=r.sigma,
                             nobs=r.nobs) for k, r in res.items()}
    print(json.dumps(out))
""")


def test_eight_virtual_devices(files):
    jobs = [(name, f["formula"], f["path"], f["kw"]) for name, f in files.items()]
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"))
    proc = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, json.dumps(jobs)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, f in files.items():
        ref = f["ref"]
        for kind, r in got[name].items():
            assert r["nobs"] == ref.nobs
            assert abs(r["loglik"] - ref.loglik) <= 1e-10 * abs(ref.loglik), (name, kind)
            fa = ref.fixed[["coef", "se"]].to_numpy(float)
            np.testing.assert_allclose(r["fixed"], fa, rtol=1e-8, atol=1e-8 * np.max(np.abs(fa)))
            ra = ref.random[["estimate", "se"]].to_numpy(float)
            np.testing.assert_allclose(np.array(r["random"], dtype=float), ra, rtol=1e-8,
                                       atol=1e-8 * np.nanmax(np.abs(ra)))
            np.testing.assert_allclose(r["sigma"], ref.sigma, rtol=1e-8)


def test_devices_refused_with_dask_and_glmm(files):
    import jax

    pytest.importorskip("dask.dataframe")
    import dask.dataframe as dd

    f = files["slope"]
    with pytest.raises(jm.ModelError, match="Dask"):
        jm.fit(f["formula"], dd.from_pandas(f["data"], npartitions=2), devices=jax.devices())
    with pytest.raises(jm.ModelError, match="devices="):
        jm.fit("Reaction ~ Days + (1|Subject)", f["data"], family="poisson", devices=jax.devices())
    with pytest.raises(jm.ModelError, match="jax.Device"):
        jm.fit(f["formula"], f["data"], devices=["cpu"])
    with pytest.raises(jm.ModelError, match="process_local"):
        jm.fit(f["formula"], jm.source(f["path"], process_local=True), devices=jax.devices())


# ---------------------------------------------------------------------------------------------
# several processes: jax.distributed on localhost, each process reading its own files

PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    pid, port, jobs = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import jaxmixed as jm
    out = {}
    for name, formula, parts, kw in jobs:
        r = jm.fit(formula, jm.source(parts[pid], process_local=True), **kw)
        out[name] = dict(loglik=r.loglik, fixed=r.fixed[["coef", "se"]].to_numpy().tolist(), nobs=r.nobs,
                         random=r.random[["estimate", "se"]].to_numpy().tolist(), sigma=r.sigma)
    print(json.dumps(out))
""")


def test_two_processes_jax_distributed(files, tmp_path):
    """Two processes of a jax.distributed run (CPU, gloo collectives), each with its own half of the
    files, give the in-memory fit of all the rows, and the same numbers on both processes."""
    import socket

    jobs = []
    for name in ("nested", "slope"):
        f = files[name]
        d = f["data"]
        parts = []
        for k, half in enumerate(np.array_split(np.arange(len(d)), 2)):
            path = tmp_path / f"{name}-{k}.parquet"
            d.iloc[half].to_parquet(path)
            parts.append(str(path))
        jobs.append((name, f["formula"], parts, f["kw"]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", PROCESS_SCRIPT, str(k), str(port), json.dumps(jobs)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    got = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert got[0] == got[1]
    for name, *_ in jobs:
        ref, r = files[name]["ref"], got[0][name]
        assert r["nobs"] == ref.nobs
        assert abs(r["loglik"] - ref.loglik) <= 1e-10 * abs(ref.loglik)
        fa = ref.fixed[["coef", "se"]].to_numpy(float)
        np.testing.assert_allclose(r["fixed"], fa, rtol=1e-8, atol=1e-8 * np.max(np.abs(fa)))
        np.testing.assert_allclose(r["sigma"], ref.sigma, rtol=1e-8)


def test_partial_results_round_trip_without_pickle(files):
    """What the processes of a jax.distributed run exchange (jaxmixed.data.exchange) comes back
    equal: the schema pass's Scan (tables of combinations, counts per level) and the one-pass Part."""
    from jaxmixed.data import exchange, sources, streaming
    from jaxmixed.syntax.formula import parse_formula

    spec = parse_formula(MODELS["nested"][0])
    src = sources.open_source(files["nested"]["path"])
    variables = list(spec.variables)
    scan = streaming.scan(spec, src, variables, streaming._categoricals(spec, src.prototype(variables)))
    back = exchange.decode(exchange.encode(scan))
    assert back.n_rows == scan.n_rows and back.present == scan.present
    pd.testing.assert_frame_equal(streaming.compact_combos(back.combos), streaming.compact_combos(scan.combos))
    for v, counts in scan.cat_counts.items():
        pd.testing.assert_series_equal(back.cat_counts[v], counts, check_index_type=False)
    spec1 = parse_formula(MODELS["slope"][0])
    src1 = sources.open_source(files["slope"]["path"])
    captured = {}
    original = src1.map_reduce
    src1.map_reduce = lambda func, cols, combine, **kw: captured.setdefault("part", original(func, cols, combine, **kw))
    streaming.design_from_source(spec1, src1)
    part = captured["part"]
    again = exchange.decode(exchange.encode(part))
    assert list(again.levels) == list(part.levels) and np.array_equal(again.counts, part.counts)
    np.testing.assert_array_equal(again.sums.cp.Z1W, part.sums.cp.Z1W)
    assert again.sums.y_stats == part.sums.y_stats and again.sums.y_min == part.sums.y_min
    with pytest.raises(ValueError):
        exchange.decode(b"not ours")
