"""jaxmixed: linear mixed models with JAX, Stata's and lme4's numbers."""

import os as _os

# XLA's CPU runtime can wedge its Eigen thread pool and never return a result (seen here in
# while_loop programs; jax-ml/jax#25861 and others). Running Eigen ops on the calling thread
# avoids it. Must be set before the backend starts; opt out with JAXMIXED_KEEP_XLA_FLAGS=1.
if not _os.environ.get("JAXMIXED_KEEP_XLA_FLAGS"):
    _flags = _os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in _flags:
        _os.environ["XLA_FLAGS"] = (_flags + " --xla_cpu_multi_thread_eigen=false").strip()

import jax as _jax  # noqa: E402

# Mixed-model likelihoods need float64: Cholesky factors of nearly singular blocks, log
# determinants and variance ratios spanning many orders of magnitude.
_jax.config.update("jax_enable_x64", True)

# Persistent compilation cache on (JAXMIXED_NO_CACHE=1 to leave it off): see jaxmixed.runtime.
from jaxmixed import runtime  # noqa: E402

runtime.configure_from_environment()

__version__ = "0.1.0"

from jaxmixed.data import datasets  # noqa: E402
from jaxmixed.inference.compare import LRTest, lrtest  # noqa: E402
from jaxmixed.errors import DataError, FormulaError, JaxmixedError, JaxmixedWarning, ModelError  # noqa: E402
from jaxmixed.api.fit import fit, fit_spec, mixed, xtmixed  # noqa: E402
from jaxmixed.syntax.formula import parse_formula  # noqa: E402
from jaxmixed.model.residuals import ar, banded, exchangeable, exponential, independent, ma, toeplitz, unstructured  # noqa: E402
from jaxmixed.results.fitresult import FitResult  # noqa: E402

# Imported at first use (PEP 562), so that ``import jaxmixed`` and a first fit do not pay for them.
_LAZY = {
    "functional": ("functional", None),
    "BootstrapLRTest": ("inference.bootstrap", "BootstrapLRTest"),
    "BootstrapResult": ("inference.bootstrap", "BootstrapResult"),
    "bootstrap_lrtest": ("inference.bootstrap", "bootstrap_lrtest"),
    "ManyResult": ("fit.batched", "ManyResult"),
    "fit_many": ("fit.batched", "fit_many"),
    "parse_stata": ("syntax.stata", "parse_stata"),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = importlib.import_module(f"{__name__}.{module}")
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DataError", "FitResult", "LRTest", "lrtest", "FormulaError", "JaxmixedError", "JaxmixedWarning", "ModelError",
    "ar", "banded", "exchangeable", "exponential", "independent", "ma", "toeplitz", "unstructured",
    "datasets", "fit", "fit_spec", "mixed", "parse_formula", "parse_stata", "xtmixed",
    "BootstrapLRTest", "BootstrapResult", "ManyResult", "bootstrap_lrtest", "fit_many", "functional",
]
