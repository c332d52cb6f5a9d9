"""device= on jm.fit, jm.xtmixed and jm.fit_many: an explicit CPU device, and clear errors."""

import jax
import numpy as np
import pytest

import jaxmixed as jm
from jaxmixed.inference.bootstrap import simulate
from jaxmixed.runtime.devices import resolve_device

from conftest import cached_fit

PIG = "weight ~ week + (1|id) + (1|week)"


def test_fit_on_cpu_device_equals_default():
    ref = cached_fit("fit", PIG, "pig")
    d = jm.datasets.load("pig")
    for dev in ("cpu", "CPU:0", jax.devices("cpu")[0]):
        r = jm.fit(PIG, d, device=dev)
        assert r.loglik == pytest.approx(ref.loglik, rel=1e-12)
        np.testing.assert_allclose(r.beta, ref.beta, rtol=1e-10)
        assert {dv.platform for dv in r.data.WW.devices()} == {"cpu"}
    r = jm.xtmixed("weight week || _all: R.id || _all: R.week", d, device="cpu")
    assert r.loglik == pytest.approx(ref.loglik, rel=1e-9)


def test_fit_many_on_cpu_device():
    """The JSP batch of test_many (same compiled program), on an explicit device."""
    fit = cached_fit("fit", "math5 ~ math3c + (1 + math3c || school)", "jsp")
    d = jm.datasets.load("jsp")
    d["math3c"] = d.math3 - d.math3.mean()
    Y = simulate(fit, 20, seed=3)
    ref = jm.fit_many("math5 ~ math3c + (1 + math3c || school)", d, responses=Y)
    res = jm.fit_many("math5 ~ math3c + (1 + math3c || school)", d, responses=Y, device=jax.devices("cpu")[0])
    np.testing.assert_array_equal(res.loglik, ref.loglik)
    np.testing.assert_array_equal(res.beta, ref.beta)


@pytest.mark.parametrize("bad", ["tpu", "gpu", "cuda:0", "cpu:7", "cpu:x", "quantum", 42])
def test_unknown_device_is_a_clear_error(bad):
    with pytest.raises(jm.JaxmixedError, match="device"):
        resolve_device(bad)
    d = jm.datasets.load("pig")
    with pytest.raises(jm.ModelError, match="device"):
        jm.fit(PIG, d, device=bad)


def test_unknown_device_in_fit_many_and_xtmixed():
    d = jm.datasets.load("pig")
    with pytest.raises(jm.ModelError, match="not available"):
        jm.fit_many(PIG, d, responses=["weight"], device="gpu")
    with pytest.raises(jm.ModelError, match="not available"):
        jm.xtmixed("weight week || id:", d, device="tpu")
