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
from . import runtime  # noqa: E402

runtime.configure_from_environment()

__version__ = "0.1.0"

from . import datasets  # noqa: E402
from .compare import LRTest, lrtest  # noqa: E402
from .errors import DataError, FormulaError, JaxmixedError, JaxmixedWarning, ModelError  # noqa: E402
from .fitting import fit, fit_spec, mixed, xtmixed  # noqa: E402
from .formula import parse_formula  # noqa: E402
from . import functional  # noqa: E402
from .bootstrap import BootstrapLRTest, BootstrapResult, bootstrap_lrtest  # noqa: E402
from .many import ManyResult, fit_many  # noqa: E402
from .residuals import ar, banded, exchangeable, exponential, independent, ma, toeplitz, unstructured  # noqa: E402
from .results import FitResult  # noqa: E402
from .stata import parse_stata  # noqa: E402

__all__ = [
    "DataError", "FitResult", "LRTest", "lrtest", "FormulaError", "JaxmixedError", "JaxmixedWarning", "ModelError",
    "ar", "banded", "exchangeable", "exponential", "independent", "ma", "toeplitz", "unstructured",
    "datasets", "fit", "fit_spec", "mixed", "parse_formula", "parse_stata", "xtmixed",
    "BootstrapLRTest", "BootstrapResult", "ManyResult", "bootstrap_lrtest", "fit_many", "functional",
]
